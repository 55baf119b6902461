from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.io import localized
from lorapipe.logs import setup
from lorapipe.manifest import ScanSettings, scan_shard

log = setup(snakemake.log[0])
p = snakemake.params
counts = scan_shard(
    localized(p.root, snakemake.input),
    list(p.files),
    ScanSettings(**p.settings),
    snakemake.output.jsonl,
    p.cache,
    checksum=True,
)
log.info("scanned %d files: %s", len(p.files), counts)
