"""Sample grids per saved step: one pipeline for all steps, each grid the one `render_samples`
gives for that step's LoRA (no trace of the previous step), and the final grid copied in; the
sample stage's `render_run_samples` gives both from one pipeline, with the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorapipe.sampling import render_run_samples, render_samples, render_step_grids
from lorapipe.training.checkpoints import saved_exports

PROMPTS = ["a picture in lorapipe style", "a red square"]
KW = {"steps": 2, "size": 64, "seed": 5}


def save_lora(model: Path, out_dir: Path, seed: int) -> Path:
    """A trained-looking LoRA (seeded non-zero lora_B) saved the way training exports it."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from lorapipe.models import adapter_metadata, lora_config

    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    cfg = lora_config(4, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    lora = {k: v.detach().float().contiguous() for k, v in lora.items()}
    out_dir.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=lora, unet_lora_adapter_metadata=adapter_metadata(cfg)
    )
    return out_dir


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("exports")
    save_lora(tiny_model, root / "step-000002", seed=1)
    save_lora(tiny_model, root / "step-000004", seed=2)
    (root / ".step-000006.tmp").mkdir()  # an export a kill interrupted: never listed
    (root / "step-000008").mkdir()  # no LoRA file in it: not listed either
    return root


def test_saved_steps_lists_complete_exports_only(exports, tmp_path):
    assert list(saved_exports(exports)) == [2, 4]
    assert saved_exports(tmp_path / "missing") == {}


def test_step_grids_match_render_samples_and_end_with_the_final_grid(exports, tiny_model, tmp_path):
    final = tmp_path / "samples.png"  # the final grid, as rule sample draws it (any LoRA)
    render_samples(str(tiny_model), exports / "step-000002", PROMPTS, final, **KW)
    out = tmp_path / "samples"
    written = render_step_grids(str(tiny_model), exports, PROMPTS, out, final, 6, **KW)
    assert [p.name for p in written] == ["step-000002.png", "step-000004.png", "step-000006.png"]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in written]  # no temp left
    assert (out / "step-000006.png").read_bytes() == final.read_bytes()

    # the grid of step 4 is the one a fresh pipeline renders with step 4's LoRA alone
    alone = tmp_path / "alone.png"
    render_samples(str(tiny_model), exports / "step-000004", PROMPTS, alone, **KW)
    step2, step4 = pixels(out / "step-000002.png"), pixels(out / "step-000004.png")
    assert step4.shape == (128, 128, 3)
    assert np.array_equal(step4, pixels(alone))
    assert np.array_equal(step2[:64], step4[:64])  # same base row
    assert not np.array_equal(step2[64:], step4[64:])  # each step's own LoRA
    assert not np.array_equal(step4[:64], step4[64:])


def test_a_final_grid_of_another_shape_is_not_cut(exports, tiny_model, tmp_path):
    """samples.png of other prompts (another shape): the base row is drawn, not cut from it."""
    final = tmp_path / "samples.png"
    Image.new("RGB", (64, 128), "blue").save(final)
    out = tmp_path / "s"
    render_step_grids(str(tiny_model), exports, PROMPTS, out, final, 6, **KW)
    alone = tmp_path / "alone.png"
    render_samples(str(tiny_model), exports / "step-000002", PROMPTS, alone, **KW)
    assert np.array_equal(pixels(out / "step-000002.png"), pixels(alone))


def test_no_saved_step_gives_only_the_final_grid(tiny_model, tmp_path):
    final = tmp_path / "samples.png"
    Image.new("RGB", (64, 128), "blue").save(final)
    written = render_step_grids(str(tiny_model), tmp_path / "none", PROMPTS, tmp_path / "s",
                                final, 3, **KW)  # fmt: skip
    assert [p.name for p in written] == ["step-000003.png"]


def test_one_pipeline_for_the_final_and_step_grids_gives_the_same_bytes(
    exports, tiny_model, tmp_path
):
    """rule sample: `render_run_samples` = `render_samples`, then `render_step_grids`."""
    final_lora = exports / "step-000004"  # any LoRA as the final one
    want_png = tmp_path / "want.png"
    render_samples(str(tiny_model), final_lora, PROMPTS, want_png, **KW)
    want = render_step_grids(str(tiny_model), exports, PROMPTS, tmp_path / "want", want_png, 6,
                             **KW)  # fmt: skip
    got_png, got_dir = tmp_path / "samples.png", tmp_path / "samples"
    got = render_run_samples(str(tiny_model), final_lora, exports, PROMPTS, got_png, got_dir, 6,
                             **KW)  # fmt: skip
    assert got_png.read_bytes() == want_png.read_bytes()
    assert [p.name for p in got] == [p.name for p in want]
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in want]
