"""kohya export: keys, alpha, metadata, and that diffusers loads it to the same image."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from lorapipe.config import load_config, load_yaml, resolve_run
from lorapipe.export import export_kohya, kohya_state_dict, read_alpha

REPO = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: a dropped alpha shows as a wrong strength
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PROMPT = "a picture in lorapipe style"
EXTRA = {"lorapipe_run": "demo", "lorapipe_fingerprint": "f" * 64, "ss_steps": "12"}


def run_cfg() -> dict:
    cfg = load_yaml(REPO / "config" / "config.yaml")
    load_config(cfg, check_files=False)
    run = resolve_run(cfg, "demo")
    return dataclasses.replace(run, lora_rank=RANK, lora_alpha=ALPHA).to_dict()


def save_trained_lora(model: Path, out_dir: Path, cfg: dict, metadata: bool = True) -> Path:
    """A trained-looking LoRA saved exactly as train.py saves it (non-zero lora_B, seeded)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from lorapipe.models import adapter_metadata, lora_config

    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    lcfg = lora_config(cfg["lora_rank"], cfg["lora_alpha"], cfg["target_modules"])
    unet.add_adapter(lcfg)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    lora = {k: v.detach().float().cpu().contiguous() for k, v in lora.items()}
    kw = {"unet_lora_adapter_metadata": adapter_metadata(lcfg)} if metadata else {}
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=lora, **kw)
    return out_dir / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model) -> dict:
    d = tmp_path_factory.mktemp("lora")
    cfg = run_cfg()
    diffusers_file = save_trained_lora(tiny_model, d, cfg)
    captions = d / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"caption": c}) + "\n" for c in ("a, b", "a, c", "lorapipe"))
    )
    kohya_file = d / "demo.safetensors"
    n = export_kohya(diffusers_file, kohya_file, cfg, EXTRA, [str(captions)], "demo")
    return {"dir": d, "diffusers": diffusers_file, "kohya": kohya_file, "n": n, "cfg": cfg}


def read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def render(pipe):
    import torch

    gen = torch.Generator().manual_seed(7)
    out = pipe(PROMPT, height=64, width=64, num_inference_steps=4, generator=gen, output_type="np")
    return out.images[0]


def lora_scalings(unet) -> list[float]:
    return [v for m in unet.modules() if getattr(m, "scaling", None) for v in m.scaling.values()]


