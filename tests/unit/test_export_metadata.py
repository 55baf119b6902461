"""kohya and ModelSpec metadata of the exported files, filled from what the run did (issue 14,
item 3): the fields and forms of sd-scripts' ``train_network.py`` and
``library/sai_model_spec.py``, the ones AUTOMATIC1111 shows and sorts by, the mixed precision
used (not ``auto``), SD-2 and v-prediction models labelled as such, tags counted lower-cased,
and no absolute path of the training machine unless the run asks for it."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import pytest
from test_export import read, run_cfg

from lorapipe.export import architecture_metadata

FINISHED = 1754000000.25  # the last step's time in metrics.jsonl
SUMMARY = {"steps": 12, "epochs": 3, "precision": "bf16", "samples": 5, "processes": 2,
           "wall_s": 30.0, "mlflow_run_id": None}  # fmt: skip
# the shards' index rows: bucket size and original size of each trained image
INDEX = [{"size": [64, 64], "original_size": [100, 100]}] * 3 + [
    {"size": [80, 48], "original_size": [160, 90]}
] * 2
CAPTIONS = ["MyCat, Sofa", "mycat, sofa, Red", "mycat"]


@pytest.mark.parametrize(
    "dim, prediction, version, arch, pred",
    [
        (768, "epsilon", "sd_v1", "stable-diffusion-v1", "epsilon"),
        (768, "v_prediction", "sd_v1_v", "stable-diffusion-v1", "v"),
        (1024, "epsilon", "sd_v2", "stable-diffusion-v2-512", "epsilon"),
        (1024, "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v", "v"),
        (32, None, "sd_v1", "stable-diffusion-v1", "epsilon"),  # the tiny SD-1-shaped model
    ],
)
def test_architecture_labels_as_sd_scripts_writes_them(dim, prediction, version, arch, pred):
    sched = {"prediction_type": prediction} if prediction else {}
    got = architecture_metadata({"cross_attention_dim": dim}, sched)
    assert got == {
        "ss_v2": str(dim == 1024),
        "ss_base_model_version": version,
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.prediction_type": pred,
    }
    assert architecture_metadata({}, sched) == {}  # nothing known: nothing guessed


def a1111_sd_version(meta: dict) -> str:
    """How AUTOMATIC1111's Lora extension (network.py, NetworkOnDisk.detect_version) reads it."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def write_model(folder: Path, dim: int, prediction: str) -> Path:
    """A base model's configs (no weights needed for the metadata)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": dim}))
    sched = {"prediction_type": prediction, "num_train_timesteps": 1000}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return folder


def write_lora(path: Path) -> Path:
    """A diffusers-layout LoRA file (one module, rank 4, alpha 8)."""
    import torch

    from lorapipe.io import save_safetensors

    m = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{m}.lora.down.weight": torch.ones(4, 8), f"{m}.lora.up.weight": torch.ones(8, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, meta)
    return path


def make_run(work: Path, model: str = "models/sd2v", **run_over) -> dict:
    """A finished run's files, as the stages leave them, in workdir ``work`` (relative paths,
    as in a real config)."""
    from lorapipe.runs import write_run_config

    os.chdir(work)
    if not Path(model).exists():
        write_model(Path(model), 1024, "v_prediction")
    run = {**run_cfg(), "name": "cats", "dataset": "cats", "base_model": "sd2v",
           "mixed_precision": "auto", "lora_dropout": 0.1, **run_over}  # fmt: skip
    ds = {"name": "cats", "path": "data/cats", "resolution": 64, "bucket_step": 16,
          "buckets": True, "trigger": "mycat", "caption_variants": 2, "shuffle_captions": True,
          "keep_tokens": 1, "tag_dropout": 0.1}  # fmt: skip
    context = {"dataset": ds, "base_model": {"name": "sd2v", "path": model}, "libraries": {}}
    d = Path("results/runs/cats")
    d.mkdir(parents=True, exist_ok=True)
    Path("results/cats").mkdir(parents=True, exist_ok=True)
    manifest = Path("results/cats/manifest.jsonl")
    manifest.write_text('{"path": "a.png"}\n')
    write_run_config(run, context, "c0de", str(manifest), model, d / "config.yaml")
    (d / "train_summary.json").write_text(json.dumps(SUMMARY))
    metrics = [{"step": i, "loss": 0.1, "time": FINISHED - 12 + i} for i in range(1, 13)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for sub, rows in (("shards", INDEX), ("captions", [{"caption": c} for c in CAPTIONS])):
        Path(f"results/cats/{sub}").mkdir(exist_ok=True)
        Path(f"results/cats/{sub}/0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_lora(d / "pytorch_lora_weights.safetensors")
    return {"dir": d, "run": run}


def export(work: Path, **run_over) -> dict:
    """The kohya file the train stage's job writes once training ends (`runs.export_run`, from
    scripts/train.py) on a run made by `make_run`."""
    from lorapipe.runs import export_run

    r = make_run(work, **run_over)
    d = r["dir"]
    export_run(str(d / "config.yaml"), str(d / "pytorch_lora_weights.safetensors"),
               str(d / "train_summary.json"), ["results/cats/captions/0.jsonl"],
               str(d / "cats.safetensors"), "cats")  # fmt: skip
    return read(d / "cats.safetensors")[1]


def config_doc(base_model: dict) -> dict:
    """A minimal config.yaml document (square crops) with ``base_model``."""
    fps = {k: "0" * 64 for k in ("run", "config", "dataset_manifest", "base_model", "code")}
    return {"run": {"name": "r"}, "dataset": {"name": "d", "resolution": 64, "buckets": False},
            "base_model": base_model, "fingerprints": fps}  # fmt: skip


@pytest.fixture()
def work(tmp_path):
    cwd = os.getcwd()
    yield tmp_path
    os.chdir(cwd)


def test_fields_come_from_what_the_run_did(work):
    meta = export(work)
    # what training did (train_summary.json, metrics.jsonl, the shards' index)
    assert meta["ss_mixed_precision"] == "bf16"  # the precision used, not the setting "auto"
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == ("12", "3", "3")
    assert meta["ss_max_train_steps"] == "12"
    assert meta["ss_training_finished_at"] == str(FINISHED)
    assert float(meta["ss_training_started_at"]) == FINISHED - 30.0
    want_date = datetime.datetime.fromtimestamp(int(FINISHED), datetime.timezone.utc)
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]) == want_date
    assert meta["ss_num_train_images"] == "5" and meta["ss_num_reg_images"] == "0"
    assert json.loads(meta["ss_dataset_dirs"]) == {"cats": {"n_repeats": 1, "img_count": 5}}
    buckets = json.loads(meta["ss_bucket_info"])
    assert sorted((tuple(b["resolution"]), b["count"]) for b in buckets["buckets"].values()) == [
        ((64, 64), 3),
        ((80, 48), 2),
    ]
    err = (2 * abs(80 / 48 - 160 / 90)) / 5
    assert buckets["mean_img_ar_error"] == pytest.approx(err)
    assert meta["ss_total_batch_size"] == str(4 * 2 * 1)  # batch 4, 2 processes, accumulation 1
    assert meta["ss_num_batches_per_epoch"] == "2"  # ceil(3 / 8) + ceil(2 / 8)
    # the run's settings, in sd-scripts' forms
    adamw = "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08)"
    assert meta["ss_optimizer"] == adamw
    assert meta["ss_network_dropout"] == "0.1"
    assert json.loads(meta["ss_network_args"])["target_modules"] == "to_q,to_k,to_v,to_out.0"
    assert meta["ss_clip_skip"] == "1" and meta["ss_cache_latents"] == "True"
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"]) == ("True", "1")
    assert meta["ss_caption_tag_dropout_rate"] == "0.1"
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("48", "80")
    assert meta["ss_session_id"].isdigit() and int(meta["ss_session_id"]) < 2**32
    # tags lower-cased, as sd-scripts counts them
    assert json.loads(meta["ss_tag_frequency"]) == {"cats": {"mycat": 3, "red": 1, "sofa": 2}}


def test_sd2_v_prediction_model_is_labelled_so(work):
    meta = export(work)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert a1111_sd_version(meta) == "SD2"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "cats" == meta["ss_output_name"]
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_resolution"] == "(64, 64)"
    assert meta["modelspec.trigger_phrase"] == "mycat"


def test_sd1_model_is_labelled_so(work, tiny_model):
    from lorapipe.runs import file_metadata

    doc = config_doc({"path": str(tiny_model)})
    meta = file_metadata(doc)
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert a1111_sd_version(meta) == "SD1"
    assert "ss_min_bucket_reso" not in meta  # square crops: no buckets


def test_no_absolute_path_unless_the_run_asks(work):
    meta = export(work)
    here = os.getcwd()
    for k, v in meta.items():
        assert here not in v and not v.startswith("/"), k
    assert meta["ss_sd_model_name"] == "sd2v"
    meta = export(work, metadata_paths=True)
    assert meta["ss_sd_model_name"] == os.path.join(here, "models/sd2v")
    assert list(json.loads(meta["ss_dataset_dirs"])) == [os.path.join(here, "data/cats")]


def test_single_file_base_model_hashes_as_sd_scripts_computes_them(work):
    from lorapipe.runs import file_metadata

    os.chdir(work)
    data = os.urandom(0x100000 + 0x18000)
    Path("model.safetensors").write_bytes(data)
    write_model(Path("configs"), 768, "epsilon")
    doc = config_doc({"path": "model.safetensors", "original_config": "configs"})
    meta = file_metadata(doc)
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]  # WebUI's old hash
    assert meta["ss_sd_model_hash"] == legacy
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_base_model_version"] == "sd_v1"  # from the original_config folder
    assert meta["ss_sd_model_name"] == "model.safetensors"


def test_checkpoint_exports_carry_what_training_passes(tmp_path):
    """train.py's step exports: `export.train_metadata` of the step's facts in ``extra_meta``
    (precision, current epoch, times, images) give the same fields as the final file's."""
    import torch

    from lorapipe.export import export_checkpoint, train_metadata

    m = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    peft = {f"{m}.lora_A.weight": torch.ones(4, 8), f"{m}.lora_B.weight": torch.ones(8, 4)}
    cfg = run_cfg()
    facts = {"steps": 4, "epochs": 3, "epoch": 2, "precision": "fp16", "samples": 5,
             "processes": 1, "started_at": FINISHED - 9, "finished_at": FINISHED}  # fmt: skip
    extra = {"lorapipe_run": "demo", "lorapipe_dataset": "demo", **train_metadata(facts, cfg)}
    out = export_checkpoint(peft, {"r": 4, "lora_alpha": 8}, tmp_path / "step-000004", cfg,
                            extra, {"demo": {"x": 1}})  # fmt: skip
    _, meta = read(out / "demo-step000004.safetensors")
    assert meta["modelspec.title"] == meta["ss_output_name"] == "demo-step000004"
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == ("4", "2", "3")
    assert meta["ss_mixed_precision"] == "fp16"
    assert meta["ss_training_started_at"] == str(FINISHED - 9)
    assert json.loads(meta["ss_dataset_dirs"]) == {"demo": {"n_repeats": 1, "img_count": 5}}
    _, dmeta = read(out / "pytorch_lora_weights.safetensors")
    assert not any(k.startswith(("ss_", "modelspec.")) for k in dmeta)  # kohya fields: kohya only


def test_metadata_paths_is_a_run_key_of_the_config(tmp_path):
    """``runs.<name>.metadata_paths`` is a schema key (default false), so a user can ask for it."""
    from lorapipe.config import load_config, load_yaml, resolve_run

    cfg = load_yaml(Path(__file__).resolve().parents[2] / "config" / "config.yaml")
    load_config(cfg, check_files=False)
    assert resolve_run(cfg, "demo").metadata_paths is False
    cfg["runs"]["demo"]["metadata_paths"] = True
    load_config(cfg, check_files=False)
    assert resolve_run(cfg, "demo").to_dict()["metadata_paths"] is True
