from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.best import write_best
from lorapipe.logs import setup

log = setup(snakemake.log[0])
i = snakemake.input
info = write_best(i.summary, snakemake.wildcards.run, i.lora, i.kohya, snakemake.output[0])
log.info("best step %s (val loss %s), from %s", info["step"], info["val_loss"], info["from"])
