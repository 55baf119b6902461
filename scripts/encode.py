import torch

from lorapipe.captions import VariantSettings
from lorapipe.latents import encode_shard
from lorapipe.logs import setup

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
encode_shard(snakemake.input.tar, p.model_path, snakemake.output.tar, p.batch_size, p.dtype,
             checksum=True, original_config=p.original_config,
             variants=VariantSettings(**p.variants))
