"""One prepared GPU check (#13): LoRA training steps of SD-1.5 and SDXL through lorapipe's code.

No downloads: the UNets are built from SD-1.5's and SDXL-base's configs with random weights on the
GPU; the data are synthetic latent shards in the latent stage's layout (`_synthetic`), read by
`lorapipe.latent_cache.LatentCache` (in memory, or streamed for the ``streamed`` rows). Each step
goes through the training code's own pieces: `training.prepare` (``training_device``,
``attach_lora`` with ``models.lora_config``, ``make_optimizer``, ``deterministic_mode``),
`training.batches` (``make_plan``, ``step_micro_batches``, ``BatchRecipe``, ``device_batch``,
``diffusion_loss``), batches made ahead by `training.feed.Feed` (pinned, non-blocking copies),
SDXL's ``added_cond_kwargs`` (``text_embeds`` (B, 1280), ``time_ids`` (B, 6)) from
`families.SDXL.added_cond`, gradients summed by `distributed.all_reduce_grads` in the 2-process
row, and the loss read back a step late as ``lorapipe.train`` does. What it adds is timing.

Rows (the same list in every mode; a row that cannot or need not run here is kept, as skipped,
with its reason): SD-1.5 at 512 px (64x64 latents) batch 1/4/8/16 and SDXL at 1024 px (128x128)
batch 1/2/4, bf16, eager and ``torch.compile``; at SD-1.5 b4 also prefetch off, fp16 with the
GradScaler, ``deterministic``, ``adamw8bit`` (bitsandbytes), 2 processes over nccl (2 GPUs); SD-1.5
b16 and SDXL b4 streamed. Per row: images/s (all processes), step time, first step and compile
time (first step minus a steady one; the compiled rows of one model share one compiled UNet, in
ascending batch order, so the second batch size compiles the dynamic-batch graph and later ones
reuse it, as a run over several batch shapes does), data-wait share (time getting the batch ready,
as train's ``data_wait``, over the step time), peak GPU memory (max_memory_allocated, the model
included), and MFU: FLOPs per sample counted by torch.utils.flop_counter on a meta-device copy
(forward + backward of the LoRA step), times images/s, over the GPU's dense bf16 peak from its
name (H100/H200 SXM 989 TFLOPS, H100 PCIe 756, H100 NVL 835, A100 312, L40S 362, RTX 4090 165;
else ``--peak-tflops``).

Row groups run one after another, each in a fresh process (its own compile state and memory)
under one time budget (``--budget``, default 450 s: the check fits in 8 minutes on one H100-class
GPU; what the budget does not reach is listed as skipped). Results: one JSON (bench/out/
gpu_check.json, or ``--json``) and a table.

    python bench/gpu_check.py              # a CUDA GPU: the whole check
    python bench/gpu_check.py --quick      # fewer sizes and steps (~4 min)
    python bench/gpu_check.py --smoke      # CPU: the same code at toy sizes, 2 steps a row
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic  # noqa: E402
from _common import table, write_result  # noqa: E402
from bench_train_step import LORA_TARGETS, SD15_UNET  # noqa: E402

# SDXL base 1.0's UNet (2.567 G parameters), as diffusers' single-file loader derives it from
# sgm's config (context 2048, adm_in_channels 2816 = 1280 pooled + 6 x 256 time ids).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
TINY_SD15_UNET = {  # --smoke: SD-1.x-shaped at toy widths
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
    "layers_per_block": 1, "cross_attention_dim": 16, "attention_head_dim": 4,
    "norm_num_groups": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}  # fmt: skip
TINY_SDXL_UNET = {  # --smoke: text_time conditioning, linear projections, 2 transformer layers
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
    "layers_per_block": 1, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (4, 8), "cross_attention_dim": 24, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 6 * 4 + 8, "norm_num_groups": 8,
}  # fmt: skip
MODELS = {  # name: (UNet config, tensor shapes, VAE scaling factor), full size and --smoke
    "full": {
        "sd15": (SD15_UNET, _synthetic.SHAPES["sd15"], 0.18215),
        "sdxl": (SDXL_UNET, _synthetic.SHAPES["sdxl"], 0.13025),
    },
    "smoke": {
        "sd15": (TINY_SD15_UNET, _synthetic.Shape((4, 8, 8), (8, 16)), 0.18215),
        "sdxl": (TINY_SDXL_UNET, _synthetic.Shape((4, 8, 8), (8, 24), 8), 0.13025),
    },
}
BATCHES = {"sd15": (1, 4, 8, 16), "sdxl": (1, 2, 4)}
QUICK_BATCHES = {"sd15": (4, 16), "sdxl": (1, 2)}
PEAK_TFLOPS = (  # dense bf16 tensor-core peak, by a part of torch.cuda.get_device_name()
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.0),
)  # fmt: skip
NEEDED = ("torch", "diffusers", "peft", "safetensors", "yaml", "jsonschema")
LORA_RANK = 8


# ---------------------------------------------------------------- the rows
def row(model: str, batch: int, mode: str = "eager", variant: str = "", precision: str = "bf16",
        group: str | None = None) -> dict:  # fmt: skip
    """One configuration: its id (the same at every size), what it runs and in which group."""
    name = f"{model} b{batch} {precision} {mode}" + (f" {variant}" if variant else "")
    return {"id": name, "model": model, "batch": batch, "precision": precision,
            "compile": mode == "compiled", "variant": variant,
            "group": group or f"{model}-{mode}"}  # fmt: skip


def all_rows() -> list[dict]:
    """Every row, in the order they run (cheap and most wanted first)."""
    rows = [row("sd15", b) for b in BATCHES["sd15"]]
    rows += [row("sd15", 16, variant="streamed"), row("sd15", 4, variant="prefetch-off"),
             row("sd15", 4, variant="adamw8bit"),
             row("sd15", 4, variant="gradscaler", precision="fp16")]  # fmt: skip
    rows += [row("sdxl", b) for b in BATCHES["sdxl"]] + [row("sdxl", 4, variant="streamed")]
    rows += [row("sd15", 4, variant="deterministic", group="sd15-deterministic"),
             row("sd15", 4, variant="nccl-2proc", group="sd15-ddp")]  # fmt: skip
    rows += [row(m, b, "compiled") for m in ("sd15", "sdxl") for b in BATCHES[m]]
    return rows


def skip_reason(r: dict, args, cuda: bool, n_gpus: int) -> str | None:
    """Why row ``r`` does not run here (None: it runs)."""
    if args.quick and r["batch"] not in QUICK_BATCHES[r["model"]] and not r["variant"]:
        return "not in --quick"
    if r["variant"] == "nccl-2proc" and n_gpus < 2:
        return f"2-process nccl needs 2 CUDA GPUs (found {n_gpus})"
    if r["variant"] == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            return "adamw8bit: bitsandbytes is not installed"
        if not cuda:
            return "adamw8bit needs a CUDA GPU"
    if r["precision"] == "fp16" and not cuda:
        return "fp16 with the GradScaler needs a CUDA GPU"
    if r["compile"] and not cuda and not args.smoke_compile:
        return "torch.compile on CPU: minutes a model even at toy sizes (add --smoke-compile)"
    return None


def peak_tflops_of(name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (first match in PEAK_TFLOPS), or None."""
    for part, tflops in PEAK_TFLOPS:
        if name and part.lower() in name.lower():
            return tflops
    return None


