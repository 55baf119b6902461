from lorapipe.logs import setup
from lorapipe.tiny import build_tiny_model

log = setup(snakemake.log[0])
out = build_tiny_model(snakemake.params.path, seed=snakemake.params.seed)
log.info("tiny SD-1.x-shaped model written to %s (seed %d)", out, snakemake.params.seed)
