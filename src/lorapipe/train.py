"""The LoRA training loop: read it top to bottom.

Reproducibility rules this loop keeps (see DESIGN.md, principle 6):
- the batch order of epoch ``e`` is a pure function of (seed, e), and every random draw for a sample
  (latent sample, noise, timestep, caption dropout) comes from a generator seeded by
  (seed, epoch, sample key) — never from global RNG state. So a resumed run sees each sample exactly
  once per epoch and draws the same numbers an uninterrupted run would have drawn;
- a checkpoint holds LoRA weights, optimizer, LR schedule, scaler and the step; the data position is
  derived from the step. Resuming from it gives bit-identical LoRA bytes on CPU.

Side channels that never change the LoRA: live MLflow metrics (a `tracking.LiveTracker`, optional)
and, at each checkpoint, both export layouts of that step in ``<checkpoints>/exports/step-NNNNNN/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .io import atomic_path, atomic_write_text, save_safetensors

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class Plan:
    """How many micro-batches and optimizer steps a run has."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    save_steps: int


def _seed_of(*parts) -> int:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def epoch_batches(samples: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sample indices for one epoch: shuffled within each bucket, batches shuffled.

    A batch never mixes bucket sizes. Pure function of (sample keys, batch size, seed, epoch).
    """
    import torch

    g = torch.Generator().manual_seed(_seed_of(seed, "order", epoch))
    by_size: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_size.setdefault(tuple(s["meta"]["size"]), []).append(i)
    batches = []
    for size in sorted(by_size):
        idx = by_size[size]
        perm = torch.randperm(len(idx), generator=g).tolist()
        idx = [idx[j] for j in perm]
        batches += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[j] for j in order]


def make_plan(samples: list[dict], run: RunConfig, world: int = 1) -> Plan:
    """Steps of a run; with ``world`` processes a batch is ``batch_size x world`` images."""
    by_size: dict[tuple, int] = {}
    for s in samples:
        by_size[tuple(s["meta"]["size"])] = by_size.get(tuple(s["meta"]["size"]), 0) + 1
    batches = sum(math.ceil(n / (run.batch_size * world)) for n in by_size.values())
    spe = math.ceil(batches / run.gradient_accumulation)
    total = run.max_steps or spe * run.epochs
    epochs = math.ceil(total / spe)
    save = run.save_steps or max(1, total // 10)
    return Plan(batches, spe, total, epochs, save)


def resolve_precision(setting: str, device: str) -> str:
    """``auto`` → bf16 on a GPU that supports it, else fp16 on GPU; ``no`` on CPU (bit-exact)."""
    import torch

    if setting != "auto":
        return setting
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def resolve_compile(setting, device: str) -> bool:
    return device == "cuda" if setting == "auto" else bool(setting)


def check_optimizer(run: RunConfig, device: str) -> None:
    """Fail before training starts when the optimizer cannot run here (one line, naming the key)."""
    if run.optimizer != "adamw8bit":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA setup raising at import
        raise ValueError(
            f"runs.{run.name}.optimizer: adamw8bit needs bitsandbytes, which does not import "
            f"({type(e).__name__}: {e}); install it (CUDA only) or use optimizer: adamw"
        ) from None
    if device != "cuda":
        raise ValueError(
            f"runs.{run.name}.optimizer: adamw8bit needs a CUDA GPU (device here: {device}); "
            "use optimizer: adamw"
        )


def make_optimizer(run: RunConfig, params: list):
    """AdamW over the LoRA parameters: torch's, or bitsandbytes' 8-bit one (`check_optimizer`).

    ``params``: a list of tensors, or param groups (dicts) when the text encoder is trained."""
    import torch

    cls = torch.optim.AdamW
    if run.optimizer == "adamw8bit":
        import bitsandbytes

        cls = bitsandbytes.optim.AdamW8bit
    return cls(
        params,
        lr=run.learning_rate,
        betas=(run.adam_beta1, run.adam_beta2),
        weight_decay=run.weight_decay,
        eps=run.adam_epsilon,
    )


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: str):
    """GPU determinism for the duration of a run (restored afterwards): deterministic algorithms
    (ops without a deterministic kernel raise), cuBLAS workspace config, no cuDNN autotuning,
    math SDPA. On CPU training is bit-exact already, so nothing changes there."""
    if not enabled or device != "cuda":
        yield
        return
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # read by cuBLAS when its handle is created: before the first CUDA matmul of the process
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]


def _draw(sample: dict, seed: int, epoch: int, num_timesteps: int, noise_offset: float):
    """The random numbers one sample gets in one epoch, from its own generator."""
    import torch

    g = torch.Generator().manual_seed(_seed_of(seed, "sample", epoch, sample["key"]))
    mean = sample["mean"].float()
    eps_latent = torch.randn(mean.shape, generator=g)
    noise = torch.randn(mean.shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((mean.shape[0], 1, 1), generator=g)
    t = int(torch.randint(0, num_timesteps, (1,), generator=g))
    drop = float(torch.rand((), generator=g))
    return eps_latent, noise, t, drop, g


def _pick_caption(n_variants: int, drop: float, caption_dropout: float, g) -> int | None:
    """Which prompt a sample trains with this epoch: None for the empty prompt (dropped), else
    one of its ``n_variants`` caption variants (drawn from the sample's generator ``g``, after
    every other draw, so samples without variants draw exactly what they always drew), else -1
    for its caption as written. The cached and the text-encoder path both choose through here."""
    import torch

    if drop < caption_dropout:
        return None
    if n_variants:
        return int(torch.randint(0, n_variants, (1,), generator=g))
    return -1


def _caption_tensor(sample: dict, drop: float, caption_dropout: float, empty_text, g):
    """The cached text-encoder output a sample trains with this epoch (see `_pick_caption`)."""
    variants = sample.get("text_variants")
    k = _pick_caption(len(variants) if variants is not None else 0, drop, caption_dropout, g)
    if k is None:
        return empty_text
    return (variants[k] if k >= 0 else sample["text"]).float()


def _caption_text(sample: dict, drop: float, caption_dropout: float, g) -> str:
    """The prompt text a sample trains with this epoch when the text encoder is trained: the
    same choice (and the same draw from ``g``) as `_caption_tensor` makes among cached tensors."""
    variants = sample["meta"].get("caption_variants") or []
    k = _pick_caption(len(variants), drop, caption_dropout, g)
    if k is None:
        return ""
    return variants[k] if k >= 0 else sample["meta"]["caption"]


def warmup_shapes(samples: list[dict], batches: list[list[int]]) -> list[list[int]]:
    """One batch per distinct (batch, C, H, W) shape among ``batches``, in first-seen order.

    Batch sizes per bucket do not depend on the shuffle, so one epoch's batches show every
    shape training will meet: the shapes torch.compile is warmed up on.
    """
    seen: dict[tuple, list[int]] = {}
    for b in batches:
        if b:
            seen.setdefault((len(b), *samples[b[0]]["mean"].shape), b)
    return list(seen.values())


def _compiled_graphs() -> int:
    """Graphs torch.compile (Dynamo) has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and (p / "state.json").exists())


