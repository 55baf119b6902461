from lorapipe.io import integrity_param


rule shard:
    """One WebDataset shard: images decoded, bucketed, resized and cropped, with captions."""
    input:
        manifest="results/{dataset}/manifest/{shard}.jsonl",
        manifest_sha256="results/{dataset}/manifest/{shard}.jsonl.sha256",
        captions="results/{dataset}/captions/{shard}.jsonl",
        captions_sha256="results/{dataset}/captions/{shard}.jsonl.sha256",
    output:
        # no ensure(non_empty=True): with a storage provider Snakemake 9.27 checks it in storage
        # before the upload and fails the job; a tar is never empty, and its sidecar guards it
        tar="results/{dataset}/shards/{shard}.tar",
        index="results/{dataset}/shards/{shard}.jsonl",
        sha256="results/{dataset}/shards/{shard}.tar.sha256",
    log:
        "logs/shard/{dataset}/{shard}.log",
    conda:
        ENV
    params:
        root=get_root,
        settings=get_shard_settings,
        code=script_code("shard"),
        pil=LIBS_IMAGE,
        integrity=integrity_param("results/{dataset}/shards/{shard}.tar", workflow),
    script:
        "../scripts/shard.py"
