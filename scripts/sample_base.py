from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate(wait=True)  # in the workflow's warm worker when it serves this job (#17)
import torch

from lorapipe.io import localized
from lorapipe.logs import setup
from lorapipe.sampling import render_base_row

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
i, p = snakemake.input, snakemake.params
s = p.settings
render_base_row(
    localized(p.model_path, i),
    s["prompts"],
    snakemake.output[0],
    s["steps"],
    s["size"],
    s["seed"],
    localized(p.original_config, i),
    localized(p.vae, i),
)
log.info("base row of %d prompt(s): %s", len(s["prompts"]), snakemake.output[0])