def train(
    run: RunConfig,
    latent_shards: list[str],
    model_path: str,
    out_dir: str | os.PathLike,
    ckpt_dir: str | os.PathLike,
    fingerprint: str,
    stop_after: int | None = None,
    tracker=None,
    export_meta: dict[str, str] | None = None,
    original_config: str | None = None,
) -> dict:
    """Train one LoRA; resume from ``ckpt_dir`` when it holds a checkpoint of this fingerprint.

    Writes ``pytorch_lora_weights.safetensors`` (diffusers/PEFT keys, alpha in metadata),
    ``metrics.jsonl``, ``loss.png`` and ``train_summary.json`` into ``out_dir``.

    Args:
        fingerprint: identity of (config, data, model, code); checkpoints of another fingerprint
            are never resumed.
        stop_after: stop (without writing outputs) after this step — for tests of resume.
        tracker: a `tracking.LiveTracker` for live MLflow metrics, or None (no MLflow at all).
            Its run id goes into the exported files' metadata (``lorapipe_mlflow_run_id``) and
            the summary. The run ends FINISHED, FAILED on an error, KILLED when stopped early.
        export_meta: string metadata for every exported file (`runs.file_metadata`): the kohya
            files of checkpoints get all of it, diffusers files the ``lorapipe_*`` fields.
        original_config: for a single-file base model, the local diffusers folder describing it.

    Returns:
        Summary: steps, epochs, final loss, timings, samples, MLflow run id.
    """
    import torch

    from . import distributed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = {  # what the other ranks need to train the same run (num_processes > 1)
        "run": run.to_dict(), "latent_shards": [str(x) for x in latent_shards],
        "model_path": str(model_path), "out_dir": str(out_dir), "ckpt_dir": str(ckpt_dir),
        "fingerprint": fingerprint, "stop_after": stop_after, "original_config": original_config,
    }  # fmt: skip
    dist = None
    try:
        dist = distributed.start(run, device, spec)
        if not dist.main:
            tracker = None
        with deterministic_mode(run.deterministic, device):
            summary = _train(
                run, latent_shards, model_path, out_dir, ckpt_dir, fingerprint, stop_after,
                tracker, dict(export_meta or {}), original_config, dist,
            )  # fmt: skip
        distributed.finish(dist, ok=True)
    except BaseException as e:
        if dist is not None:
            distributed.finish(dist, ok=False)
        if tracker is not None:
            tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.close("KILLED" if "stopped_at" in summary else "FINISHED")
    return summary


