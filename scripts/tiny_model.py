from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate(wait=True)  # in the workflow's warm worker when it serves this job (#17)
from lorapipe.families import family_named
from lorapipe.logs import setup

log = setup(snakemake.log[0])
p = snakemake.params
out = family_named(p.family).build_tiny(p.path, seed=p.seed)
log.info("tiny %s-shaped model written to %s (seed %d)", p.family, out, p.seed)
