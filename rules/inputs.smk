# Inputs the workflow can make itself: tiny base models built from code and synthetic datasets.
# One rule per configured entry (rules made in a loop), so their outputs are plain file lists.

for _name, _bm in MODELS.items():
    if "tiny" not in _bm:
        continue

    rule:
        name:
            f"tiny_model_{_name}"
        output:
            model_files(_name, None),
        log:
            f"logs/tiny_model/{_name}.log",
        conda:
            ENV
        params:
            path=first_output_dir,
            seed=_bm["tiny"]["seed"],
            family=PLAN.family(_name).name,
            code=script_code("tiny_model"),
            libs=LIBS_TORCH,
        script:
            "../scripts/tiny_model.py"


for _name, _ds in DATASETS.items():
    if "synthetic" not in _ds:
        continue

    rule:
        name:
            f"demo_data_{_name}"
        output:
            [f"{_ds['path']}/{f}" for f in demo_files(_ds["synthetic"]["images"])],
        log:
            f"logs/demo_data/{_name}.log",
        conda:
            ENV
        params:
            path=first_output_dir,
            images=_ds["synthetic"]["images"],
            seed=_ds["synthetic"]["seed"],
            code=script_code("demo_data"),
        script:
            "../scripts/demo_data.py"
