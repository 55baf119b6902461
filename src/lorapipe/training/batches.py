"""What one optimizer step trains on: the plan of a run, the batch order of an epoch, the random
numbers each sample draws, the batch tensors and the diffusion loss.

Everything here is a pure function of (sample keys, settings, seed, epoch): no global RNG state.
That is what makes a resumed run draw exactly what an uninterrupted one drew.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from ..config import RunConfig


@dataclass(frozen=True)
class Plan:
    """How many micro-batches and optimizer steps a run has."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    save_steps: int


def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (sha256 of their ``str``, ``:``-joined)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The global-RNG seed of optimizer step ``step`` on ``rank``: LoRA dropout masks draw from
    global RNG, so a resumed run reseeds it per step to draw the masks an uninterrupted one drew."""
    return seed_of(seed, "dropout", step, rank)


def epoch_batches(samples: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sample indices for one epoch: shuffled within each bucket, batches shuffled.

    A batch never mixes bucket sizes. Pure function of (sample keys, batch size, seed, epoch).
    """
    import torch

    g = torch.Generator().manual_seed(seed_of(seed, "order", epoch))
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


def step_micro_batches(samples: list[dict], run: RunConfig, world: int, plan: Plan, step: int):
    """(epoch, the global micro-batches of optimizer step ``step``): a pure function of step."""
    epoch, local = divmod(step, plan.steps_per_epoch)
    batches = epoch_batches(samples, run.batch_size * world, run.seed, epoch)
    acc = run.gradient_accumulation
    return epoch, batches[local * acc : (local + 1) * acc]


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


