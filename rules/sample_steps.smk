rule sample_steps:
    """The sample grid of every saved step, as samples.png shows the final one (validation
    prompts and seeds; top row base model, bottom row base + that step's LoRA, from the exports
    training wrote in results/checkpoints/), plus the final grid: samples/step-NNNNNN.png.
    """
    input:
        config="results/runs/{run}/config.yaml",
        summary="results/runs/{run}/train_summary.json",
        samples="results/runs/{run}/samples.png",
        model=get_run_model_files,
    output:
        directory("results/runs/{run}/samples"),
    log:
        "logs/sample_steps/{run}.log",
    benchmark:
        "benchmarks/sample_steps/{run}.tsv"
    conda:
        ENV
    threads: 2
    params:
        model_path=get_run_model_path,
        checkpoints="results/checkpoints/{run}",
        code=script_code("sample_steps"),
    script:
        "../scripts/sample_steps.py"