@pytest.fixture(scope="module")
def rendered(exported, tiny_model) -> dict:
    """Images of the base model, base + diffusers file, base + kohya file (one pipeline)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = {"base": render(pipe)}
    for kind, name in (("diffusers", exported["diffusers"].name), ("kohya", "demo.safetensors")):
        pipe.load_lora_weights(str(exported["dir"]), weight_name=name)
        out[f"{kind}_scalings"] = lora_scalings(pipe.unet)
        out[kind] = render(pipe)
        pipe.unload_lora_weights()
    out["unloaded"] = render(pipe)
    return out


def test_kohya_keys_and_alpha(exported):
    tensors, _ = read(exported["kohya"])
    assert exported["n"] == len(tensors)
    for key in tensors:
        assert key.startswith("lora_unet_"), key
        assert key.endswith(KOHYA_SUFFIXES), key
    modules = {k.split(".", 1)[0] for k in tensors}
    assert len(tensors) == 3 * len(modules)
    for m in modules:
        assert tensors[f"{m}.alpha"].item() == ALPHA  # the trained alpha, not the rank
        assert tensors[f"{m}.lora_down.weight"].shape[0] == RANK
        assert tensors[f"{m}.lora_up.weight"].shape[1] == RANK
    # Same weights as the diffusers file, module for module.
    src, _ = read(exported["diffusers"])
    assert 2 * len(modules) == len(src)
    for key, value in src.items():
        module, kind = key.removeprefix("unet.").rsplit(".lora.", 1)
        kohya_kind = {"down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}[kind]
        assert tensors[f"lora_unet_{module.replace('.', '_')}.{kohya_kind}"].equal(value)


def test_kohya_metadata_is_strings_only(exported):
    _, meta = read(exported["kohya"])  # safe_open: a safetensors file, no pickle
    assert exported["kohya"].read_bytes()[:2] != b"\x80\x04"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8"
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_tag_frequency"]) == {"demo": {"a": 2, "b": 1, "c": 1, "lorapipe": 1}}
    for k, v in EXTRA.items():
        assert meta[k] == v
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8


def test_lora_changes_the_image_and_kohya_matches_diffusers(rendered):
    import numpy as np

    base, d, k = rendered["base"], rendered["diffusers"], rendered["kohya"]
    assert np.abs(d - base).max() > 0.05  # the LoRA does something
    assert np.abs(k - base).max() > 0.05
    assert np.abs(d - k).max() < 1e-3  # and the kohya file does the same thing
    assert np.abs(rendered["unloaded"] - base).max() < 1e-5


def test_both_files_load_at_alpha_over_rank(rendered, exported, tiny_model):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    n_modules = exported["n"] // 3
    for kind in ("diffusers", "kohya"):
        assert rendered[f"{kind}_scalings"] == [ALPHA / RANK] * n_modules, kind
    # Reference: the LoRA merged by hand, W + alpha/r * up @ down, into a plain pipeline.
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    tensors, _ = read(exported["diffusers"])
    with torch.no_grad():
        for key, down in tensors.items():
            if key.endswith(".lora.down.weight"):
                module = key.removeprefix("unet.").removesuffix(".lora.down.weight")
                up = tensors[key.replace(".lora.down.", ".lora.up.")]
                pipe.unet.get_submodule(module).weight += ALPHA / RANK * (up @ down)
    assert np.abs(render(pipe) - rendered["diffusers"]).max() < 1e-3


def test_missing_adapter_metadata_is_refused(tmp_path, tiny_model):
    f = save_trained_lora(tiny_model, tmp_path, run_cfg(), metadata=False)
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        export_kohya(f, tmp_path / "out.safetensors", run_cfg(), {})
    assert not (tmp_path / "out.safetensors").exists()


META = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4})}


def lora_pair(prefix: str, rank: int = 4) -> dict:
    import torch

    return {
        f"{prefix}.lora.down.weight": torch.zeros(rank, 8),
        f"{prefix}.lora.up.weight": torch.zeros(8, rank),
    }


@pytest.mark.parametrize(
    "key",
    [
        "unet.down_blocks.0.attentions.0.proj_in.weight",
        "unet.down_blocks.0.lora_magnitude_vector",
        "vae.encoder.conv_in.lora.down.weight",
        "lora_unet_x.lora_down.weight",
        "unet..lora.down.weight",
    ],
)
def test_key_that_is_not_a_lora_weight_is_named(key):
    import torch

    tensors = {**lora_pair("unet.mid_block.attn.to_q"), key: torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="unexpected key") as e:
        kohya_state_dict(tensors, META)
    assert repr(key) in str(e.value)


def test_half_a_pair_or_a_wrong_rank_is_refused():
    import torch

    with pytest.raises(ValueError, match="only one of"):
        kohya_state_dict({"unet.a.lora.down.weight": torch.zeros(4, 8)}, META)
    with pytest.raises(ValueError, match="rank"):
        kohya_state_dict(lora_pair("unet.a", rank=2), META)


def test_text_encoder_and_peft_style_keys():
    import torch

    meta = {
        "lora_adapter_metadata": json.dumps(
            {"unet.lora_alpha": 8, "unet.r": 4, "text_encoder.lora_alpha": 2, "text_encoder.r": 4}
        )
    }
    tensors = {
        **lora_pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
        "unet.mid_block.to_out.0.lora_A.weight": torch.zeros(4, 8),
        "unet.mid_block.to_out.0.lora_B.weight": torch.zeros(8, 4),
    }
    sd = kohya_state_dict(tensors, meta)
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0
    assert sd["lora_unet_mid_block_to_out_0.alpha"].item() == 8.0
    assert "lora_unet_mid_block_to_out_0.lora_up.weight" in sd


def test_read_alpha_variants():
    def meta(**kw):
        return {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4, **kw})}

    assert read_alpha(meta()) == (8.0, 4)
    assert read_alpha(meta(**{"unet.use_rslora": True})) == (8.0 * math.sqrt(4), 4)
    with pytest.raises(ValueError, match="DoRA"):
        read_alpha(meta(**{"unet.use_dora": True}))
    with pytest.raises(ValueError, match="alpha_pattern"):
        read_alpha(meta(**{"unet.alpha_pattern": {"to_q": 16}}))
    with pytest.raises(ValueError, match="text_encoder"):
        read_alpha(meta(), "text_encoder")
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        read_alpha({"format": "pt"})


def test_export_metadata_traces_the_run_and_its_mlflow_run(tmp_path):
    import yaml

    from lorapipe.runs import export_metadata, file_metadata

    fps = {k: k[0] * 64 for k in ("run", "config", "dataset_manifest", "base_model", "code")}
    doc = {
        "run": {"name": "demo", "lora_rank": 4},
        "dataset": {"name": "d", "resolution": 64, "buckets": True},
        "base_model": {"path": "results/models/tiny-sd"},
        "fingerprints": fps,
        "git": {"commit": "abc"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    summary = {"steps": 12, "epochs": 3, "mlflow_run_id": "0123abcd"}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    run, extra = export_metadata(str(tmp_path / "config.yaml"), str(tmp_path / "s.json"))
    assert run == doc["run"]
    assert extra["lorapipe_mlflow_run_id"] == "0123abcd"
    assert extra["lorapipe_fingerprint"] == fps["run"] and extra["lorapipe_git_commit"] == "abc"
    assert (extra["ss_steps"], extra["ss_epoch"], extra["ss_resolution"]) == ("12", "3", "(64, 64)")
    assert extra["ss_sd_model_name"] == "tiny-sd"
    assert file_metadata(doc).items() <= extra.items()
    # no MLflow run (live tracking off, store unreachable): no key, rather than an empty one
    (tmp_path / "s.json").write_text(json.dumps({**summary, "mlflow_run_id": None}))
    _, extra = export_metadata(str(tmp_path / "config.yaml"), str(tmp_path / "s.json"))
    assert "lorapipe_mlflow_run_id" not in extra


def test_diffusers_text_encoder_keys_get_kohya_sd1_names():
    """A diffusers file with transformers 5's text-encoder names (no ``text_model`` level: what
    lorapipe wrote before issue 14, and what diffusers writes for transformers 5's
    CLIPTextModel) still exports: kohya's SD-1.x names have that level."""
    import torch

    from lorapipe.export import kohya_metadata

    meta = {"lora_adapter_metadata": json.dumps(
        {"unet.lora_alpha": 8, "unet.r": 4, "text_encoder.lora_alpha": 8, "text_encoder.r": 4}
    )}  # fmt: skip
    te = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
    tensors = {
        **lora_pair("unet.mid_block.attn.to_q"),
        f"{te}.down.weight": torch.zeros(4, 8),
        f"{te}.up.weight": torch.zeros(8, 4),
    }
    sd = kohya_state_dict(tensors, meta)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(sd)
    cfg = run_cfg()  # an older run config (no text-encoder keys) still exports
    cfg.pop("train_text_encoder"), cfg.pop("text_encoder_lr")
    assert kohya_metadata(cfg, {}, {})["ss_text_encoder_lr"] == "0"
    assert kohya_metadata(cfg, {}, {}, text_encoder=True)["ss_text_encoder_lr"] == str(
        cfg["learning_rate"]
    )
    cfg["text_encoder_lr"] = 5e-5
    assert kohya_metadata(cfg, {}, {}, text_encoder=True)["ss_text_encoder_lr"] == "5e-05"
