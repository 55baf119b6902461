rule shard:
    """One WebDataset shard: images decoded, bucketed, resized and cropped, with captions."""
    input:
        manifest="results/{dataset}/manifest/{shard}.jsonl",
        captions="results/{dataset}/captions/{shard}.jsonl",
        images=get_shard_images,
    output:
        tar=ensure("results/{dataset}/shards/{shard}.tar", non_empty=True),
        index="results/{dataset}/shards/{shard}.jsonl",
    log:
        "logs/shard/{dataset}/{shard}.log",
    conda:
        ENV
    params:
        root=get_root,
        settings=get_shard_settings,
        code=code_version("shards", "images", "manifest", "io"),
        pil=LIBS_IMAGE,
    script:
        "../scripts/shard.py"
