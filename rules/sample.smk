rule sample:
    """A run's sample grids from one pipeline load: samples.png (validation prompts; top row the
    base model, bottom row base + LoRA) and samples/step-NNNNNN.png, the same grid for every
    saved step (from the exports training wrote in results/checkpoints/) and the final one. Only
    for runs with validation prompts while `sample_grids` is on (lorapipe.planning).
    """
    input:
        lora="results/runs/{run}/pytorch_lora_weights.safetensors",
        config="results/runs/{run}/config.yaml",
        summary="results/runs/{run}/train_summary.json",
        model=get_run_model_files,
        vae=get_run_vae_files,
    output:
        grid=report(
            "results/runs/{run}/samples.png",
            caption="../report/samples.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "sample grid"},
        ),
        steps=directory("results/runs/{run}/samples"),
    log:
        "logs/sample/{run}.log",
    benchmark:
        "benchmarks/sample/{run}.tsv"
    conda:
        ENV
    threads: 2
    params:
        model_path=get_run_model_path,
        vae=get_run_vae,
        checkpoints="results/checkpoints/{run}",
        code=script_code("sample"),
    script:
        "../scripts/sample.py"
