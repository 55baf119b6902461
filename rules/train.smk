rule run_config:
    """The resolved config of a run and its fingerprint (config + data + model + code)."""
    input:
        manifest=get_run_manifest,
        model=get_run_model_files,
        vae=get_run_vae_files,
        val_manifest=get_run_val_manifest,  # a validation_dataset's (in the fingerprint)
    output:
        "results/runs/{run}/config.yaml",
    log:
        "logs/run_config/{run}.log",
    benchmark:
        "benchmarks/run_config/{run}.tsv"
    conda:
        ENV
    threads: get_light_threads
    params:
        run=get_run_settings,
        context=get_run_context,
        code=script_code("run_config", "train"),  # in the run fingerprint: training code
    script:
        "../scripts/run_config.py"


rule train:
    """LoRA training and its two files: the diffusers layout and the kohya one (WebUI/ComfyUI,
    written in this job, #17). Checkpoints (and both export layouts of each saved step, in
    exports/) live in results/checkpoints/ (never deleted by a rerun). Live metrics go to MLflow
    (mlflow.live).
    """
    input:
        config="results/runs/{run}/config.yaml",
        latents=get_run_latents,
        latents_sha256=get_run_latent_sidecars,
        val_latents=get_run_val_latents,  # a validation_dataset's latents (else none)
        val_latents_sha256=get_run_val_latent_sidecars,
        model=get_run_model_files,
        vae=get_run_vae_files,
        captions=get_run_captions,  # the kohya file's tag counts (ss_tag_frequency)
    output:
        lora="results/runs/{run}/pytorch_lora_weights.safetensors",
        # the same LoRA in kohya layout (WebUI/ComfyUI), named after the run, with ss_* metadata
        kohya="results/runs/{run}/{run}.safetensors",
        metrics="results/runs/{run}/metrics.jsonl",
        loss=report(
            "results/runs/{run}/loss.png",
            caption="../report/loss.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "training loss"},
        ),
        summary="results/runs/{run}/train_summary.json",
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    conda:
        ENV
    # num_processes > 1: that many processes share the job's threads (the default profile's
    # set-threads wins over this; raise it with --set-threads train=N) and its GPUs.
    threads: get_train_threads
    resources:
        mem_mb=get_train_mem_mb,
        gpu=get_train_gpus,
    params:
        model_path=get_run_model_path,
        vae=get_run_vae,
        checkpoints="results/checkpoints/{run}",
        # The MLflow run id is written into the LoRA's metadata: where it is logged is a setting.
        mlflow_uri=get_mlflow_uri,
        mlflow_experiment=config["mlflow"]["experiment"],
        mlflow_live={
            k: config["mlflow"][k]
            for k in ("live", "live_every_steps", "live_every_s")
        },
        dataset=get_run_dataset,
        code=script_code("train"),
    script:
        "../scripts/train.py"
