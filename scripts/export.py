from lorapipe.export import export_kohya
from lorapipe.logs import setup
from lorapipe.runs import export_metadata

log = setup(snakemake.log[0])
i = snakemake.input
run_cfg, extra = export_metadata(i.config, i.summary)
n = export_kohya(i.lora, snakemake.output[0], run_cfg, extra, list(i.captions), snakemake.params.dataset)
log.info("kohya file with %d tensors: %s", n, snakemake.output[0])
