rule sample_base:
    """The base model's row of sample grids (no LoRA): one image per validation prompt, seeded
    as in rule sample. Named by the base model and a digest of the prompts, steps, size and
    seed (lorapipe.planning.sample_base): every run that draws the same row shares it, so a
    changed learning rate or each run of a sweep draws only its LoRA rows. It needs no LoRA, so
    it can run while training does; its priority lets training go first where both do not fit.
    """
    input:
        model=get_sample_base_model_files,
        vae=get_sample_base_vae_files,
    output:
        "results/samples/{model}/base-{key}.png",
    log:
        "logs/sample_base/{model}/{key}.log",
    benchmark:
        "benchmarks/sample_base/{model}/{key}.tsv"
    priority: -1
    conda:
        ENV
    threads: 2
    params:
        model_path=get_model_path,
        original_config=get_original_config,
        vae=get_vae,
        settings=get_sample_base_settings,
        libraries=LIBS_TORCH,
        code=script_code("sample_base"),
    script:
        "../scripts/sample_base.py"


rule sample:
    """A run's sample grids from one pipeline load: samples.png (validation prompts; top row the
    base model, bottom row base + LoRA) and samples/step-NNNNNN.png, the same grid for every
    saved step (from the exports training wrote in results/checkpoints/) and the final one. The
    base row comes from rule sample_base. Only for runs with validation prompts while
    `sample_grids` is on (lorapipe.planning).
    """
    input:
        base=get_run_sample_base,
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
