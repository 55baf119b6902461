rule track:
    """Log the run to MLflow: params, step metrics, artifacts (the sample grids when the run has
    them), fingerprints."""
    input:
        unpack(get_track_inputs),
    output:
        "results/runs/{run}/mlflow.json",
    log:
        "logs/track/{run}.log",
    benchmark:
        "benchmarks/track/{run}.tsv"
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
