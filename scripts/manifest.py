from lorapipe.logs import setup
from lorapipe.manifest import ScanSettings, scan_shard

log = setup(snakemake.log[0])
p = snakemake.params
counts = scan_shard(p.root, list(p.files), ScanSettings(**p.settings), snakemake.output.jsonl,
                    p.cache, checksum=True)
log.info("scanned %d files: %s", len(p.files), counts)
