rule caption:
    """Captions for one shard: edits and sidecars win, then the content-addressed cache."""
    input:
        manifest="results/{dataset}/manifest/{shard}.jsonl",
        sidecars=get_shard_sidecars,
    output:
        "results/{dataset}/captions/{shard}.jsonl",
    log:
        "logs/caption/{dataset}/{shard}.log",
    conda:
        ENV
    params:
        root=get_root,
        settings=get_caption_settings,
        overrides=get_shard_overrides,
        cache="results/cache/captions",
        code=code_version("captions", "manifest", "io"),
    script:
        "../scripts/caption.py"
