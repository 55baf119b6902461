"""Sample grids per saved step: one pipeline for all steps, each grid the one `render_samples`
gives for that step's LoRA (no trace of the previous step), and the final grid copied in; the
sample stage's `render_run_samples` gives both from one pipeline, with the same bytes, also when
its base row comes from `render_base_row` (stage sample_base), drawn in another process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorapipe.sampling import (
    render_base_row,
    render_run_samples,
    render_samples,
    render_step_grids,
)
from lorapipe.training.checkpoints import saved_exports

PROMPTS = ["a picture in lorapipe style", "a red square"]
KW = {"steps": 2, "size": 64, "seed": 5}


def save_lora(model: Path, out_dir: Path, seed: int, text_encoder: bool = False) -> Path:
    """A trained-looking LoRA (seeded non-zero lora_B) saved the way training exports it;
    ``text_encoder``: with a LoRA on the text encoder too."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from lorapipe.models import adapter_metadata, lora_config

    g = torch.Generator().manual_seed(seed)

    def trained(module, targets):
        cfg = lora_config(4, 8.0, targets)
        module.add_adapter(cfg)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        return {k: v.detach().float().contiguous() for k, v in layers.items()}, cfg

    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    lora, cfg = trained(unet, ["to_q", "to_k", "to_v", "to_out.0"])
    te = {}
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder")
        layers, te_cfg = trained(encoder, ["q_proj", "v_proj"])
        te = {"text_encoder_lora_layers": layers,
              "text_encoder_lora_adapter_metadata": adapter_metadata(te_cfg)}  # fmt: skip
    out_dir.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=lora, unet_lora_adapter_metadata=adapter_metadata(cfg), **te
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


def test_a_base_row_drawn_in_another_process_gives_the_same_grids(exports, tiny_model, tmp_path):
    """rule sample_base draws the base row in its own job; rule sample cuts it out of that PNG
    and draws only the LoRA rows: the grids are byte for byte the ones drawn in one process."""
    import subprocess
    import sys

    final_lora = exports / "step-000004"
    want_png, want_dir = tmp_path / "want.png", tmp_path / "want"
    want = render_run_samples(str(tiny_model), final_lora, exports, PROMPTS, want_png, want_dir, 6,
                              **KW)  # fmt: skip
    base_png = tmp_path / "base.png"
    code = (
        "import sys; from lorapipe.sampling import render_base_row as r; "
        f"r(sys.argv[1], {PROMPTS!r}, sys.argv[2], **{KW!r})"
    )
    subprocess.run([sys.executable, "-c", code, str(tiny_model), str(base_png)], check=True)
    assert Image.open(base_png).size == (64 * len(PROMPTS), 64)  # one row, one image a prompt
    assert (pixels(base_png) == pixels(want_png)[:64]).all()  # the grid's top row
    got_png, got_dir = tmp_path / "samples.png", tmp_path / "samples"
    got = render_run_samples(str(tiny_model), final_lora, exports, PROMPTS, got_png, got_dir, 6,
                             base_png=base_png, **KW)  # fmt: skip
    assert got_png.read_bytes() == want_png.read_bytes()
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in want]
    # and the row is taken from the file, not drawn again: a doctored one shows in every grid
    Image.fromarray(255 - pixels(base_png)).save(base_png)
    got = render_run_samples(str(tiny_model), final_lora, exports, PROMPTS, got_png, got_dir, 6,
                             base_png=base_png, **KW)  # fmt: skip
    for grid, drawn in zip([got_png, *got], [want_png, *want], strict=True):
        assert (pixels(grid)[:64] == pixels(base_png)).all()
        assert (pixels(grid)[64:] == pixels(drawn)[64:]).all()


def test_a_base_row_that_does_not_fit_is_drawn_again(exports, tiny_model, tmp_path, caplog):
    """A base row PNG of other settings (three prompts' width) is not cut up: the row is drawn,
    with a warning naming the file, and the grid is the one drawn without it."""
    odd = tmp_path / "odd.png"
    render_base_row(str(tiny_model), [*PROMPTS, "a third"], odd, **KW)
    final_lora = exports / "step-000004"
    want_png, got_png = tmp_path / "want.png", tmp_path / "got.png"
    render_run_samples(str(tiny_model), final_lora, tmp_path / "none", PROMPTS, want_png,
                       tmp_path / "w", 6, **KW)  # fmt: skip
    with caplog.at_level("WARNING", logger="lorapipe.sampling"):
        render_run_samples(str(tiny_model), final_lora, tmp_path / "none", PROMPTS, got_png,
                           tmp_path / "g", 6, base_png=odd, **KW)  # fmt: skip
    assert str(odd) in caplog.text and "drawing the base row" in caplog.text
    assert got_png.read_bytes() == want_png.read_bytes()


def test_step_loras_with_a_text_encoder_part_are_loaded_anew(tiny_model, tmp_path):
    """diffusers swaps no text-encoder LoRA into a loaded one: such steps are loaded anew, and
    each step's grid is still the one its LoRA alone gives."""
    exports = tmp_path / "exports"
    for step, seed in ((2, 3), (4, 4)):
        save_lora(tiny_model, exports / f"step-{step:06d}", seed, text_encoder=True)
    final = tmp_path / "samples.png"
    render_samples(str(tiny_model), exports / "step-000002", PROMPTS, final, **KW)
    out = tmp_path / "samples"
    render_step_grids(str(tiny_model), exports, PROMPTS, out, final, 6, **KW)
    for step in (2, 4):
        alone = tmp_path / f"alone-{step}.png"
        render_samples(str(tiny_model), exports / f"step-{step:06d}", PROMPTS, alone, **KW)
        assert np.array_equal(pixels(out / f"step-{step:06d}.png"), pixels(alone)), step
    assert not np.array_equal(pixels(out / "step-000002.png"), pixels(out / "step-000004.png"))
