import torch

from lorapipe.captions import VariantSettings
from lorapipe.latents import encode_shard
from lorapipe.io import localized
from lorapipe.logs import setup

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
i = snakemake.input
encode_shard(
    i.tar,
    localized(p.model_path, i),
    snakemake.output.tar,
    p.batch_size,
    p.dtype,
    checksum=True,
    original_config=localized(p.original_config, i),
    variants=VariantSettings(**p.variants),
)
