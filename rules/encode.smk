# One job per latent folder (a dataset's latents of one model, resolution and dtype): one process
# imports torch and diffusers once for all of the dataset's shards, not once per shard. Each shard
# is still its own latent tar, and one whose image shard and settings did not change comes from
# results/cache/latents/ (hard links: no extra disk) instead of being encoded again, so a changed
# shard re-encodes alone (lorapipe.latent_folder). One rule per dataset, since its shards are the
# job's outputs; so its threads and resources are set here, not in the workflow profile.
for _name in DATASETS:

    rule:
        name:
            f"encode_{_name}"
        input:
            tars=PLAN.shard_tars(_name),
            tars_sha256=PLAN.shard_tars(_name, ".sha256"),
            model=get_encode_model_files,
            vae=get_encode_vae_files,
        output:
            # no ensure(non_empty=True): see rules/shard.smk
            tars=PLAN.latent_tars(_name),
            sha256=PLAN.latent_tars(_name, ".sha256"),
        log:
            f"logs/encode/{_name}/{{model}}-{{res}}-{{dtype}}.log",
        benchmark:
            f"benchmarks/encode/{_name}/{{model}}-{{res}}-{{dtype}}.tsv"
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=16000,
            runtime=PLAN.encode_runtime(_name),
            gpu=1,
        params:
            model_path=get_model_path,
            original_config=get_original_config,
            vae=get_vae,
            dtype="{dtype}",
            batch_size=8,
            variants=PLAN.variant_settings(_name),
            cache=f"results/cache/latents/{_name}/{{model}}-{{res}}-{{dtype}}",
            code=script_code("encode"),
            libs=LIBS_TORCH,
            integrity=latent_integrity(_name),
        script:
            "../scripts/encode.py"
