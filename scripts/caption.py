from lorapipe.captions import CaptionSettings, caption_shard
from lorapipe.logs import setup

log = setup(snakemake.log[0])
p = snakemake.params
counts = caption_shard(
    p.root, snakemake.input.manifest, CaptionSettings(**p.settings), p.cache,
    snakemake.output.jsonl, overrides=dict(p.overrides), checksum=True,
)
