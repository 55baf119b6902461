from lorapipe.config import check_yaml_files
from lorapipe.io import integrity_param

# Snakemake reads each --configfile leniently (a key given twice: the last one silently wins);
# read them again strictly, so a duplicate key stops the plan naming the file and the line.
try:
    check_yaml_files(workflow.configfiles)
except lpconfig.ConfigError as e:
    raise WorkflowError(str(e)) from None


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
        # an image rewritten in place with the same size and mtime: also restales the shard
        rescan=get_shard_rescan,
        settings=get_scan_settings,
        cache=SCAN_CACHE,
        code=script_code("manifest"),
        pil=LIBS_IMAGE,
        # changes when the output was damaged after it was written: rebuilds it (lorapipe.io)
        integrity=integrity_param("results/{dataset}/manifest/{shard}.jsonl", workflow),
    script:
        "../scripts/manifest.py"


rule merge_manifest:
    """Dataset-wide views (manifest.jsonl, rejected.tsv); no per-shard job reads them.

    A copy of rejected.tsv is a log, so it survives when the job fails because no image is valid.
    """
    input:
        get_dataset_manifests,
    output:
        manifest="results/{dataset}/manifest.jsonl",
        rejected="results/{dataset}/rejected.tsv",
    log:
        main="logs/merge_manifest/{dataset}.log",
        rejected="logs/merge_manifest/{dataset}.rejected.tsv",
    conda:
        ENV
    params:
        code=script_code("merge_manifest"),
    script:
        "../scripts/merge_manifest.py"
