from lorapipe.captions import report_unmatched
from lorapipe.io import integrity_param

# A captions.csv row that matches no image (a typo, a case difference) would be dropped without a
# word: each is named while the plan is made, with the closest image, and listed in
# results/<dataset>/captions_unmatched.tsv. A captions.csv that cannot be read stops the plan.
if workflow.is_main_process:
    for _name, _ds in DATASETS.items():
        if "synthetic" in _ds:
            continue
        try:
            report_unmatched(
                _ds["path"],
                f"results/{_name}/captions_unmatched.tsv",
                write=not workflow.dryrun,
            )
        except ValueError as e:
            raise WorkflowError(str(e)) from None


rule caption:
    """Captions for one shard: edits and sidecars win, then the content-addressed cache."""
    input:
        manifest="results/{dataset}/manifest/{shard}.jsonl",
        manifest_sha256="results/{dataset}/manifest/{shard}.jsonl.sha256",
        sidecars=get_shard_sidecars,
    output:
        jsonl="results/{dataset}/captions/{shard}.jsonl",
        sha256="results/{dataset}/captions/{shard}.jsonl.sha256",
    log:
        "logs/caption/{dataset}/{shard}.log",
    conda:
        ENV
    params:
        root=get_root,
        settings=get_caption_settings,
        overrides=get_shard_overrides,
        sidecars=get_shard_sidecar_stamp,
        cache="results/cache/captions",
        code=script_code("caption"),
        integrity=integrity_param("results/{dataset}/captions/{shard}.jsonl", workflow),
    script:
        "../scripts/caption.py"


# `snakemake captions_<dataset>`: caption a dataset without training, then review one file.
for _name in DATASETS:

    rule:
        name:
            f"captions_{_name}"
        input:
            expand(
                "results/{dataset}/captions/{shard}.jsonl",
                dataset=_name,
                shard=shard_ids(_name),
            ),
        output:
            csv=f"results/{_name}/captions_review.csv",
        log:
            f"logs/captions_review/{_name}.log",
        conda:
            ENV
        params:
            code=script_code("captions_review"),
        script:
            "../scripts/captions_review.py"
