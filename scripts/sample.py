from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate(wait=True)  # in the workflow's warm worker when it serves this job (#17)
import json

import torch

from lorapipe.io import localized
from lorapipe.logs import setup
from lorapipe.runs import read_run_config
from lorapipe.sampling import render_run_samples
from lorapipe.training.checkpoints import Layout

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
i, o, p = snakemake.input, snakemake.output, snakemake.params
run, fingerprint = read_run_config(i.config)
doc = read_run_config(i.config, context=True)
summary = json.loads(open(i.summary).read())
render_run_samples(
    localized(p.model_path, i),
    i.lora.rsplit("/", 1)[0],
    Layout.of_summary(p.checkpoints, fingerprint, summary).exports,
    list(run.validation_prompts),
    o.grid,
    o.steps,
    summary["steps"],
    run.validation_steps,
    doc["dataset"]["resolution"],
    run.seed,
    doc["base_model"].get("original_config"),
    localized(p.vae, i),
    base_png=i.base,
)
