from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.logs import setup
from lorapipe.manifest import duplicates, merge_manifests, read_jsonl

log = setup(snakemake.log.main)
out = snakemake.output
try:
    counts = merge_manifests(
        list(snakemake.input),
        out.manifest,
        out.rejected,
        keep_copy=snakemake.log.rejected,
        dataset=snakemake.wildcards.dataset,
    )
except ValueError as e:
    log.error("%s", e)  # the job's log survives its failure (its outputs do not)
    raise
log.info("dataset: %d valid, %d rejected (see %s)", counts["ok"], counts["rejected"], out.rejected)
for group in duplicates(read_jsonl(out.manifest)):
    log.warning("same bytes, trained on %d times: %s", len(group), ", ".join(group))