# ---------------------------------------------------------------- one row (worker side)
def build_unet(cfg: dict, device, seed: int = 0):
    """A UNet from ``cfg`` with random weights, built on ``device`` (meta: shapes only)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel.from_config(cfg)


def count_flops(cfg: dict, shape: _synthetic.Shape) -> float:
    """FLOPs of one LoRA training step (forward + backward) per sample, on a meta-device copy."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lorapipe.models import lora_config

    unet = build_unet(cfg, "meta")
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(LORA_RANK, LORA_RANK, LORA_TARGETS))
    x = torch.randn(1, *shape.latent, device="meta")
    cond = torch.randn(1, *shape.text, device="meta")
    kwargs = {}
    if shape.pooled:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, shape.pooled, device="meta"),
                                       "time_ids": torch.randn(1, 6, device="meta")}  # fmt: skip
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500], device="meta"), cond, return_dict=False, **kwargs)[0] \
            .float().pow(2).mean().backward()  # fmt: skip
    return float(fc.get_total_flops())


def model_flops(S: dict, name: str) -> float:
    """`count_flops` of model ``name``, remembered in the work folder (groups share it)."""
    path = Path(S["work"]) / f"flops-{name}.json"
    if not path.exists():
        m = S["models"][name]
        t = time.perf_counter()
        flops = count_flops(m["unet"], _synthetic.Shape(**m["shape"]))
        path.write_text(json.dumps(flops))
        print(f"{name}: {flops / 1e12:.4g} TFLOP per sample per step at {m['pixels']} px "
              f"(counted in {time.perf_counter() - t:.1f} s)", flush=True)  # fmt: skip
    return json.loads(path.read_text())


