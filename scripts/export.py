from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate()  # in the warm worker if it is ready (#17)
from pathlib import Path

from lorapipe.export import export_kohya
from lorapipe.logs import setup
from lorapipe.runs import export_metadata, model_configs, read_run_config

log = setup(snakemake.log[0])
i = snakemake.input
# Facts train_summary.json may lack come from the train stage's metrics.jsonl (times) and the
# shards' index files (buckets), where this job sees them (see runs.train_facts).
metrics = Path(i.summary).with_name("metrics.jsonl")
indexes = [c.replace("/captions/", "/shards/") for c in i.captions]
run_cfg, extra = export_metadata(i.config, i.summary, metrics, indexes)
# kohya's SDXL names follow the UNet's block layout: read from the base model's UNet config
bm = read_run_config(i.config, context=True)["base_model"]
unet_config = model_configs(bm["path"], bm.get("original_config")).get("unet")
n = export_kohya(
    i.lora, snakemake.output[0], run_cfg, extra, list(i.captions), snakemake.params.dataset,
    unet_config=unet_config,
)  # fmt: skip
log.info("kohya file with %d tensors: %s", n, snakemake.output[0])
