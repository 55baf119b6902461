rule track:
    """Log the run to MLflow: params, step metrics, artifacts, fingerprints."""
    input:
        config="results/runs/{run}/config.yaml",
        metrics="results/runs/{run}/metrics.jsonl",
        lora="results/runs/{run}/pytorch_lora_weights.safetensors",
        kohya="results/runs/{run}/{run}.safetensors",
        samples="results/runs/{run}/samples.png",
        loss="results/runs/{run}/loss.png",
        summary="results/runs/{run}/train_summary.json",
        step_samples="results/runs/{run}/samples",
    output:
        "results/runs/{run}/mlflow.json",
    log:
        "logs/track/{run}.log",
    conda:
        ENV
    resources:
        mlflow_db=1,
    params:
        uri=get_mlflow_uri,
        experiment=config["mlflow"]["experiment"],
        code=script_code("track"),
    script:
        "../scripts/track.py"