def _run_config(r: dict, S: dict, work: str):
    settings = {
        "batch_size": r["batch"], "max_steps": S["warmup"] + S["steps"], "seed": 0,
        "mixed_precision": r["precision"], "compile": False, "lora_rank": LORA_RANK,
        "lora_alpha": LORA_RANK,
        "optimizer": "adamw8bit" if r["variant"] == "adamw8bit" else "adamw",
        "deterministic": r["variant"] == "deterministic",
        "prefetch": r["variant"] != "prefetch-off",
        "latent_cache_ram_mb": 0 if r["variant"] == "streamed" else 10**7,
    }  # fmt: skip
    return _synthetic.run_config(settings, work, work)


def _model(r: dict, S: dict, device, state: dict):
    """The LoRA UNet of row ``r`` (kept in ``state`` for the next row of the same model and
    precision) and its forward (the compiled one for compiled rows, compiled once)."""
    import torch

    from lorapipe.models import lora_config
    from lorapipe.training.prepare import attach_lora

    key = (r["model"], r["precision"])
    if state.get("key") != key:
        state.clear()
        if S["cuda"]:
            torch.cuda.empty_cache()
        unet = build_unet(S["models"][r["model"]]["unet"], device.torch_device)
        torch.manual_seed(0)  # LoRA init (gaussian A) as build_model seeds it
        params = attach_lora(unet, lora_config(LORA_RANK, LORA_RANK, LORA_TARGETS), device)
        state.update(key=key, unet=unet, params=params)
    if r["compile"] and "compiled" not in state:
        state["compiled"] = torch.compile(state["unet"])  # as train._prepare compiles it
    return state["unet"], state["params"], state["compiled"] if r["compile"] else state["unet"]


def _context(r: dict, S: dict, state: dict, dist) -> SimpleNamespace:
    """What the steps of row ``r`` need: run config, device, cache, recipe, model, optimizer."""
    import torch
    from diffusers import DDPMScheduler

    from lorapipe.families import SD, SDXL
    from lorapipe.latent_cache import LatentCache
    from lorapipe.training.batches import BatchRecipe, make_plan
    from lorapipe.training.prepare import make_optimizer, training_device

    run = _run_config(r, S, S["work"])
    device = training_device(run, dist.rank)
    m = S["models"][r["model"]]
    cache = LatentCache(m["shards"], run.latent_cache_ram_mb)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)  # fmt: skip
    empty = {k: v.float() for k, v in cache.empty.items()}
    recipe = BatchRecipe(0, sched, "epsilon", m["scaling"], 0.0, 0.0, empty, False)
    unet, params, forward = _model(r, S, device, state)
    c = SimpleNamespace(run=run, device=device, cache=cache, recipe=recipe, unet=unet,
                        params=params, forward=forward, family=SDXL() if m["pooled"] else SD(),
                        opt=make_optimizer(run, params), dist=dist,
                        scaler=torch.amp.GradScaler(device.kind,
                                                    enabled=r["precision"] == "fp16"))  # fmt: skip
    c.plan = make_plan(cache.samples, run, dist.world)
    c.samples = cache.samples
    return c


def train_step(c: SimpleNamespace, feed, step: int):
    """One optimizer step as lorapipe.train takes it (one micro-batch): (loss on the device,
    seconds getting the batch ready)."""
    import torch

    from lorapipe import distributed
    from lorapipe.training.batches import device_batch, diffusion_loss, step_micro_batches

    dev, cuda = c.device.torch_device, c.device.kind == "cuda"
    epoch, micro = step_micro_batches(c.samples, c.run, c.dist.world, c.plan, step)
    batch = micro[0][c.dist.rank :: c.dist.world]
    td = time.perf_counter()
    b = device_batch(feed.take(step, batch, epoch), c.recipe, dev, non_blocking=cuda)
    data_s = time.perf_counter() - td
    with c.device.autocast():
        added = c.family.added_cond(b.cond, b.metas, dev)
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        pred = c.forward(b.noisy, b.timesteps, b.cond["text"], return_dict=False, **kwargs)[0]
    loss = diffusion_loss(pred, b, c.recipe, None).mean()
    c.scaler.scale(loss).backward()
    if c.dist.world > 1:
        distributed.all_reduce_grads(c.params)
    c.scaler.unscale_(c.opt)
    torch.nn.utils.clip_grad_norm_(c.params, c.run.max_grad_norm)
    c.scaler.step(c.opt)
    c.scaler.update()
    c.opt.zero_grad(set_to_none=True)
    return loss.detach(), data_s


