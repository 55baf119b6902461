from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate(wait=True, late=True)  # in the warm worker, once it has mlflow and matplotlib (#17)
import os

import torch

from lorapipe.io import localized
from lorapipe.logs import setup
from lorapipe.runs import export_run, train_run

log = setup(snakemake.log[0], echo=True)
torch.set_num_threads(snakemake.threads)
p = snakemake.params
mlflow = {"uri": p.mlflow_uri, "experiment": p.mlflow_experiment, **p.mlflow_live}
out_dir = snakemake.output.lora.rsplit("/", 1)[0]
i = snakemake.input
summary = train_run(
    i.config, list(i.latents), localized(p.model_path, i), out_dir, p.checkpoints, mlflow,
    val_latents=list(i.val_latents),  # a validation_dataset's latent shards (else none)
    vae=localized(p.vae, i),  # the base model's VAE override folder (else None)
)
log.info("done: %s", summary)
# The kohya-layout file (WebUI/ComfyUI), in this job: a job of its own cost ~0.5 s a run (#17).
if os.environ.get("RANK", "0") == "0":  # under torchrun, one process writes
    o = snakemake.output
    n = export_run(i.config, o.lora, o.summary, list(i.captions), o.kohya, p.dataset)
    log.info("kohya file with %d tensors: %s", n, o.kohya)
