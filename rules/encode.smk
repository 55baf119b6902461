from lorapipe.io import integrity_param


rule encode:
    """VAE latent distributions and text-encoder outputs for one shard."""
    input:
        tar="results/{dataset}/shards/{shard}.tar",
        tar_sha256="results/{dataset}/shards/{shard}.tar.sha256",
        model=get_encode_model_files,
    output:
        # no ensure(non_empty=True): see rules/shard.smk
        tar="results/{dataset}/latents/{model}-{res}-{dtype}/{shard}.tar",
        sha256="results/{dataset}/latents/{model}-{res}-{dtype}/{shard}.tar.sha256",
    log:
        "logs/encode/{dataset}/{model}-{res}-{dtype}/{shard}.log",
    benchmark:
        "benchmarks/encode/{dataset}/{model}-{res}-{dtype}/{shard}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
    params:
        model_path=get_model_path,
        original_config=get_original_config,
        dtype="{dtype}",
        batch_size=8,
        variants=get_variant_settings,
        code=script_code("encode"),
        libs=LIBS_TORCH,
        integrity=integrity_param(
            "results/{dataset}/latents/{model}-{res}-{dtype}/{shard}.tar", workflow
        ),
    script:
        "../scripts/encode.py"
