from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.captions import merge_captions
from lorapipe.logs import setup

log = setup(snakemake.log[0])
counts = merge_captions(list(snakemake.input), snakemake.output.csv)
log.info("%d captions by source %s in %s", sum(counts.values()), dict(sorted(counts.items())),
         snakemake.output.csv)
