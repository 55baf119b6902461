from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.io import localized
from lorapipe.logs import setup
from lorapipe.shards import ShardSettings, write_shard

log = setup(snakemake.log[0])
p, i, o = snakemake.params, snakemake.input, snakemake.output
n = write_shard(
    localized(p.root, i),
    i.manifest,
    i.captions,
    ShardSettings(**p.settings),
    o.tar,
    o.index,
    checksum=True,
)
log.info("wrote %d samples to %s", n, o.tar)
