"""What a run reports: each step's metrics record and progress line, the loss plot and the
summary (``train_summary.json``)."""

from __future__ import annotations

import logging
import math
import os
import time

from ..io import atomic_path

log = logging.getLogger("lorapipe.train")


def step_record(st, epoch: int, loss: float | None, n_images: int, dt: float, data_s: float,
                skipped: bool) -> dict:  # fmt: skip
    """The metrics.jsonl line of the step just taken (``st.step`` already counts it); ``loss``
    None: filled in when it is read back from the device."""
    import torch

    lrs = st.sched.get_last_lr()
    m = {
        "step": st.step,
        "epoch": epoch + 1,
        "loss": loss,
        "lr": lrs[0],
        **({"lr_text_encoder": lrs[1]} if st.model.trains_text else {}),
        "images_per_s": n_images / dt if dt > 0 else 0.0,
        "data_wait": data_s / dt if dt > 0 else 0.0,
        "skipped": bool(skipped),
        "time": time.time(),
    }
    if st.device.kind == "cuda":  # peak of this step, and what the caching allocator holds
        m["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        m["gpu_mem_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return m


def log_progress(st, m: dict, eta_s: float) -> None:
    """One progress line (rank 0 at INFO, other ranks at DEBUG)."""
    (log.info if st.dist.main else log.debug)(
        "Epoch %d/%d | Step %d/%d | Loss %.4f | LR %.2e | %.1f img/s | data %.0f%% | ETA %s",
        m["epoch"], st.plan.epochs, m["step"], st.plan.total_steps, m["loss"], m["lr"],
        m["images_per_s"], 100 * m["data_wait"], fmt_eta(eta_s),
    )  # fmt: skip


def summary(st, wall_s: float, compiled_graphs_now: int, run_id: str | None) -> dict:
    """``train_summary.json`` of a finished run: steps, loss, precision, compile timing."""
    compiled = st.forward is not st.model.unet
    c, times = st.compile, st.step_times
    # Compile time: warm-up plus the first step (Inductor compiles forward and backward there)
    # minus what as many steady steps take (median of the later steps; with one step, all of
    # it counts). Recompiles: graphs compiled after warm-up (0 when warm-up saw every shape).
    steady_step = median(times[1:]) if len(times) > 1 else 0.0
    compile_s = 0.0
    if compiled and times:
        passes = c.get("warmup_shapes", 0)
        compile_s = max(0.0, c.get("warmup_s", 0.0) + times[0] - (passes + 1) * steady_step)
    recompiles = compiled_graphs_now - c.get("graphs_after_warmup", 0) if compiled else 0
    return {
        "steps": st.step,
        "epochs": st.plan.epochs,
        "final_loss": st.metrics[-1]["loss"] if st.metrics else None,
        "precision": st.device.precision,
        "device": st.device.kind,
        "compiled": compiled,
        "compile_s": compile_s,
        "warmup_s": c.get("warmup_s", 0.0),
        "warmup_shapes": c.get("warmup_shapes", 0),
        "warmup_graphs": c.get("warmup_graphs", 0),
        "recompiles": recompiles,
        "wall_s": wall_s,
        "images_per_s_steady": steady_rate(st.step_images, st.step_ends),
        "samples": len(st.samples),
        "processes": st.dist.world,
        "mlflow_run_id": run_id,
    }


def steady_rate(images: list[int], ends: list[float]) -> float | None:
    """``images_per_s_steady``: the images trained after this session's first step (warm-up,
    and the compiled first step, excluded) over the wall time they took, from the end of the
    first step to the end of the last (``ends``: each step's ``perf_counter`` at its end), so
    what runs between steps (reading the loss back, logging, validation, checkpoints) counts.
    None with fewer than two steps. Not the mean of the per-step ``images_per_s``, which a few
    fast steps would lift."""
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return None
    return sum(images[1:]) / (ends[-1] - ends[0])


def log_summary(s: dict) -> None:
    if s["recompiles"]:
        log.warning("torch.compile recompiled %d time(s) after warm-up", s["recompiles"])
    log.info(
        "trained %d steps in %.1f s: %.1f img/s steady; compile %s (warm-up %.1f s over %d "
        "shape(s), compile %.1f s, %d recompile(s) after warm-up)",
        s["steps"], s["wall_s"], s["images_per_s_steady"] or 0.0, s["compiled"], s["warmup_s"],
        s["warmup_shapes"], s["compile_s"], s["recompiles"],
    )  # fmt: skip


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2


def fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def plot_loss(metrics: list[dict], path: str | os.PathLike, title: str) -> None:
    """Loss per step (and a moving average) as a PNG; with the validation loss (``val_loss``
    records) and its best step marked, when the run has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    k = max(1, len(loss) // 20)
    windows = [loss[max(0, i - k + 1) : i + 1] for i in range(len(loss))]
    avg = [sum(w) / len(w) for w in windows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, avg, label=f"mean of {k}")
    val = [(m["step"], m["val_loss"]) for m in metrics
           if math.isfinite(m.get("val_loss", math.nan))]  # fmt: skip
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], marker="o", markersize=3,
                label="validation loss")  # fmt: skip
        best = min(val, key=lambda sv: (sv[1], sv[0]))
        ax.axvline(best[0], color="grey", linestyle=":", label=f"best step {best[0]}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"run {title}")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