def draw(sample: dict, seed: int, epoch: int, num_timesteps: int, noise_offset: float):
    """The random numbers one sample gets in one epoch, from its own generator:
    (latent eps, noise, timestep, dropout draw, the generator for later draws)."""
    import torch

    g = torch.Generator().manual_seed(seed_of(seed, "sample", epoch, sample["key"]))
    mean = sample["mean"].float()
    eps_latent = torch.randn(mean.shape, generator=g)
    noise = torch.randn(mean.shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((mean.shape[0], 1, 1), generator=g)
    t = int(torch.randint(0, num_timesteps, (1,), generator=g))
    drop = float(torch.rand((), generator=g))
    return eps_latent, noise, t, drop, g


def pick_caption(n_variants: int, drop: float, caption_dropout: float, g) -> int | None:
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


def caption_cond(sample, drop: float, caption_dropout: float, empty: dict, g) -> dict:
    """The cached text-encoder outputs a sample trains with this epoch (see `pick_caption`):
    ``{name: tensor}`` for each output the family encodes (``empty``'s names)."""
    names = list(empty)
    variants = sample.get(f"{names[0]}_variants")
    k = pick_caption(len(variants) if variants is not None else 0, drop, caption_dropout, g)
    if k is None:
        return empty
    if k >= 0:
        return {n: sample[f"{n}_variants"][k].float() for n in names}
    return {n: sample[n].float() for n in names}


def caption_tensor(sample, drop: float, caption_dropout: float, empty_text, g):
    """`caption_cond`'s ``text`` (the UNet's encoder hidden states), for one sample."""
    return caption_cond(sample, drop, caption_dropout, {"text": empty_text}, g)["text"]


def caption_text(sample, drop: float, caption_dropout: float, g) -> str:
    """The prompt text a sample trains with this epoch when the text encoder is trained: the
    same choice (and the same draw from ``g``) as `caption_cond` makes among cached tensors."""
    variants = sample["meta"].get("caption_variants") or []
    k = pick_caption(len(variants), drop, caption_dropout, g)
    if k is None:
        return ""
    return variants[k] if k >= 0 else sample["meta"]["caption"]


@dataclass(frozen=True)
class BatchRecipe:
    """The settings `make_batch` turns samples into tensors with (one per run)."""

    seed: int
    noise_scheduler: object  # diffusers DDPMScheduler of the base model
    prediction: str  # "epsilon" | "v_prediction"
    scaling: float  # the VAE's latent scaling factor
    noise_offset: float
    caption_dropout: float
    empty: dict  # the cached text-encoder outputs of "" (caption dropout), float
    prompts: bool  # True: captions as text (the text encoder is trained), else cached tensors


@dataclass
class HostBatch:
    """One micro-batch as made on the host (CPU), before it goes to the training device."""

    latents: object  # drawn latents, scaled (B, C, H, W)
    noise: object  # (B, C, H, W)
    timesteps: object  # (B,) long
    cond: dict | None  # stacked cached text-encoder outputs, or None when ``prompts`` is set
    prompts: list[str] | None  # the captions, when the text encoder encodes them with grad
    metas: list[dict]  # the samples' metadata (size conditioning of some families)

    def pinned(self) -> HostBatch:
        """The same batch in page-locked memory (for non-blocking copies to a GPU)."""
        cond = None if self.cond is None else {k: v.pin_memory() for k, v in self.cond.items()}
        return HostBatch(self.latents.pin_memory(), self.noise.pin_memory(),
                         self.timesteps.pin_memory(), cond, self.prompts, self.metas)  # fmt: skip


@dataclass
class Batch:
    """One micro-batch on the training device."""

    noisy: object  # noised latents (B, C, H, W)
    timesteps: object  # (B,) long
    target: object  # what the UNet should predict: noise, or velocity for v-prediction
    cond: dict | None  # cached text-encoder outputs, or None when ``prompts`` is set
    prompts: list[str] | None
    metas: list[dict]


def host_batch(samples, batch: list[int], epoch: int, r: BatchRecipe) -> HostBatch:
    """The host tensors of micro-batch ``batch`` (sample indices) in ``epoch``: each sample's
    latent drawn from its cached distribution, its noise, timestep and caption from `draw`.
    A pure function of its arguments (safe to run ahead in another thread)."""
    import torch

    lat, noise, ts, text = [], [], [], []
    n_t = r.noise_scheduler.config.num_train_timesteps
    for i in batch:
        s = samples[i]
        eps_latent, nz, t, drop, g = draw(s, r.seed, epoch, n_t, r.noise_offset)
        z = s["mean"].float() + torch.exp(0.5 * s["logvar"].float()) * eps_latent
        lat.append(z * r.scaling)
        noise.append(nz)
        ts.append(t)
        if r.prompts:
            text.append(caption_text(s, drop, r.caption_dropout, g))
        else:
            text.append(caption_cond(s, drop, r.caption_dropout, r.empty, g))
    cond = None if r.prompts else {k: torch.stack([c[k] for c in text]) for k in r.empty}
    metas = [samples[i]["meta"] for i in batch]
    timesteps = torch.tensor(ts, dtype=torch.long)
    prompts = text if r.prompts else None
    return HostBatch(torch.stack(lat), torch.stack(noise), timesteps, cond, prompts, metas)


def device_batch(hb: HostBatch, r: BatchRecipe, device, non_blocking: bool = False) -> Batch:
    """A host batch on the device, noised, with its training target."""
    def to(t):
        return t.to(device, non_blocking=non_blocking)

    latents, noise, timesteps = to(hb.latents), to(hb.noise), to(hb.timesteps)
    noisy = r.noise_scheduler.add_noise(latents, noise, timesteps)
    if r.prediction == "epsilon":
        target = noise
    else:
        target = r.noise_scheduler.get_velocity(latents, noise, timesteps)
    cond = None if hb.cond is None else {k: to(v) for k, v in hb.cond.items()}
    return Batch(noisy, timesteps, target, cond, hb.prompts, hb.metas)


def make_batch(samples, batch: list[int], epoch: int, r: BatchRecipe, device) -> Batch:
    """`host_batch` then `device_batch`: micro-batch ``batch`` on the device."""
    return device_batch(host_batch(samples, batch, epoch, r), r, device)


def diffusion_loss(pred, batch: Batch, r: BatchRecipe, min_snr_gamma: float | None):
    """Per-sample loss (B,): mean squared error of the prediction, min-SNR weighted when
    ``min_snr_gamma`` is set (weights for epsilon: min(SNR, γ)/SNR, 1 where SNR is 0 (the last
    step of a zero-terminal-SNR schedule); v-prediction: min(SNR, γ)/(SNR+1))."""
    import torch
    from diffusers.training_utils import compute_snr

    err = (pred.float() - batch.target.float()) ** 2
    per_sample = err.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = compute_snr(r.noise_scheduler, batch.timesteps)
        w = torch.minimum(snr, torch.full_like(snr, min_snr_gamma))
        if r.prediction == "epsilon":  # a zero-terminal-SNR schedule's last step: SNR 0, the
            w = torch.where(snr > 0, w / snr, torch.ones_like(snr))  # weight's limit is 1
        else:
            w = w / (snr + 1)
        per_sample = per_sample * w
    return per_sample
