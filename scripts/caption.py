from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.captions import CaptionSettings, caption_shard
from lorapipe.io import localized
from lorapipe.logs import setup

log = setup(snakemake.log[0])
p = snakemake.params
counts = caption_shard(
    localized(p.root, snakemake.input),
    snakemake.input.manifest,
    CaptionSettings(**p.settings),
    p.cache,
    snakemake.output.jsonl,
    overrides=dict(p.overrides),
    checksum=True,
    dataset=snakemake.wildcards.dataset,
)
