# The best step of a validated run (lowest validation loss), and one table per sweep that ranks
# its runs (lorapipe.best, lorapipe.sweeps).


rule best:
    """results/runs/{run}/best/: the best step's files (its export, or the final files), linked."""
    input:
        summary="results/runs/{run}/train_summary.json",
        lora="results/runs/{run}/pytorch_lora_weights.safetensors",
        kohya="results/runs/{run}/{run}.safetensors",
    output:
        directory("results/runs/{run}/best"),
    log:
        "logs/best/{run}.log",
    conda:
        ENV
    params:
        code=script_code("best"),
    script:
        "../scripts/best.py"


# `snakemake sweep_<name>`: train and track every run of a sweep, then rank them in one table.
for _name, _runs in PLAN.sweeps().items():

    rule:
        name:
            f"sweep_{_name}"
        input:
            sweep_inputs(_runs),
        output:
            csv=f"results/sweeps/{_name}/runs.csv",
            html=f"results/sweeps/{_name}/runs.html",
        log:
            f"logs/sweep/{_name}.log",
        conda:
            ENV
        params:
            sweep=_name,
            runs=[[run, values] for run, values in _runs],
            code=script_code("sweep_table"),
        script:
            "../scripts/sweep_table.py"
