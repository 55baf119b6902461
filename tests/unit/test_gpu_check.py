"""bench/gpu_check.py (#13): its ``--smoke`` run goes through the training code at toy sizes
and writes every row of the GPU check (the GPU-only ones as skipped, each with its reason);
the GPU's peak is looked up from its name. No test here needs a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"

# What #13 asks the check to measure: one row each, whatever the machine.
EAGER = [f"sd15 b{b} bf16 eager" for b in (1, 4, 8, 16)] + [
    f"sdxl b{b} bf16 eager" for b in (1, 2, 4)
]
COMPILED = [r.replace("eager", "compiled") for r in EAGER]
VARIANTS = {
    "sd15 b4 fp16 eager gradscaler": "gpu",
    "sd15 b4 bf16 eager adamw8bit": "gpu",
    "sd15 b4 bf16 eager nccl-2proc": "gpu",
    "sd15 b4 bf16 eager deterministic": "any",
    "sd15 b4 bf16 eager prefetch-off": "any",
    "sd15 b16 bf16 eager streamed": "any",
    "sdxl b4 bf16 eager streamed": "any",
}
SKIP_REASON = {  # a GPU-only row on a CPU: a part of its reason
    "sd15 b4 fp16 eager gradscaler": "needs a CUDA GPU",
    "sd15 b4 bf16 eager adamw8bit": "adamw8bit",
    "sd15 b4 bf16 eager nccl-2proc": "needs 2 CUDA GPUs (found 0)",
    **{r: "torch.compile on CPU" for r in COMPILED},
}


def _gpu_check():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    return gpu_check


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """``gpu_check.py --smoke`` run once in a subprocess; its JSON."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--work", str(tmp / "w")],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sd15 b1 bf16 eager" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_writes_every_row(smoke):
    """Every row of #13 is in the JSON; the GPU-only ones skipped with their reason, the
    others measured through the training code (streamed and prefetch-off as asked)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the skipped-row reasons below are a CPU's")
    rows = {r["id"]: r for r in smoke["rows"]}
    assert sorted(rows) == sorted(EAGER + COMPILED + list(VARIANTS))
    assert smoke["mode"] == "smoke" and smoke["device"] == "cpu"
    for name, part in SKIP_REASON.items():
        assert rows[name]["status"] == "skipped", rows[name]
        assert part in rows[name]["reason"], rows[name]["reason"]
    ran = EAGER + [v for v, where in VARIANTS.items() if where == "any"]
    for name in ran:
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["images_per_s"] > 0 and 0 <= r["data_wait"] < 1 and r["step_s"] > 0, r
        assert math.isfinite(r["loss"]) and r["flops_per_sample"] > 0, r
        assert r["tflops_achieved"] > 0 and r["mfu"] is None  # no GPU peak on a CPU
    assert rows["sd15 b16 bf16 eager streamed"]["cache"] == "streamed"
    assert rows["sdxl b4 bf16 eager streamed"]["cache"] == "streamed"
    assert rows["sd15 b16 bf16 eager"]["cache"] == "in memory"
    assert rows["sd15 b4 bf16 eager prefetch-off"]["prefetch"] is False
    assert rows["sd15 b4 bf16 eager"]["prefetch"] is True
    models = smoke["models"]
    assert models["sdxl"]["shape"]["pooled"] and not models["sd15"]["shape"]["pooled"]
    assert models["sd15"]["flops_per_sample"] > 0 and models["sdxl"]["flops_per_sample"] > 0


def test_peak_is_looked_up_from_the_device_name():
    """Dense bf16 peaks by device name; an unknown GPU has none (MFU needs --peak-tflops)."""
    gc = _gpu_check()
    assert gc.peak_tflops_of("NVIDIA H100 80GB HBM3") == 989
    assert gc.peak_tflops_of("NVIDIA H200") == 989
    assert gc.peak_tflops_of("NVIDIA H100 PCIe") == 756
    assert gc.peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312
    assert gc.peak_tflops_of("NVIDIA L40S") == 362
    assert gc.peak_tflops_of("NVIDIA GeForce RTX 4090") == 165
    assert gc.peak_tflops_of("Tesla T4") is None and gc.peak_tflops_of(None) is None


def test_one_gpu_skips_only_the_two_process_row(monkeypatch):
    """On one GPU every row runs except nccl (and adamw8bit without bitsandbytes)."""
    import importlib.util
    from types import SimpleNamespace

    gc = _gpu_check()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "bitsandbytes" else real(n, *a))  # fmt: skip
    args = SimpleNamespace(quick=False, smoke_compile=False)
    reasons = {r["id"]: gc.skip_reason(r, args, True, 1) for r in gc.all_rows()}
    assert {k for k, v in reasons.items() if v} == {"sd15 b4 bf16 eager nccl-2proc"}
    assert "found 1" in reasons["sd15 b4 bf16 eager nccl-2proc"]
    assert not any(gc.skip_reason(r, args, True, 2) for r in gc.all_rows())
    quick = SimpleNamespace(quick=True, smoke_compile=False)
    cut = {r["id"] for r in gc.all_rows() if gc.skip_reason(r, quick, True, 2)}
    assert cut and all(gc.skip_reason(r, quick, True, 2) == "not in --quick"
                       for r in gc.all_rows() if r["id"] in cut)  # fmt: skip
