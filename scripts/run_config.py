from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate()  # in the warm worker if it is ready (#17)
import os

# Locally this job takes no core (threads 0): it runs beside the encode job that has them all.
# Its first hash of a base model (sha256 of GBs) would take CPU from encode's threads, which wait
# on the slowest one (encode ran 1.28 s an image beside it against 0.65 s alone, #17): it yields.
niced = os.nice(10) if snakemake.threads == 0 else None
from lorapipe.logs import setup
from lorapipe.mlflow_store import ensure_sqlite_store, tracking_uri
from lorapipe.runs import write_run_config

log = setup(snakemake.log[0])
if niced is not None:
    log.info("beside the jobs that have the cores: CPU priority lowered by 10 (nice %d)", niced)
p = snakemake.params
fp = write_run_config(
    p.run, p.context, p.code, snakemake.input.manifest, p.context["base_model"]["path"],
    snakemake.output[0], val_manifest=(list(snakemake.input.val_manifest) or [None])[0],
    vae=p.context["base_model"].get("vae"),
)
log.info("run %s: fingerprint %s", p.run["name"], fp)
# A new sqlite MLflow store is made here, beside the data stages, not while train runs its first
# steps (the URI is read from the config, not a param: where runs are logged restales no run).
if ensure_sqlite_store(tracking_uri(snakemake.config["mlflow"]["tracking_uri"], os.getcwd())):
    log.info("created the MLflow store")
