from lorapipe.io import integrity_param


rule manifest:
    """Scan one shard: sha256, full decode, validation. Bad files are recorded, never fatal."""
    input:
        images=get_shard_generated_images,
    output:
        jsonl="results/{dataset}/manifest/{shard}.jsonl",
        sha256="results/{dataset}/manifest/{shard}.jsonl.sha256",
    log:
        "logs/manifest/{dataset}/{shard}.log",
    conda:
        ENV
    params:
        root=get_root,
        files=get_shard_relpaths,
        # the images are read but not declared (see rules/common.smk): this restales the shard
        stamp=get_shard_stamp,
        settings=get_scan_settings,
        cache="results/cache/scan/{dataset}/{shard}.jsonl",
        code=script_code("manifest"),
        pil=LIBS_IMAGE,
        # changes when the output was damaged after it was written: rebuilds it (lorapipe.io)
        integrity=integrity_param("results/{dataset}/manifest/{shard}.jsonl", workflow),
    script:
        "../scripts/manifest.py"


rule merge_manifest:
    """Dataset-wide views (manifest.jsonl, rejected.tsv); no per-shard job reads them."""
    input:
        get_dataset_manifests,
    output:
        manifest="results/{dataset}/manifest.jsonl",
        rejected="results/{dataset}/rejected.tsv",
    log:
        "logs/merge_manifest/{dataset}.log",
    conda:
        ENV
    params:
        code=script_code("merge_manifest"),
    script:
        "../scripts/merge_manifest.py"
