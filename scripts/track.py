from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate()  # in the warm worker if it is ready (#17)
from lorapipe.logs import setup
from lorapipe.runs import track_run

log = setup(snakemake.log[0])
i, p = snakemake.input, snakemake.params
run_id = track_run(i, p.uri, p.experiment, snakemake.output[0])
log.info("MLflow run %s", run_id)
