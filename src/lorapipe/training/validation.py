"""The validation loss of a run: held-out images (`lorapipe.holdout`), measured the same way at
every evaluation, in every run and after every resume.

What makes it comparable:

- fixed draws per image, from a generator seeded by the image's key alone (not the run's seed,
  so two runs with different seeds are measured on the same noise): `VAL_TIMESTEPS` timesteps
  spread over the schedule (one in each equal stratum of [0, T), at a seeded place in it) and
  one noise tensor for each;
- the latent mean (no latent sample), the caption as written (no variant, no dropout), no noise
  offset, the plain mean squared error of the model's target (no min-SNR weighting), in eval
  mode (no LoRA dropout);
- batches of ``batch_size`` images × their timesteps (no gradients are kept, so this fits
  where a training batch fits), one bucket size a batch;
- evaluated every ``val_every_steps`` steps (default: at each ``save_steps`` checkpoint) and at
  the last step, right after the optimizer step, on rank 0. The value goes into that step's
  metrics record (``val_loss``), so checkpoints keep it and a resumed run reports what an
  uninterrupted one reports.

It never changes what trains: it reads the LoRA under ``no_grad`` on the eager UNet (never the
compiled one, so no recompiles), with the global RNG state forked and put back, and modules put
back into their training mode. The best step (lowest ``val_loss``, the earliest of equals) gets
its export written when it is not a checkpoint step already (`after_step` says so; the loop
writes it).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from ..config import ConfigError
from ..holdout import Holdout

log = logging.getLogger("lorapipe.train")

VAL_TIMESTEPS = 4  # timesteps per validation image (fixed: part of what makes losses comparable)


@dataclass
class Validation:
    """The validation set of a run and what evaluating it found so far."""

    holdout: Holdout
    samples: list  # sample mappings (key, meta, mean, text, …)
    losses: dict[int, float] = field(default_factory=dict)  # step -> val_loss
    seconds: float = 0.0

    def best(self) -> tuple[int, float] | None:
        """(step, val_loss) of the lowest validation loss so far, the earliest of equals."""
        finite = [(v, s) for s, v in self.losses.items() if math.isfinite(v)]
        if not finite:
            return None
        v, s = min(finite)
        return s, v


def prepare(job, samples: list) -> tuple[list, Validation | None]:
    """(training samples, the run's `Validation` or None) from the loaded training samples and
    ``job.validation`` (`Holdout.to_dict` plus ``shards``: a validation dataset's latents).

    Raises:
        ConfigError: a split that leaves no training image, naming its key.
    """
    spec = job.validation or {}
    h = Holdout.from_dict(spec)
    if h is None or not h.active:
        return samples, None
    if h.dataset is not None:
        from ..latents import load_latent_cache

        train, val = list(samples), list(load_latent_cache(spec.get("shards") or [])[0])
    else:
        train, val = h.split_samples(samples)
    if samples and not train:
        raise ConfigError(f"invalid config: {h.no_training_image(len(samples))}")
    log.info("validation: %d image(s), %s; training: %d image(s)", len(val), h.describe(),
             len(train))  # fmt: skip
    if not val:
        log.warning("%s holds out no image of %d: no validation loss", h.key, len(samples))
        return train, None
    return train, Validation(h, val)


def due(st, step: int) -> bool:
    """Whether step ``step`` is evaluated: every val_every_steps (else save_steps), and last."""
    every = st.job.run.val_every_steps or st.plan.save_steps
    return step % every == 0 or step == st.plan.total_steps


def after_step(st, record: dict) -> bool:
    """After optimizer step ``st.step``: its validation loss into ``record`` (its metrics line)
    when it is due. True when the step is a new best that gets no checkpoint export: the loop
    exports it then."""
    v = st.val
    if v is None or not st.dist.main or not due(st, st.step):
        return False
    for m in st.metrics:  # restored from a checkpoint, or recorded earlier
        if "val_loss" in m:
            v.losses.setdefault(m["step"], m["val_loss"])
    before = v.best()
    t0 = time.perf_counter()
    loss = evaluate(st, v.samples)
    v.seconds += time.perf_counter() - t0
    record["val_loss"] = loss
    v.losses[st.step] = loss
    log.info("Step %d/%d | val loss %.5f (%d images, %.1f s)%s", st.step, st.plan.total_steps,
             loss, len(v.samples), time.perf_counter() - t0,
             " | best so far" if v.best() == (st.step, loss) else "")  # fmt: skip
    new_best = v.best() == (st.step, loss) and before != v.best()
    checkpointed = st.step % st.plan.save_steps == 0 or st.step == st.plan.total_steps
    return new_best and not checkpointed


def fixed_draws(key: str, shape: tuple, num_timesteps: int):
    """The timesteps (`VAL_TIMESTEPS`, one per stratum of [0, T)) and noise tensors of one
    validation image: from its key alone."""
    import torch

    from .batches import seed_of

    g = torch.Generator().manual_seed(seed_of("validation", key))
    u = torch.rand(VAL_TIMESTEPS, generator=g, dtype=torch.float64).tolist()
    k = VAL_TIMESTEPS
    ts = [min(num_timesteps - 1, int((j + u[j]) * num_timesteps / k)) for j in range(k)]
    return ts, [torch.randn(shape, generator=g) for _ in range(k)]


def _items(samples: list) -> list[tuple[int, int]]:
    """(sample index, draw) pairs, grouped by bucket size (a batch never mixes sizes)."""
    order = sorted(range(len(samples)), key=lambda i: (tuple(samples[i]["meta"]["size"]),
                                                       samples[i]["key"]))  # fmt: skip
    return [(i, j) for i in order for j in range(VAL_TIMESTEPS)]


def _batches(samples: list, batch_size: int) -> list[list[tuple[int, int]]]:
    out, cur, size = [], [], None
    for i, j in _items(samples):
        s = tuple(samples[i]["meta"]["size"])
        if cur and (s != size or len(cur) == batch_size):
            out.append(cur)
            cur = []
        cur.append((i, j))
        size = s
    return out + ([cur] if cur else [])


def _host_batch(samples: list, items: list[tuple[int, int]], recipe, draws: dict):
    """The host tensors of validation items: mean latents, fixed noise and timesteps, the
    caption as written (cached outputs, or its text when the text encoder is trained)."""
    import torch

    from .batches import HostBatch

    n_t = recipe.noise_scheduler.config.num_train_timesteps
    lat, noise, ts, conds, prompts, metas = [], [], [], [], [], []
    for i, j in items:
        s = samples[i]
        mean = s["mean"].float()
        if i not in draws:
            draws.clear()  # items come grouped by sample: keep one sample's draws
            draws[i] = fixed_draws(s["key"], tuple(mean.shape), n_t)
        t, nz = draws[i]
        lat.append(mean * recipe.scaling)
        noise.append(nz[j])
        ts.append(t[j])
        metas.append(s["meta"])
        if recipe.prompts:
            prompts.append(s["meta"]["caption"])
        else:
            conds.append({n: s[n].float() for n in recipe.empty})
    cond = None if recipe.prompts else {n: torch.stack([c[n] for c in conds]) for n in recipe.empty}
    return HostBatch(torch.stack(lat), torch.stack(noise), torch.tensor(ts, dtype=torch.long),
                     cond, prompts if recipe.prompts else None, metas)  # fmt: skip


def evaluate(st, samples: list) -> float:
    """Mean validation loss of the current LoRA over ``samples`` × their fixed draws."""
    import torch

    from .batches import device_batch

    dev = st.device.torch_device
    modules = [st.model.unet, *st.text_encoders()]
    modes = [m.training for m in modules]
    forks = [dev.index or 0] if st.device.kind == "cuda" else []
    total, n, draws = 0.0, 0, {}
    with torch.random.fork_rng(devices=forks), torch.no_grad():
        for m in modules:
            m.eval()
        try:
            # no grad: room for every timestep of batch_size images at once
            for items in _batches(samples, st.job.run.batch_size * VAL_TIMESTEPS):
                b = device_batch(_host_batch(samples, items, st.recipe, draws), st.recipe, dev)
                with st.device.autocast():
                    cond = b.cond
                    if b.prompts is not None:
                        cond = st.family.encode_prompts(st.model.text_parts, b.prompts, dev)
                    added = st.family.added_cond(cond, b.metas, dev)
                    kwargs = {"added_cond_kwargs": added} if added is not None else {}
                    pred = st.model.unet(b.noisy, b.timesteps, cond["text"], return_dict=False,
                                         **kwargs)[0]  # fmt: skip
                err = (pred.float() - b.target.float()).pow(2).mean(dim=(1, 2, 3))
                total += float(err.double().sum())
                n += len(items)
        finally:
            for m, was in zip(modules, modes, strict=True):
                m.train(was)
    return total / n


def summary(st) -> dict:
    """The validation fields of train_summary.json (none without validation); logs the best."""
    v = st.val
    if v is None:
        return {}
    for m in st.metrics:
        if "val_loss" in m:
            v.losses.setdefault(m["step"], m["val_loss"])
    best = v.best()
    step, loss = best if best is not None else (None, None)
    last = v.losses.get(st.step)
    out = {
        "val_loss": last,
        "best_step": step,
        "best_val_loss": loss,
        "best_is_last": step == st.step,
        "best_export": None if step in (None, st.step) else str(st.layout.export(step)),
        "train_images": len(st.samples),
        "validation_images": len(v.samples),
        "validation_source": v.holdout.describe(),
        "val_every_steps": st.job.run.val_every_steps or st.plan.save_steps,
        "val_s": v.seconds,
    }
    if step is not None:
        log.info("validation: best step %d (val loss %.5f)%s; last step %d: %s", step, loss,
                 " = the last step" if step == st.step else "", st.step,
                 "-" if last is None else f"{last:.5f}")  # fmt: skip
    return out