def _sync(c) -> None:
    import torch

    if c.device.kind == "cuda":
        torch.cuda.synchronize(c.device.torch_device)


def measure(c: SimpleNamespace, feed, warmup: int, steps: int) -> dict:
    """First step, warm-up, then ``steps`` timed steps with the loss read a step late."""
    import torch

    from lorapipe.training.compiling import compiled_graphs

    cuda = c.device.kind == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(c.device.torch_device)
        model_bytes = torch.cuda.memory_allocated(c.device.torch_device)
    graphs = compiled_graphs()
    t = time.perf_counter()
    float(train_step(c, feed, 0)[0])
    first_s = time.perf_counter() - t
    for step in range(1, warmup):
        train_step(c, feed, step)
    _sync(c)
    t, data_s, pending, times = time.perf_counter(), 0.0, None, []
    for step in range(warmup, warmup + steps):
        ts = time.perf_counter()
        loss, ds = train_step(c, feed, step)
        if pending is not None:
            float(pending)  # the last step's loss, read while this one runs
        pending, data_s = loss, data_s + ds
        times.append(time.perf_counter() - ts)
    loss = float(pending)
    _sync(c)
    wall = time.perf_counter() - t
    images = c.run.batch_size * c.dist.world * steps
    res = {"first_step_s": first_s, "step_s": wall / steps, "step_times_s": times,
           "images_per_s": images / wall, "data_wait": data_s / wall, "loss": loss,
           "graphs_compiled": compiled_graphs() - graphs}  # fmt: skip
    if cuda:
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(c.device.torch_device) / 2**30
        res["reserved_gpu_gb"] = torch.cuda.max_memory_reserved(c.device.torch_device) / 2**30
        res["model_gpu_gb"] = model_bytes / 2**30
    else:
        res["peak_rss_gb"] = (_synthetic.proc_status("VmHWM") or 0) / 2**30
    return res


def run_row(r: dict, S: dict, state: dict, dist) -> dict:
    """Row ``r`` measured (deterministic rows inside `prepare.deterministic_mode`)."""
    from lorapipe.training.feed import Feed
    from lorapipe.training.prepare import deterministic_mode

    kind = "cuda" if S["cuda"] else "cpu"
    with deterministic_mode(r["variant"] == "deterministic", kind):
        c = _context(r, S, state, dist)
        feed = Feed(SimpleNamespace(job=SimpleNamespace(run=c.run), dist=dist, plan=c.plan,
                                    samples=c.samples, recipe=c.recipe),
                    0, pin=kind == "cuda", enabled=bool(c.run.prefetch))  # fmt: skip
        try:
            res = measure(c, feed, S["warmup"], S["steps"])
        finally:
            feed.close()
            c.cache.close()
    res["cache"] = "streamed" if not c.cache.in_memory else "in memory"
    res["prefetch"] = bool(c.run.prefetch)
    return res


def run_rows(rows: list[dict], S: dict, out: str | None, dist) -> None:
    """Each row in turn; a row that fails is recorded with its error and the next one runs.
    Rank 0 appends each result to ``out`` (JSON lines) as soon as it has it."""
    import torch

    state: dict = {}
    for r in rows:
        t = time.perf_counter()
        try:
            flops = model_flops(S, r["model"])
            res = {"status": "ok", "flops_per_sample": flops, **run_row(r, S, state, dist)}
        except Exception as e:  # recorded; the group goes on
            res = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:800]}
            state.clear()
            if S["cuda"]:
                torch.cuda.empty_cache()
        res["row_wall_s"] = time.perf_counter() - t
        if dist.rank == 0 and out:
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"id": r["id"], **res}) + "\n")
        print(f"  {r['id']}: {res['status']} {res.get('reason', '')}", flush=True)


def _ddp_rank(rank: int, rows: list[dict], S: dict, out: str, port: int) -> None:
    """One of 2 processes of the nccl rows (torch.multiprocessing entry)."""
    import torch
    import torch.distributed as td

    torch.cuda.set_device(rank)
    td.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run_rows(rows, S, out, SimpleNamespace(world=2, rank=rank))
    finally:
        td.destroy_process_group()


