import torch

from lorapipe.logs import setup
from lorapipe.runs import train_run

log = setup(snakemake.log[0], echo=True)
torch.set_num_threads(snakemake.threads)
p = snakemake.params
mlflow = {"uri": p.mlflow_uri, "experiment": p.mlflow_experiment, **p.mlflow_live}
out_dir = snakemake.output.lora.rsplit("/", 1)[0]
summary = train_run(snakemake.input.config, list(snakemake.input.latents), p.model_path, out_dir,
                    p.checkpoints, mlflow)
log.info("done: %s", summary)
