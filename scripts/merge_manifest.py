from lorapipe.logs import setup
from lorapipe.manifest import merge_manifests

log = setup(snakemake.log[0])
out = snakemake.output
counts = merge_manifests(list(snakemake.input), out.manifest, out.rejected)
log.info("dataset: %d valid, %d rejected (see %s)", counts["ok"], counts["rejected"], out.rejected)
