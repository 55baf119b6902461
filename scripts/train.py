import torch

from lorapipe.logs import setup
from lorapipe.runs import read_run_config
from lorapipe.train import train

log = setup(snakemake.log[0], echo=True)
torch.set_num_threads(snakemake.threads)
run, fingerprint = read_run_config(snakemake.input.config)
out_dir = snakemake.output.lora.rsplit("/", 1)[0]
summary = train(run, list(snakemake.input.latents), snakemake.params.model_path, out_dir,
                snakemake.params.checkpoints, fingerprint)
log.info("done: %s", summary)
