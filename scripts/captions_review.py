from lorapipe.captions import merge_captions
from lorapipe.logs import setup

log = setup(snakemake.log[0])
counts = merge_captions(list(snakemake.input), snakemake.output.csv)
log.info("%d captions by source %s in %s", sum(counts.values()), dict(sorted(counts.items())),
         snakemake.output.csv)
