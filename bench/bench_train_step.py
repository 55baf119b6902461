"""One LoRA training step on the real SD-1.5 UNet architecture (random weights, no download).

The UNet is built from SD-1.5's config (860 M parameters), frozen, and given a LoRA adapter
(peft, r=8 on to_q/to_k/to_v/to_out.0: 1.6 M trainable parameters); a step is what
lorapipe.train does: autocast forward, fp32 MSE loss, backward, grad clipping, AdamW, zero_grad.
In bf16 mode the frozen weights are cast to bf16 as lorapipe.train does (LoRA stays fp32).

Every configuration runs in a fresh subprocess (so peak memory is its own): the first step (for
torch.compile: compile time, forward and backward) is timed apart from the median steady-state step.

- CPU (default here): 16x16 latents, batch 1, eager fp32 and bf16 autocast; ``--compile`` adds the
  compiled variants (the first compiled step of the full UNet takes minutes on a small CPU).
  Peak memory: the process's peak RSS (VmHWM from /proc/self/status, reset after the model is
  built via /proc/self/clear_refs so it shows the step's own peak; the absolute peak is reported).
- CUDA (when torch.cuda.is_available()): 64x64 latents (512 px), batch 1/4/8, bf16, eager and
  compiled, images/s, torch.cuda.max_memory_allocated, compile speedup, and model FLOPs utilisation
  against ``--peak-tflops`` (default 989: H100/H200 bf16 dense).

FLOPs per sample come from torch.utils.flop_counter on a meta-device copy of the same model (no
compute): 1.718 TFLOP per sample per LoRA step at 64x64 latents, 0.089 TFLOP at 16x16.

    python bench/bench_train_step.py [--compile] [--steps 6] [--latent 16] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, out_dir, table, write_result  # noqa: E402

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): 2.57 B
# parameters; cross-attention on 2048-wide text, added conditioning of pooled text + 6 size ids
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
ARCHS = {"sd15": (SD15_UNET, 768, "SD-1.5"), "sdxl": (SDXL_UNET, 2048, "SDXL")}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TOKENS = 77


def inputs(arch: str, b: int, s: int, device: str, g=None) -> tuple:
    """(noisy latents, timesteps, text, UNet keyword arguments) of a batch for ``arch``."""
    import torch

    def rnd(*shape):
        return (
            torch.randn(*shape, generator=g).to(device)
            if g is not None
            else torch.randn(*shape, device=device)
        )

    x, cond = rnd(b, 4, s, s), rnd(b, TEXT_TOKENS, ARCHS[arch][1])
    t = torch.randint(0, 1000, (b,), generator=g) if g is not None else torch.full((b,), 500)
    kw = {}
    if arch == "sdxl":  # pooled text (1280) and original size, crop, target size (8 px / latent)
        ids = torch.tensor([[8 * s, 8 * s, 0, 0, 8 * s, 8 * s]] * b, dtype=torch.float32)
        kw["added_cond_kwargs"] = {"text_embeds": rnd(b, 1280), "time_ids": ids.to(device)}
    return x, t.to(device), cond, kw


# ---------------------------------------------------------------- child (one configuration)
def proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def build(lora_rank: int, device: str = "cpu", arch: str = "sd15"):
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(ARCHS[arch][0])
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=lora_rank,
            lora_alpha=lora_rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGETS,
        )
    )
    return unet


def count_flops(latent: int, lora_rank: int, arch: str = "sd15") -> float:
    """FLOPs of one fwd+bwd LoRA step per sample (meta device: shapes only, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build(lora_rank, "meta", arch)
    x, t, cond, kw = inputs(arch, 1, latent, "meta")
    with FlopCounterMode(display=False) as fc:
        unet(x, t, cond, return_dict=False, **kw)[0].float().pow(2).mean().backward()
    return float(fc.get_total_flops())


def child(cfg: dict) -> dict:
    if cfg.get("inductor_cache"):  # before torch is imported: a cold (fresh) or warm cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cfg["inductor_cache"]
    import torch

    torch.manual_seed(0)
    device = cfg["device"]
    cuda = device == "cuda"
    t0 = time.perf_counter()
    arch = cfg.get("arch", "sd15")
    unet = build(cfg["lora_rank"], arch=arch)
    amp = torch.bfloat16 if cfg["precision"] == "bf16" else None
    if amp is not None:  # as lorapipe.train: frozen weights in the AMP dtype, LoRA in fp32
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(amp)
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    build_s = time.perf_counter() - t0

    b, s = cfg["batch"], cfg["latent"]
    g = torch.Generator().manual_seed(1)
    noisy, timesteps, cond, kw = inputs(arch, b, s, device, g)
    target = torch.randn(b, 4, s, s, generator=g).to(device)
    forward = torch.compile(unet) if cfg["compile"] else unet

    fwd_times = []

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            pred = forward(noisy, timesteps, cond, return_dict=False, **kw)[0]
        fwd_times.append(time.perf_counter() - t)  # (CUDA: launch time unless compiling)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    rss_before = proc_status("VmRSS")
    reset = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    first_s = timed()
    for _ in range(cfg["warmup"]):
        timed()
    times = [timed() for _ in range(cfg["steps"])]
    res = {
        **cfg,
        "build_s": build_s,
        "first_step_s": first_s,
        "first_forward_s": fwd_times[0],
        "step_s": median(times),
        "min_step_s": min(times),
        "step_times_s": times,
        "images_per_s": b / median(times),
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in params),
        "rss_before_step_gb": (rss_before or 0) / 2**30,
        "peak_rss_gb": (proc_status("VmHWM") or 0) / 2**30,
        "peak_rss_is_step_peak": reset,
        "torch": torch.__version__,
    }
    if cuda:
        res["gpu"] = torch.cuda.get_device_name()
        res["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        res["cuda_model_allocated_gb"] = base_alloc / 2**30
        res["cuda_max_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return res


# ---------------------------------------------------------------- parent
def cached_flops(latent: int, lora_rank: int, arch: str = "sd15") -> float:
    """count_flops, remembered in bench/out/flops.json (it costs a diffusers import and a trace)."""
    import diffusers
    import torch

    path = out_dir() / "flops.json"
    key = f"{arch}-unet:{latent}:{lora_rank}:{torch.__version__}:{diffusers.__version__}"
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        known[key] = count_flops(latent, lora_rank, arch)
        path.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    return known[key]


def run_child(cfg: dict, timeout: float) -> dict:
    """One configuration in a fresh interpreter (its own session: a timeout kills its compile
    workers too)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {**cfg, "error": f"not measured: over the {timeout:.0f} s limit"}
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (stderr or stdout)[-2000:]
        last = tail.strip().splitlines()[-1:] or ["?"]
        return {**cfg, "error": f"exit {proc.returncode}: {last[0]}", "stderr_tail": tail}
    res = json.loads(stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd15", help="UNet architecture")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (CPU: slow)")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: skip the compiled runs")
    ap.add_argument("--latent", type=int, default=None, help="latent side (CPU 16, CUDA 64)")
    ap.add_argument("--batch", type=str, default=None, help="batch sizes (CPU 1, CUDA 1,4,8)")
    ap.add_argument("--precision", type=str, default=None, help="fp32,bf16 (CUDA: bf16)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CPU 6, CUDA 20)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak, bf16 dense")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per configuration")
    ap.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with compile: also time a rerun on the warm Inductor cache (first batch size)",
    )
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    xl = args.arch == "sdxl"  # SDXL: 1024 px (128x128 latents) on a GPU, batch 1/2/4
    latent = args.latent or ((128 if xl else 64) if cuda else 16)
    batches = [
        int(x) for x in (args.batch or (("1,2,4" if xl else "1,4,8") if cuda else "1")).split(",")
    ]
    precisions = (args.precision or ("bf16" if cuda else "fp32,bf16")).split(",")
    compiled = args.compile or (cuda and not args.no_compile)
    steps = args.steps or (20 if cuda else 6)

    t = time.perf_counter()
    flops = cached_flops(latent, args.lora_rank, args.arch)
    print(
        f"{ARCHS[args.arch][2]} UNet LoRA r={args.lora_rank} step at {latent}x{latent} latents: "
        f"{flops / 1e12:.3f} TFLOP per sample (counted in {time.perf_counter() - t:.1f} s); "
        f"device {device}, torch threads {torch.get_num_threads()}",
        flush=True,
    )

    results = []
    cache_root = out_dir() / f"inductor-cache-{os.getpid()}"
    try:
        for i, batch in enumerate(batches):
            for precision in precisions:
                modes = ["eager"]
                if compiled:  # cold: a fresh Inductor cache; warm: the cache the cold run left
                    modes += ["compile"] + (["compile, warm cache"] if i == 0 and args.warm else [])
                for mode in modes:
                    cache = cache_root / f"b{batch}-{precision}"
                    cfg = {
                        "device": device,
                        "latent": latent,
                        "batch": batch,
                        "precision": precision,
                        "compile": mode != "eager",
                        "mode": mode,
                        "inductor_cache": str(cache) if mode != "eager" else None,
                        "steps": steps,
                        "warmup": args.warmup,
                        "lora_rank": args.lora_rank,
                        "arch": args.arch,
                    }
                    name = f"b{batch} {precision} {mode}"
                    if mode == "compile":
                        shutil.rmtree(cache, ignore_errors=True)
                    if mode == "compile, warm cache" and "error" in results[-1]:
                        continue
                    print(f"  running {name} ...", flush=True)
                    r = run_child(cfg, args.timeout)
                    r["name"] = name
                    if "error" in r:
                        print(f"    {r['error']}", flush=True)
                    else:
                        print(
                            f"    first step {r['first_step_s']:.1f} s, step {r['step_s']:.3f} s",
                            flush=True,
                        )
                        r["achieved_tflops"] = flops * r["images_per_s"] / 1e12
                        if cuda:
                            r["mfu"] = r["achieved_tflops"] / args.peak_tflops
                    results.append(r)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)

    by = {(r["batch"], r["precision"], r["mode"]): r for r in results}
    rows = []
    for r in results:
        ok = "error" not in r
        eager = by.get((r["batch"], r["precision"], "eager"))
        row = {
            "config": r["name"],
            "first step s": r.get("first_step_s"),
            "1st fwd s": r.get("first_forward_s"),
            "step s": r.get("step_s"),
            "min step s": r.get("min_step_s"),
            "img/s": r.get("images_per_s"),
            "GFLOP/s": r["achieved_tflops"] * 1e3 if ok else None,
            "vs eager": (
                eager["step_s"] / r["step_s"] if ok and eager and "error" not in eager else None
            ),
        }
        if cuda:
            row["MFU %"] = 100 * r["mfu"] if ok else None
            row["max alloc GiB"] = r.get("cuda_max_allocated_gb")
        else:
            row["peak RSS GiB"] = r.get("peak_rss_gb")
            row["RSS before GiB"] = r.get("rss_before_step_gb")
        if not ok:
            row["first step s"] = r["error"]
        rows.append(row)
    print(table(rows))
    for (batch, precision, mode), a in by.items():
        b = by.get((batch, "bf16", mode))
        if precision == "fp32" and b and "error" not in a and "error" not in b:
            print(f"bf16 autocast vs fp32 (b{batch} {mode}): x{a['step_s'] / b['step_s']:.2f}")
    if not compiled:
        print("torch.compile: not measured (opt in with --compile; minutes on a small CPU)")
    # default CPU run: bench_train_step.json; CPU with --compile: bench_train_step_compile.json
    name = "bench_train_step" + ("_sdxl" if xl else "")
    name += "_cuda" if cuda else "_compile" if compiled else ""
    write_result(
        name,
        {
            "device": device,
            "latent": latent,
            "flops_per_sample": flops,
            "peak_tflops": args.peak_tflops if cuda else None,
            "arch": args.arch,
            "unet_config": ARCHS[args.arch][0],
            "lora_targets": LORA_TARGETS,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