def worker(spec_path: str, out: str) -> None:
    """A group's rows in this process (the nccl group: in 2 processes it starts)."""
    spec = json.loads(Path(spec_path).read_text())
    for m in spec["settings"]["models"].values():
        m["pooled"] = m["shape"]["pooled"]
    if spec["settings"].get("inductor_cache"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["settings"]["inductor_cache"]
    if not spec["settings"]["cuda"]:  # a shared 2-core machine: two threads made toy steps
        import torch  # 10-50x slower (1-10 s instead of 0.1 s) under a load average of 6

        torch.set_num_threads(spec["settings"]["cpu_threads"])
    if any(r["variant"] == "nccl-2proc" for r in spec["rows"]):
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_rank, args=(spec["rows"], spec["settings"], out, port), nprocs=2)
        return
    run_rows(spec["rows"], spec["settings"], out, SimpleNamespace(world=1, rank=0))


# ---------------------------------------------------------------- parent
def prepare(args, rows: list[dict], size: str, cuda: bool) -> dict:
    """Synthetic shards of the models the rows use; the workers' settings."""
    work = Path(args.work)
    models = {}
    for name in sorted({r["model"] for r in rows if not r.get("reason")}):
        unet, shape, scaling = MODELS[size][name]
        n = 4 * max(BATCHES[name]) if size == "full" else 32
        shards = _synthetic.synthetic_shards(work / f"data-{size}-{name}", n, shape,
                                             per_shard=-(-n // 2), captions=4)  # fmt: skip
        print(f"{name}: {n} samples in {len(shards)} shards", flush=True)
        models[name] = {"unet": unet, "shape": {**vars(shape)}, "scaling": scaling,
                        "shards": shards, "pixels": shape.pixels}  # fmt: skip
    steps = (1, 1) if args.smoke else (2, 5) if args.quick else (3, 10)
    return {"cuda": cuda, "models": models, "warmup": steps[0], "steps": steps[1],
            "work": str(work), "cpu_threads": args.cpu_threads,
            "inductor_cache": None if args.reuse_inductor_cache
            else tempfile.mkdtemp(prefix="inductor-", dir=work)}  # fmt: skip


def run_group(rows: list[dict], S: dict, timeout: float, work: Path) -> dict[str, dict]:
    """A group's rows in a fresh process (its own session: a timeout kills its compile
    workers too); the results it wrote, by row id."""
    spec, out = work / f"group-{os.getpid()}.json", work / f"group-{os.getpid()}.jsonl"
    spec.write_text(json.dumps({"rows": rows, "settings": S}))
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec), str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
        why = None if rc == 0 else f"the group's process exited with {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        why = f"not measured: the time budget ran out ({timeout:.0f} s left for its group)"
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            res = json.loads(line)
            done[res.pop("id")] = res
    for r in rows:
        done.setdefault(r["id"], {"status": "not measured", "reason": why or "no result"})
    return done


def run_all(rows: list[dict], S: dict, budget: float, t0: float) -> None:
    """Every group that has a row to run, in order, within ``budget`` seconds from ``t0``;
    results go into the rows."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("reason"):
            groups.setdefault("all" if not S["cuda"] else r["group"], []).append(r)
    for name, members in groups.items():
        left = budget - (time.perf_counter() - t0)
        if left < 20:
            for r in members:
                r.update(status="skipped", reason=f"the time budget ({budget:.0f} s) ran out")
            continue
        print(f"group {name}: {len(members)} row(s), {left:.0f} s of the budget left", flush=True)
        done = run_group(members, S, left, Path(S["work"]))
        for r in members:
            r.update(done[r["id"]])


def summarise(rows: list[dict], S: dict, peak: float | None) -> list[dict]:
    """Figures per row (MFU from the counted FLOPs) and the table's rows."""
    eager = {(r["model"], r["batch"]): r for r in rows
             if r.get("status") == "ok" and not r["compile"] and not r["variant"]}  # fmt: skip
    out = []
    for r in rows:
        ok = r.get("status") == "ok"
        if ok:
            r["tflops_achieved"] = r["flops_per_sample"] * r["images_per_s"] / 1e12
            r["mfu"] = r["tflops_achieved"] / peak if peak else None
            base = eager.get((r["model"], r["batch"]))
            r["vs_eager"] = r["images_per_s"] / base["images_per_s"] if base else None
            if r["compile"]:  # 0: the row reused a graph compiled for an earlier batch size
                r["compile_s"] = max(0.0, r["first_step_s"] - r["step_s"]) \
                    if r["graphs_compiled"] else 0.0  # fmt: skip
        out.append({
            "row": r["id"], "status": r.get("status"),
            "img/s": r.get("images_per_s"), "step ms": 1e3 * r["step_s"] if ok else None,
            "vs eager": r.get("vs_eager"), "compile s": r.get("compile_s"),
            "data wait %": 100 * r["data_wait"] if ok else None,
            "peak GiB": r.get("peak_gpu_gb", r.get("peak_rss_gb")),
            "MFU %": 100 * r["mfu"] if r.get("mfu") is not None else None,
            "reason": (r.get("reason") or "")[:90] or None,
        })  # fmt: skip
    return out


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _known_flops(S: dict, name: str) -> float | None:
    path = Path(S["work"]) / f"flops-{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def missing_modules() -> list[str]:
    """The Python packages the check needs that this interpreter lacks."""
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def parse_args():
    """The command line (``--worker`` is the parent's way to start a group)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and steps")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (or GPU), 1-2 steps")
    ap.add_argument("--smoke-compile", action="store_true", help="--smoke: also torch.compile")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all groups "
                    "(450; --quick 300; --smoke 150)")  # fmt: skip
    ap.add_argument("--work", type=Path, default=None, help="data folder (a temporary one)")
    ap.add_argument("--reuse-inductor-cache", action="store_true",
                    help="use the default Inductor cache (compile times then may be warm)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    """Plan the rows, make the data, run the groups within the budget, report."""
    args = parse_args()
    if args.worker:
        return worker(*args.worker)
    t0 = time.perf_counter()
    missing = missing_modules()
    if missing:
        sys.exit(f"gpu_check: missing Python packages {missing} (see bench/README.md, #13)")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("gpu_check: no CUDA GPU here; --smoke runs the same code at toy sizes")
    n_gpus = torch.cuda.device_count() if cuda else 0
    gpu = torch.cuda.get_device_name(0) if cuda else None
    peak = args.peak_tflops or peak_tflops_of(gpu)
    rows = all_rows()
    for r in rows:
        why = skip_reason(r, args, cuda, n_gpus)
        if why:
            r.update(status="skipped", reason=why)
    budget = args.budget or (150 if args.smoke else 300 if args.quick else 450)
    made_work = args.work is None  # a temporary folder: removed at the end
    args.work = args.work or Path(tempfile.mkdtemp(prefix="lorapipe-gpu-check-"))
    try:
        report(args, rows, budget, t0, cuda, gpu, n_gpus, peak)
    finally:
        if made_work:
            shutil.rmtree(args.work, ignore_errors=True)


def report(args, rows: list[dict], budget: float, t0: float, cuda: bool, gpu: str | None,
           n_gpus: int, peak: float | None) -> None:  # fmt: skip
    """Data, the groups, the table and the JSON."""
    import torch

    print(f"device {gpu or 'cpu'}, {n_gpus} GPU(s), peak {peak} TFLOPS, budget {budget:.0f} s, "
          f"{sum(not r.get('reason') for r in rows)} of {len(rows)} rows to run", flush=True)
    S = prepare(args, rows, "smoke" if args.smoke else "full", cuda)
    run_all(rows, S, budget, t0)
    table_rows = summarise(rows, S, peak)
    print(table(table_rows))
    name = "gpu_check" + ("_smoke" if args.smoke else "_quick" if args.quick else "")
    result = {"mode": "smoke" if args.smoke else "quick" if args.quick else "full",
              "device": "cuda" if cuda else "cpu", "gpu": gpu, "gpus": n_gpus,
              "peak_tflops": peak, "budget_s": budget, "wall_s": time.perf_counter() - t0,
              "torch": torch.__version__, "diffusers": _version("diffusers"),
              "warmup_steps": S["warmup"], "timed_steps": S["steps"], "lora_rank": LORA_RANK,
              "models": {k: {**{kk: v for kk, v in m.items() if kk != "shards"},
                             "flops_per_sample": _known_flops(S, k)}
                         for k, m in S["models"].items()},
              "rows": rows}  # fmt: skip
    path = write_result(name, result)
    if args.json:
        args.json.write_text(path.read_text())
        print(f"also: {args.json}")


if __name__ == "__main__":
    main()
