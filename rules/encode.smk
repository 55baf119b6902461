rule encode:
    """VAE latent distributions and text-encoder outputs for one shard."""
    input:
        tar="results/{dataset}/shards/{shard}.tar",
        model=get_encode_model_files,
    output:
        ensure("results/{dataset}/latents/{model}-{res}/{shard}.tar", non_empty=True),
    log:
        "logs/encode/{dataset}/{model}-{res}/{shard}.log",
    benchmark:
        "benchmarks/encode/{dataset}/{model}-{res}/{shard}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
    params:
        model_path=get_model_path,
        dtype="float32",
        batch_size=8,
        code=code_version("latents", "models", "shards", "io"),
        libs=LIBS_TORCH,
    script:
        "../scripts/encode.py"
