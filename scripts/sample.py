import torch

from lorapipe.io import localized
from lorapipe.logs import setup
from lorapipe.runs import read_run_config
from lorapipe.sampling import render_samples

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
run, _ = read_run_config(snakemake.input.config)
doc = read_run_config(snakemake.input.config, context=True)
render_samples(
    localized(snakemake.params.model_path, snakemake.input),
    snakemake.input.lora.rsplit("/", 1)[0],
    list(run.validation_prompts),
    snakemake.output[0],
    run.validation_steps,
    doc["dataset"]["resolution"],
    run.seed,
    doc["base_model"].get("original_config"),
)
