rule run_config:
    """The resolved config of a run and its fingerprint (config + data + model + code)."""
    input:
        manifest=get_run_manifest,
        model=get_run_model_files,
    output:
        "results/runs/{run}/config.yaml",
    params:
        run=get_run_settings,
        context=get_run_context,
        code=code_version("train", "models", "latents", "config", "runs", "io"),
    log:
        "logs/run_config/{run}.log",
    conda:
        ENV
    script:
        "../scripts/run_config.py"


rule train:
    """LoRA training; checkpoints live in results/checkpoints/ (never deleted by a rerun)."""
    input:
        config="results/runs/{run}/config.yaml",
        latents=get_run_latents,
        model=get_run_model_files,
    output:
        lora="results/runs/{run}/pytorch_lora_weights.safetensors",
        metrics="results/runs/{run}/metrics.jsonl",
        loss="results/runs/{run}/loss.png",
        summary="results/runs/{run}/train_summary.json",
    params:
        model_path=get_run_model_path,
        checkpoints="results/checkpoints/{run}",
        code=code_version("train", "models", "latents", "config", "io"),
    threads: 2
    resources:
        mem_mb=8000,
        gpu=0,
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    conda:
        ENV
    script:
        "../scripts/train.py"


rule export:
    """The kohya-layout LoRA (WebUI/ComfyUI), named after the run, with ss_* metadata."""
    input:
        lora="results/runs/{run}/pytorch_lora_weights.safetensors",
        config="results/runs/{run}/config.yaml",
        summary="results/runs/{run}/train_summary.json",
        captions=get_run_captions,
    output:
        "results/runs/{run}/{run}.safetensors",
    params:
        dataset=get_run_dataset,
        code=code_version("export", "runs", "io"),
    log:
        "logs/export/{run}.log",
    conda:
        ENV
    script:
        "../scripts/export.py"


rule sample:
    """Sample grid: validation prompts with the base model (top) and with the LoRA (bottom)."""
    input:
        lora="results/runs/{run}/pytorch_lora_weights.safetensors",
        config="results/runs/{run}/config.yaml",
        model=get_run_model_files,
    output:
        "results/runs/{run}/samples.png",
    params:
        model_path=get_run_model_path,
        code=code_version("sampling", "models", "io"),
    threads: 2
    log:
        "logs/sample/{run}.log",
    conda:
        ENV
    script:
        "../scripts/sample.py"
