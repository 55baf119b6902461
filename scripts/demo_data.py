from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.demo import make_demo_dataset
from lorapipe.logs import setup

log = setup(snakemake.log[0])
p = snakemake.params
files = make_demo_dataset(p.path, images=p.images, seed=p.seed)
log.info("synthetic dataset: %d files written to %s", len(files), p.path)
