from lorapipe.logs import setup
from lorapipe.runs import write_run_config

log = setup(snakemake.log[0])
p = snakemake.params
fp = write_run_config(
    p.run, p.context, p.code, snakemake.input.manifest, p.context["base_model"]["path"],
    snakemake.output[0], val_manifest=(list(snakemake.input.val_manifest) or [None])[0],
)
log.info("run %s: fingerprint %s", p.run["name"], fp)