def _train(
    run, latent_shards, model_path, out_dir, ckpt_dir, fingerprint, stop_after, tracker,
    export_meta, original_config=None, dist=None,
) -> dict:
    import torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from . import distributed
    from .export import export_checkpoint, save_diffusers_lora, tag_counts
    from .latents import load_latent_cache
    from .models import (
        TEXT_ENCODER_TARGETS,
        adapter_metadata,
        encode_prompts,
        load_parts,
        lora_config,
        vae_scaling_factor,
    )

    t_start = time.perf_counter()
    dist = dist or distributed.Dist()
    rank, world = dist.rank, dist.world
    # a run trained by N processes has other steps than the same run on one: its own folder
    ckpt_name = fingerprint[:16] + (f"-x{world}" if world > 1 else "")
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir) / ckpt_name
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device("cuda", dist.local_rank) if device == "cuda" else torch.device("cpu")
    precision = resolve_precision(run.mixed_precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if precision == "fp16" and device == "cpu":
        raise ValueError(f"runs.{run.name}.mixed_precision: fp16 needs a GPU; use bf16 or no")
    check_optimizer(run, device)

    samples, cached_empty = load_latent_cache(latent_shards)
    if not samples:
        raise ValueError(f"run {run.name}: no training samples in {len(latent_shards)} shard(s)")
    distributed.connect(dist)
    plan = make_plan(samples, run, world)

    # The latent cache holds the empty prompt's encoding (caption dropout); only a cache written
    # before it was stored, or training the text encoder, makes training load the text encoder.
    train_te = bool(run.train_text_encoder)
    text_parts = ("text_encoder", "tokenizer") if cached_empty is None or train_te else ()
    parts = load_parts(model_path, ("unet", "scheduler", "vae", *text_parts), original_config)
    unet, noise_sched = parts["unet"], parts["scheduler"]
    scaling = vae_scaling_factor(parts["vae"])
    if cached_empty is not None:
        empty_text = cached_empty.float()
    else:
        with torch.inference_mode():  # as the latent stage encodes it
            empty_text = encode_prompts(parts["tokenizer"], parts["text_encoder"], [""])[0].clone()
    te, tok = (parts["text_encoder"], parts["tokenizer"]) if train_te else (None, None)
    del parts
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"run {run.name}: the base model's scheduler has prediction_type {prediction!r}; "
            "lorapipe trains epsilon or v_prediction models only"
        )

    unet.requires_grad_(False)
    torch.manual_seed(run.seed)  # global RNG: LoRA init (gaussian A); dropout reseeds per step
    cfg = lora_config(run.lora_rank, run.lora_alpha, run.target_modules, run.lora_dropout)
    unet.add_adapter(cfg)
    if run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if amp_dtype is not None:  # frozen weights in the AMP dtype; LoRA master weights stay fp32
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(amp_dtype)
    unet.to(dev).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt_params: list = params
    te_cfg = None
    if te is not None:  # after the UNet's LoRA: its init draws from global RNG after the UNet's
        te.requires_grad_(False)
        te_cfg = lora_config(run.lora_rank, run.lora_alpha, TEXT_ENCODER_TARGETS, run.lora_dropout)
        te.add_adapter(te_cfg)
        if amp_dtype is not None:
            for p in te.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(amp_dtype)
        te.to(dev).train()
        te_params = [p for p in te.parameters() if p.requires_grad]
        te_lr = run.text_encoder_lr if run.text_encoder_lr is not None else run.learning_rate
        opt_params = [
            {"params": params, "lr": run.learning_rate},
            {"params": te_params, "lr": te_lr},
        ]
        params = params + te_params  # clipping, all-reduce and broadcast cover both
    opt = make_optimizer(run, opt_params)
    sched = get_scheduler(
        run.lr_scheduler,
        optimizer=opt,
        num_warmup_steps=run.warmup_steps,
        num_training_steps=plan.total_steps,
    )
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")

    step, metrics = 0, []
    ckpts = _checkpoints(ckpt_dir)
    if ckpts:
        last = ckpts[-1]
        state = json.loads((last / "state.json").read_text())
        set_peft_model_state_dict(unet, load_file(last / "lora.safetensors", device=str(dev)))
        if te is not None:
            set_peft_model_state_dict(te, load_file(last / "lora_te.safetensors", device=str(dev)))
        opt_state = torch.load(last / "optimizer.pt", weights_only=True, map_location=dev)
        opt.load_state_dict(opt_state)
        sched.load_state_dict(state["lr_scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = state["step"]
        metrics = [json.loads(x) for x in (last / "metrics.jsonl").read_text().splitlines() if x]
        log.info("resumed from %s (step %d/%d)", last, step, plan.total_steps)
    if world > 1:
        distributed.broadcast_params(params)
    if tracker is not None:  # creates or continues the MLflow run; sends the restored history
        tracker.start(backlog=metrics, resumed_step=step)
    export_meta["lorapipe_fingerprint"] = fingerprint
    tag_freq = tag_counts((s["meta"].get("caption", "") for s in samples), run.dataset)

    def file_meta() -> dict[str, str]:
        run_id = tracker.run_id if tracker is not None else None
        return {**export_meta, **({"lorapipe_mlflow_run_id": run_id} if run_id else {})}

    te_meta = adapter_metadata(te_cfg) if te_cfg is not None else None

    def te_lora_state() -> dict | None:
        """The text encoder's LoRA weights (peft keys), or None when it is not trained."""
        return None if te is None else get_peft_model_state_dict(te, save_embedding_layers=False)

    forward = unet  # only the UNet is ever compiled
    if resolve_compile(run.compile, device):
        forward = torch.compile(unet)
    compile_checked = forward is unet  # until one whole step (forward + backward) has run

    def save_checkpoint():
        final = ckpt_dir / f"step-{step:06d}"
        tmp = ckpt_dir / f".step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        peft_state = get_peft_model_state_dict(unet)
        lora = {k: v.detach().float().cpu().contiguous() for k, v in peft_state.items()}
        save_safetensors(lora, tmp / "lora.safetensors")
        te_state = te_lora_state()
        if te_state is not None:
            te_lora = {k: v.detach().float().cpu().contiguous() for k, v in te_state.items()}
            save_safetensors(te_lora, tmp / "lora_te.safetensors")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        state = {
            "step": step,
            "fingerprint": fingerprint,
            "lr_scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        }
        (tmp / "state.json").write_text(json.dumps(state, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        # Both export layouts of this step, for picking the best step: a few MB each, so all
        # are kept (checkpoints carry optimizer state and serve resume only: the last few).
        meta = file_meta()
        meta.update(
            ss_steps=str(step),
            ss_epoch=str(math.ceil(step / plan.steps_per_epoch)),
            ss_num_epochs=str(plan.epochs),
        )
        export_checkpoint(
            peft_state, adapter_metadata(cfg), ckpt_dir / "exports" / f"step-{step:06d}",
            run.to_dict(), meta, tag_freq, te_state, te_meta,
        )  # fmt: skip

    log.info(
        "run %s: %d samples, %d steps (%d epochs x %d), precision %s, device %s, compile %s",
        run.name, len(samples), plan.total_steps, plan.epochs, plan.steps_per_epoch,
        precision, device, forward is not unet,
    )
    if world > 1:
        log.info("data-parallel: %d processes, global batch %d (%d per process)",
                 world, run.batch_size * world, run.batch_size)  # fmt: skip
    if te is not None:
        log.info("text encoder trained too (LoRA on %s, lr %g): captions encoded every step",
                 ", ".join(TEXT_ENCODER_TARGETS), opt.param_groups[1]["lr"])  # fmt: skip

    def micro_step(batch: list[int], epoch: int, n_images: int, forward) -> tuple[float, float]:
        """Data, forward, loss and backward of one micro-batch: (loss, seconds preparing data)."""
        td = time.perf_counter()
        lat, noise, ts, text = [], [], [], []  # text: tensors (cached) or prompts (te trained)
        for i in batch:
            s = samples[i]
            eps_latent, nz, t, drop, g = _draw(
                s, run.seed, epoch, noise_sched.config.num_train_timesteps, run.noise_offset
            )
            z = s["mean"].float() + torch.exp(0.5 * s["logvar"].float()) * eps_latent
            lat.append(z * scaling)
            noise.append(nz)
            ts.append(t)
            if te is None:
                text.append(_caption_tensor(s, drop, run.caption_dropout, empty_text, g))
            else:
                text.append(_caption_text(s, drop, run.caption_dropout, g))
        latents = torch.stack(lat).to(dev)
        noise_t = torch.stack(noise).to(dev)
        timesteps = torch.tensor(ts, device=dev, dtype=torch.long)
        cond = torch.stack(text).to(dev) if te is None else None
        noisy = noise_sched.add_noise(latents, noise_t, timesteps)
        if prediction == "epsilon":
            target = noise_t
        else:
            target = noise_sched.get_velocity(latents, noise_t, timesteps)
        data_s = time.perf_counter() - td
        with autocast():
            if te is not None:  # with grad, through the text encoder's LoRA
                cond = encode_prompts(tok, te, text, dev)
            pred = forward(noisy, timesteps, cond, return_dict=False)[0]
        err = (pred.float() - target.float()) ** 2
        per_sample = err.mean(dim=(1, 2, 3))
        if run.min_snr_gamma:
            snr = compute_snr(noise_sched, timesteps)
            w = torch.minimum(snr, torch.full_like(snr, run.min_snr_gamma))
            w = w / snr if prediction == "epsilon" else w / (snr + 1)
            per_sample = per_sample * w
        loss = per_sample.mean() * len(batch) / n_images
        if not torch.isfinite(loss) and not scaler.is_enabled():
            bad.extend(samples[i]["meta"]["path"] for i in batch)
            if world == 1:
                raise_nonfinite(bad)
            return float("nan"), data_s  # all ranks raise together, after the all-reduce
        scaler.scale(loss).backward()
        return float(loss.detach()), data_s

    def raise_nonfinite(paths):
        where = f"samples: {paths}" if paths else "samples: on another process"
        raise FloatingPointError(
            f"run {run.name}: non-finite loss at step {step + 1} ({where}); "
            f"last good checkpoint kept in {ckpt_dir}"
        )

    def autocast():
        return torch.autocast(
            device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        )

    def forward_backward(micro, epoch, n_images, forward) -> tuple[float, float]:
        """This rank's share of one optimizer step: its slice of each global micro-batch."""
        loss_sum, data_s = 0.0, 0.0
        bad.clear()
        for global_batch in micro:
            batch = global_batch[rank::world]
            if not batch:  # a last batch smaller than the number of processes
                continue
            loss, ds = micro_step(batch, epoch, n_images, forward)
            loss_sum += loss
            data_s += ds
        return loss_sum, data_s

    def warm_up(forward) -> tuple[object, int]:
        """Forward + backward once per batch shape before step 1, so compiling happens here and
        not mid-run. Changes nothing the LoRA depends on: no optimizer step, gradients zeroed,
        no per-sample draws (fixed timestep, mean latents), global RNG (LoRA dropout) restored.
        Returns (forward to train with: eager if compiling failed, number of shapes)."""
        global_batches = epoch_batches(samples, run.batch_size * world, run.seed, 0)
        shapes = warmup_shapes(samples, [b[rank::world] for b in global_batches])
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if device == "cuda" else None
        t_mid = noise_sched.config.num_train_timesteps // 2
        try:
            for batch in shapes:
                z = torch.stack([samples[i]["mean"].float() * scaling for i in batch]).to(dev)
                cond = torch.stack([samples[i]["text"].float() for i in batch]).to(dev)
                if te is not None:  # as in training, where cond comes from the trained encoder
                    cond.requires_grad_(True)
                timesteps = torch.full((len(batch),), t_mid, device=dev, dtype=torch.long)
                with autocast():
                    pred = forward(z, timesteps, cond, return_dict=False)[0]
                pred.float().pow(2).mean().backward()
        except Exception as e:  # a failed compile must not lose the run
            log.warning(
                "torch.compile failed during warm-up (%s: %s); training without compile",
                type(e).__name__, e,
            )  # fmt: skip
            forward = unet
        opt.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        return forward, len(shapes)

    warmup_s, warmup_passes, graphs_warmup, graphs_at_start = 0.0, 0, 0, 0
    if forward is not unet:
        graphs_at_start = _compiled_graphs()
        tw = time.perf_counter()
        forward, warmup_passes = warm_up(forward)
        warmup_s = time.perf_counter() - tw
        graphs_warmup = _compiled_graphs() - graphs_at_start
        log.info(
            "torch.compile warm-up: %d batch shape(s) in %.1f s, %d graph(s) compiled%s",
            warmup_passes, warmup_s, graphs_warmup, "" if forward is not unet else " (failed)",
        )  # fmt: skip
    graphs_after_warmup = _compiled_graphs() if forward is not unet else 0

    bad: list[str] = []  # samples of this rank with a non-finite loss in the current step
    t_loop = time.perf_counter()
    steps_at_loop_start = step
    step_times: list[float] = []
    while step < plan.total_steps:
        epoch, local = divmod(step, plan.steps_per_epoch)
        batches = epoch_batches(samples, run.batch_size * world, run.seed, epoch)
        micro = batches[local * run.gradient_accumulation : (local + 1) * run.gradient_accumulation]
        t0 = time.perf_counter()
        n_images = sum(len(b) for b in micro)
        if run.lora_dropout or te is not None:  # LoRA (and a text encoder's own) dropout draws
            # from global RNG: seed it per step (and rank), so a resumed run draws the masks an
            # uninterrupted one drew
            torch.manual_seed(_seed_of(run.seed, "dropout", step, rank))
        if compile_checked:
            loss_sum, data_s = forward_backward(micro, epoch, n_images, forward)
        else:  # Inductor compiles the forward here and the backward at the first backward():
            # guard both, so a compile failure in either costs one redone step, not the run
            rng = torch.get_rng_state()
            try:
                loss_sum, data_s = forward_backward(micro, epoch, n_images, forward)
            except FloatingPointError:
                raise
            except Exception as e:
                log.warning(
                    "torch.compile failed in the first step (%s: %s); redoing the step eagerly "
                    "and training without compile", type(e).__name__, e,
                )  # fmt: skip
                opt.zero_grad(set_to_none=True)
                torch.set_rng_state(rng)
                forward = unet
                loss_sum, data_s = forward_backward(micro, epoch, n_images, forward)
            compile_checked = True
        if world > 1:  # sum the LoRA gradients and the loss over ranks: every rank steps alike
            distributed.all_reduce_grads(params)
            loss_sum, n_bad = distributed.all_reduce_floats([loss_sum, len(bad)], dev)
            if n_bad:
                raise_nonfinite(bad)
        scaler.unscale_(opt)
        if run.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm)
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        skipped = scale_before is not None and scaler.get_scale() < scale_before
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        step_times.append(dt)
        m = {
            "step": step,
            "epoch": epoch + 1,
            "loss": loss_sum,
            "lr": sched.get_last_lr()[0],
            **({"lr_text_encoder": sched.get_last_lr()[1]} if te is not None else {}),
            "images_per_s": n_images / dt if dt > 0 else 0.0,
            "data_wait": data_s / dt if dt > 0 else 0.0,
            "skipped": bool(skipped),
            "time": time.time(),
        }
        if device == "cuda":  # peak of this step, and what the caching allocator holds
            m["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            m["gpu_mem_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
            torch.cuda.reset_peak_memory_stats()
        metrics.append(m)
        if tracker is not None:
            tracker.log(m)
        done = step - steps_at_loop_start
        eta = (time.perf_counter() - t_loop) / done * (plan.total_steps - step)
        (log.info if dist.main else log.debug)(
            "Epoch %d/%d | Step %d/%d | Loss %.4f | LR %.2e | %.1f img/s | data %.0f%% | ETA %s",
            epoch + 1, plan.epochs, step, plan.total_steps, loss_sum, m["lr"],
            m["images_per_s"], 100 * m["data_wait"], _fmt_eta(eta),
        )
        if step % plan.save_steps == 0 and step < plan.total_steps and dist.main:
            save_checkpoint()
        if stop_after is not None and step >= stop_after:
            return {"stopped_at": step}

    if not dist.main:  # rank 0 writes every file
        return {"steps": step, "rank": rank}

    if tracker is not None:  # every step sent (or given up on) before the run id is written down
        tracker.flush()
    # Export: diffusers/PEFT keys, with the adapter config (alpha!) and the trace in the metadata.
    trace = {k: v for k, v in file_meta().items() if k.startswith("lorapipe_")}
    save_diffusers_lora(
        get_peft_model_state_dict(unet), adapter_metadata(cfg),
        out_dir / "pytorch_lora_weights.safetensors", trace,
        te_lora_state(), te_meta,
    )  # fmt: skip
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    plot_loss(metrics, out_dir / "loss.png", run.name)
    steady = [m["images_per_s"] for m in metrics[steps_at_loop_start + 1 :]]
    compiled = forward is not unet
    # Compile time: warm-up plus the first step (Inductor compiles forward and backward there)
    # minus what as many steady steps take (median of the later steps; with one step, all of
    # it counts). Recompiles: graphs compiled after warm-up (0 when warm-up saw every shape).
    steady_step = _median(step_times[1:]) if len(step_times) > 1 else 0.0
    compile_s = 0.0
    if compiled and step_times:
        compile_s = max(0.0, warmup_s + step_times[0] - (warmup_passes + 1) * steady_step)
    recompiles = _compiled_graphs() - graphs_after_warmup if compiled else 0
    if recompiles:
        log.warning("torch.compile recompiled %d time(s) after warm-up", recompiles)
    summary = {
        "steps": step,
        "epochs": plan.epochs,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "precision": precision,
        "device": device,
        "compiled": compiled,
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "warmup_shapes": warmup_passes,
        "warmup_graphs": graphs_warmup,
        "recompiles": recompiles,
        "wall_s": time.perf_counter() - t_start,
        "images_per_s_steady": sum(steady) / len(steady) if steady else None,
        "samples": len(samples),
        "processes": world,
        "mlflow_run_id": trace.get("lorapipe_mlflow_run_id"),
    }
    atomic_write_text(out_dir / "train_summary.json", json.dumps(summary, indent=1))
    log.info(
        "trained %d steps in %.1f s: %.1f img/s steady; compile %s (warm-up %.1f s over %d "
        "shape(s), compile %.1f s, %d recompile(s) after warm-up)",
        step, summary["wall_s"], summary["images_per_s_steady"] or 0.0, compiled, warmup_s,
        warmup_passes, compile_s, recompiles,
    )  # fmt: skip
    return summary


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def plot_loss(metrics: list[dict], path: str | os.PathLike, title: str) -> None:
    """Loss per step (and a moving average) as a PNG."""
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
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"run {title}")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
