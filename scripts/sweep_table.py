from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.logs import setup
from lorapipe.sweeps import write_table

log = setup(snakemake.log[0])
p, out = snakemake.params, snakemake.output
rows = write_table(p.sweep, [(r, v) for r, v in p.runs], out.csv, out.html)
for r in rows:
    log.info("%d. %s: best val loss %s at step %s", r["rank"], r["run"], r["best_val_loss"],
             r["best_step"])
