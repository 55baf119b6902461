"""The train stage: one LoRA trained from the latent cache. Read `_train` top to bottom.

Reproducibility rules this stage keeps (docs/ARCHITECTURE.md, "Exact resume"):
- the batch order of epoch ``e`` is a pure function of (seed, e), and every random draw for a sample
  (latent sample, noise, timestep, caption dropout) comes from a generator seeded by
  (seed, epoch, sample key) — never from global RNG state. So a resumed run sees each sample exactly
  once per epoch and draws the same numbers an uninterrupted run would have drawn;
- a checkpoint holds LoRA weights, optimizer, LR schedule, scaler and the step; the data position is
  derived from the step. Resuming from it gives bit-identical LoRA bytes on CPU.

Side channels that never change the LoRA: live MLflow metrics (a `live_tracking.LiveTracker`,
optional) and, at each checkpoint, both export layouts of that step (`training.checkpoints`).
Data-parallel runs (``num_processes > 1``): this process is rank 0 and starts the others through
`distributed` (their entry point is `worker`); rank 0 alone writes files and talks to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import distributed
from .config import RunConfig
from .io import atomic_write_text
from .training import checkpoints, validation
from .training.batches import (  # noqa: F401  (the stage's vocabulary, re-exported)
    BatchRecipe,
    Plan,
    device_batch,
    diffusion_loss,
    dropout_seed,
    epoch_batches,
    make_batch,
    make_plan,
    step_micro_batches,
)
from .training.compiling import compiled_graphs, guarded_first_step, warm_up
from .training.feed import Feed
from .training.prepare import (
    Device,
    Model,
    build_model,
    deterministic_mode,
    make_optimizer,
    make_schedule,
    prediction_type,
    resolve_compile,
    resolve_prefetch,
    training_device,
)
from .training.report import log_progress, log_summary, plot_loss, step_record, summary

log = logging.getLogger(__name__)
WORKER = "lorapipe.worker"  # the module the other ranks of a data-parallel run start as


@dataclass
class Job:
    """What a run's processes train: the same for every rank (sent to the others as JSON)."""

    run: RunConfig
    latent_shards: list[str]
    model_path: str
    out_dir: str
    ckpt_dir: str
    fingerprint: str
    stop_after: int | None = None  # stop (writing no outputs) after this step: resume tests
    original_config: str | None = None  # a single-file base model's local diffusers folder
    validation: dict | None = None  # holdout.Holdout.to_dict() + "shards" (training.validation)
    vae: str | None = None  # the base model's VAE override folder (its latent scaling factor)

    def to_dict(self) -> dict:
        return {**asdict(self), "run": self.run.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        return cls(**{**d, "run": RunConfig.from_dict(d["run"])})


@dataclass
class State:
    """Everything the loop reads and changes; built by `_prepare`."""

    job: Job
    dist: distributed.Dist
    device: Device
    family: object
    samples: list[dict]
    plan: Plan
    model: Model
    recipe: BatchRecipe
    opt: object
    sched: object
    scaler: object
    layout: checkpoints.Layout
    tracker: object = None
    export_meta: dict = field(default_factory=dict)
    tag_freq: dict = field(default_factory=dict)
    step: int = 0
    metrics: list[dict] = field(default_factory=list)
    forward: object = None  # the UNet, or torch.compile of it
    compile_checked: bool = True  # False until one whole compiled step has run
    compile: dict = field(default_factory=dict)  # warm-up timings and graph counts
    step_times: list[float] = field(default_factory=list)
    step_images: list[int] = field(default_factory=list)  # images of each step of this session
    step_ends: list[float] = field(default_factory=list)  # perf_counter at each step's end
    loop_start_step: int = 0
    started_at: float = 0.0  # unix time this training session started
    cache: object = None  # the `latent_cache.LatentCache` the samples come from
    feed: Feed | None = None  # host batches made ahead (None: made in the loop)
    val: validation.Validation | None = None  # the held-out images (None: no validation)

    def file_meta(self) -> dict[str, str]:
        """Metadata of every exported file: the run's trace, and the MLflow run id if any."""
        # the tracker opens the MLflow run while training starts: the first export waits for it
        tracker = self.tracker
        run_id = tracker.run_id if tracker is not None and tracker.reached() else None
        return {**self.export_meta, **({"lorapipe_mlflow_run_id": run_id} if run_id else {})}

    def text_encoders(self) -> list:
        return self.family.text_encoders(self.model.text_parts) if self.model.trains_text else []


def train(
    run: RunConfig,
    latent_shards: list[str],
    model_path: str,
    out_dir: str,
    ckpt_dir: str,
    fingerprint: str,
    stop_after: int | None = None,
    tracker=None,
    export_meta: dict[str, str] | None = None,
    original_config: str | None = None,
    validation: dict | None = None,
    vae: str | None = None,
) -> dict:
    """Train one LoRA; resume from ``ckpt_dir`` when it holds a checkpoint of this fingerprint.

    Writes ``pytorch_lora_weights.safetensors`` (diffusers/PEFT keys; alpha/rank baked into
    the up weights, see `export.save_diffusers_lora`),
    ``metrics.jsonl``, ``loss.png`` and ``train_summary.json`` into ``out_dir``.

    Args:
        fingerprint: identity of (config, data, model, code); checkpoints of another fingerprint
            are never resumed.
        stop_after: stop (without writing outputs) after this step — for tests of resume.
        tracker: a `live_tracking.LiveTracker` for live MLflow metrics, or None (no MLflow).
            Its run id goes into the exported files' metadata (``lorapipe_mlflow_run_id``) and
            the summary. The run ends FINISHED, FAILED on an error, KILLED when stopped early.
        export_meta: string metadata for every exported file (`runs.file_metadata`): the kohya
            files of checkpoints get all of it, diffusers files the ``lorapipe_*`` fields.
        original_config: for a single-file base model, the local diffusers folder describing it.
        validation: the held-out images (`training.validation`): `holdout.Holdout.to_dict`,
            plus ``shards`` (a validation dataset's latent shards); None: no validation loss.
        vae: the base model's VAE override folder (`models.load_parts`), if it has one.

    Returns:
        Summary: steps, epochs, final loss, timings, samples, MLflow run id.
    """
    job = Job(run, [str(x) for x in latent_shards], str(model_path), str(out_dir), str(ckpt_dir),
              fingerprint, stop_after, original_config, validation, vae)  # fmt: skip
    return run_job(job, tracker, export_meta)


def run_job(job: Job, tracker=None, export_meta: dict[str, str] | None = None) -> dict:
    """`train` for a `Job`: joins or starts the process group, ends the MLflow run."""
    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    dist = None
    try:
        dist = distributed.start(job.run.name, job.run.num_processes, kind, job.to_dict(), WORKER)
        if not dist.main:
            tracker = None
        with deterministic_mode(job.run.deterministic, kind):
            result = _train(job, tracker, dict(export_meta or {}), dist)
        distributed.finish(dist, ok=True)
    except BaseException as e:
        if dist is not None:
            distributed.finish(dist, ok=False)
        if tracker is not None:
            tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.close("KILLED" if "stopped_at" in result else "FINISHED")
    return result


def _train(job: Job, tracker, export_meta: dict, dist: distributed.Dist) -> dict:
    """Set up, warm up the compiled UNet, loop over the steps, write the outputs."""
    t_start, started_at = time.perf_counter(), time.time()
    st = _prepare(job, tracker, export_meta, dist)
    st.started_at = started_at
    _log_start(st)
    warm_up(st)
    st.loop_start_step = st.step
    st.feed = Feed(st, st.step, pin=st.device.kind == "cuda",
                   enabled=resolve_prefetch(job.run.prefetch, st.device.kind, st.cache))
    t_loop, pending = time.perf_counter(), None
    try:
        while st.step < st.plan.total_steps:
            epoch, micro = step_micro_batches(st.samples, job.run, dist.world, st.plan, st.step)
            taken = _optimizer_step(st, epoch, micro)
            if validation.after_step(st, taken.record):  # val_loss into the step's record
                _export_step(st, *_lora_states(st))  # a new best step that is no checkpoint
            if pending is not None:  # the last step's loss, read while this one runs
                _record(st, pending, t_loop)
            pending = taken
            saving = st.step % st.plan.save_steps == 0 and st.step < st.plan.total_steps
            stopping = job.stop_after is not None and st.step >= job.stop_after
            if saving or stopping or st.step == st.plan.total_steps:
                pending = _record(st, pending, t_loop)
            if saving and dist.main:
                _save_checkpoint(st)
            if stopping:
                return {"stopped_at": st.step}
    finally:
        st.feed.close()
        st.cache.close()
    if not dist.main:  # rank 0 writes every file
        return {"steps": st.step, "rank": dist.rank}
    return _write_outputs(st, t_start)


def _prepare(job: Job, tracker, export_meta: dict, dist: distributed.Dist) -> State:
    """Data, model + LoRA, optimizer; restored from the last checkpoint of this fingerprint."""
    import torch

    from . import models
    from .export import tag_counts
    from .families import family_of
    from .latent_cache import LatentCache

    run = job.run
    device = training_device(run, dist.local_rank)
    cache = LatentCache(job.latent_shards, run.latent_cache_ram_mb)
    samples, cached_empty = cache.samples, cache.empty
    samples, val = validation.prepare(job, samples)  # the held-out images never train
    (log.info if dist.main else log.debug)("%s", cache.describe())
    if not samples:
        n = len(job.latent_shards)
        raise ValueError(f"run {run.name}: no training samples in {n} shard(s)")
    distributed.connect(dist)
    plan = make_plan(samples, run, dist.world)
    family = family_of(job.model_path, job.original_config)
    # The latent cache holds the empty prompt's encoding (caption dropout); only a cache written
    # before it was stored, or training the text encoder, makes training load the text encoder.
    need_text = cached_empty is None or bool(run.train_text_encoder)
    parts = models.load_parts(
        job.model_path, family.training_parts(need_text), job.original_config, vae=job.vae
    )
    if cached_empty is not None:
        empty = {k: v.float() for k, v in cached_empty.items()}
    else:
        with torch.inference_mode():  # as the latent stage encodes it
            empty = {k: v[0].clone() for k, v in family.encode_prompts(parts, [""]).items()}
    prediction = prediction_type(run, parts["scheduler"])
    model = build_model(run, family, parts, device)
    del parts
    opt = make_optimizer(run, model.param_groups)
    recipe = BatchRecipe(run.seed, model.scheduler, prediction, model.scaling, run.noise_offset,
                         run.caption_dropout, empty, model.trains_text)  # fmt: skip
    st = State(
        job, dist, device, family, samples, plan, model, recipe, opt,
        make_schedule(run, opt, plan.total_steps),
        torch.amp.GradScaler(device.kind, enabled=device.precision == "fp16"),
        checkpoints.Layout(job.ckpt_dir, job.fingerprint, dist.world), tracker, export_meta,
        cache=cache,
    )  # fmt: skip
    st.val = val
    last = st.layout.latest()
    if last is not None:
        st.step, st.metrics = checkpoints.restore(
            last, model.unet, st.text_encoders(), opt, st.sched, st.scaler, device.torch_device
        )
        log.info("resumed from %s (step %d/%d)", last, st.step, plan.total_steps)
    if dist.world > 1:
        distributed.broadcast_params(model.params)
    if tracker is not None:  # creates or continues the MLflow run; sends the restored history
        tracker.start(backlog=st.metrics, resumed_step=st.step)
    export_meta["lorapipe_fingerprint"] = job.fingerprint
    st.tag_freq = tag_counts((s["meta"].get("caption", "") for s in samples), run.dataset)
    if last is not None and dist.main and st.step not in st.layout.saved_exports():
        # killed between the checkpoint and its exports: the restored weights are that step's
        _export_step(st, *_lora_states(st))
    st.forward = model.unet  # only the UNet is ever compiled
    if resolve_compile(run.compile, device.kind):
        st.forward = torch.compile(model.unet)
    st.compile_checked = st.forward is model.unet
    return st


def _log_start(st: State) -> None:
    run, plan = st.job.run, st.plan
    log.info(
        "run %s: %d samples, %d steps (%d epochs x %d), precision %s, device %s, compile %s",
        run.name, len(st.samples), plan.total_steps, plan.epochs, plan.steps_per_epoch,
        st.device.precision, st.device.kind, st.forward is not st.model.unet,
    )  # fmt: skip
    if st.dist.world > 1:
        log.info("data-parallel: %d processes, global batch %d (%d per process)",
                 st.dist.world, run.batch_size * st.dist.world, run.batch_size)  # fmt: skip
    if st.model.trains_text:
        log.info("text encoder trained too (LoRA on %s, lr %g): captions encoded every step",
                 ", ".join(st.family.text_lora_targets), st.opt.param_groups[1]["lr"])  # fmt: skip


def _micro_step(st: State, batch: list[int], epoch: int, n_images: int):
    """Data, forward, loss and backward of one micro-batch: (loss on the device, seconds
    waiting for data). Nothing here waits for the device (the loss is read a step later)."""
    td = time.perf_counter()
    dev = st.device.torch_device
    hb = st.feed.take(st.step, batch, epoch)
    b = device_batch(hb, st.recipe, dev, non_blocking=st.device.kind == "cuda")
    data_s = time.perf_counter() - td
    with st.device.autocast():
        cond = b.cond
        if b.prompts is not None:  # with grad, through the text encoder's LoRA
            cond = st.family.encode_prompts(st.model.text_parts, b.prompts, dev)
        added = st.family.added_cond(cond, b.metas, dev)
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        pred = st.forward(b.noisy, b.timesteps, cond["text"], return_dict=False, **kwargs)[0]
    loss = diffusion_loss(pred, b, st.recipe, st.job.run.min_snr_gamma).mean()
    loss = loss * len(batch) / n_images
    st.scaler.scale(loss).backward()
    return loss.detach(), data_s


def _forward_backward(st: State, micro: list[list[int]], epoch: int, n_images: int):
    """This rank's share of one optimizer step, its slice of each global micro-batch:
    (loss sum on the device, data seconds, [(micro-batch loss, its samples' paths)])."""
    losses, data_s = [], 0.0
    for global_batch in micro:
        batch = global_batch[st.dist.rank :: st.dist.world]
        if not batch:  # a last batch smaller than the number of processes
            continue
        loss, ds = _micro_step(st, batch, epoch, n_images)
        losses.append((loss, [st.samples[i]["meta"]["path"] for i in batch]))
        data_s += ds
    return losses, data_s


@dataclass
class Taken:
    """An optimizer step taken whose loss has not been read back from the device yet."""

    record: dict  # its metrics.jsonl line, "loss" still missing
    total: object  # loss summed over micro-batches (and ranks), on the device
    bad: object  # non-finite micro-batch losses over all ranks (a device count), or None
    losses: list  # this rank's [(micro-batch loss, sample paths)]


def _optimizer_step(st: State, epoch: int, micro: list[list[int]]) -> Taken:
    """One optimizer step over ``micro`` (global micro-batches); its loss stays on the device."""
    import torch

    run, dist, dev = st.job.run, st.dist, st.device.torch_device
    t0 = time.perf_counter()
    n_images = sum(len(b) for b in micro)
    if run.lora_dropout or st.model.trains_text:  # LoRA (and a text encoder's own) dropout
        # draws from global RNG: seed it per step (and rank), so a resumed run draws the masks
        # an uninterrupted one drew
        torch.manual_seed(dropout_seed(run.seed, st.step, dist.rank))
    losses, data_s = guarded_first_step(
        st, lambda: _forward_backward(st, micro, epoch, n_images)
    )
    # summed in float64, as Python floats would sum them
    total = sum((x.double() for x, _ in losses), torch.zeros((), dtype=torch.float64, device=dev))
    bad = None
    if dist.world > 1:  # sum the LoRA gradients and the loss over ranks: every rank steps alike
        distributed.all_reduce_grads(st.model.params)
        n_bad = sum(((~torch.isfinite(x)).double() for x, _ in losses), torch.zeros_like(total))
        total, bad = distributed.all_reduce_tensor(torch.stack([total, n_bad]))
    st.scaler.unscale_(st.opt)
    if run.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(st.model.params, run.max_grad_norm)
    scale_before = st.scaler.get_scale() if st.scaler.is_enabled() else None
    st.scaler.step(st.opt)
    st.scaler.update()
    skipped = scale_before is not None and st.scaler.get_scale() < scale_before
    st.sched.step()
    st.opt.zero_grad(set_to_none=True)
    st.step += 1
    t1 = time.perf_counter()
    dt = t1 - t0
    st.step_times.append(dt)
    st.step_images.append(n_images)
    st.step_ends.append(t1)
    return Taken(step_record(st, epoch, None, n_images, dt, data_s, skipped), total, bad, losses)


def _record(st: State, taken: Taken, t_loop: float) -> None:
    """Read a taken step's loss back (an error if it is not finite), append its metrics record,
    send it to MLflow and log progress. Returns None (the step is no longer pending)."""
    m = taken.record
    loss = float(taken.total)
    if not st.scaler.is_enabled():  # fp16's scaler skips non-finite steps by design
        mine = [p for x, paths in taken.losses if not math.isfinite(float(x)) for p in paths]
        if mine or (taken.bad is not None and float(taken.bad) > 0) or not math.isfinite(loss):
            _raise_nonfinite(st, m["step"], mine)
    m["loss"] = loss
    st.metrics.append(m)
    if st.tracker is not None:
        st.tracker.log(m)
    done = m["step"] - st.loop_start_step
    log_progress(st, m, (time.perf_counter() - t_loop) / done * (st.plan.total_steps - m["step"]))
    return None


def _raise_nonfinite(st: State, step: int, paths: list[str]):
    where = f"samples: {paths}" if paths else "samples: on another process"
    raise FloatingPointError(
        f"run {st.job.run.name}: non-finite loss at step {step} ({where}); "
        f"last good checkpoint kept in {st.layout.dir}"
    )


def _lora_states(st: State) -> tuple[dict, list[dict]]:
    """peft state dicts of the UNet's LoRA and of each trained text encoder's."""
    from peft.utils import get_peft_model_state_dict

    te = [get_peft_model_state_dict(m, save_embedding_layers=False) for m in st.text_encoders()]
    return get_peft_model_state_dict(st.model.unet), te


def _save_checkpoint(st: State) -> None:
    """Checkpoint of this step (resume), and both export layouts of it (picking a step)."""
    lora, te = _lora_states(st)
    checkpoints.save(st.layout, st.step, st.job.fingerprint, lora, te, st.opt, st.sched,
                     st.scaler, st.metrics)  # fmt: skip
    _export_step(st, lora, te)


def _export_step(st: State, lora: dict, te: list[dict]) -> None:
    """Both export layouts of this step (also the best step's, `training.validation`)."""
    from .export import export_checkpoint, train_metadata
    from .models import adapter_metadata

    meta = st.file_meta()
    facts = {**_facts(st), "steps": st.step, "finished_at": time.time(),
             "epoch": math.ceil(st.step / st.plan.steps_per_epoch)}  # fmt: skip
    meta.update(train_metadata(facts, st.job.run.to_dict()))
    te1, te2 = _te_states(te)
    export_checkpoint(
        lora, adapter_metadata(st.model.lora_cfg), st.layout.export(st.step),
        st.job.run.to_dict(), meta, st.tag_freq, te1, _te_meta(st), te2,
        unet_config=dict(st.model.unet.config),  # kohya's names follow its layout (SDXL)
    )  # fmt: skip


def _facts(st: State) -> dict:
    """What the exported files' metadata says about this training (`export.train_metadata`)."""
    from .export import architecture_metadata, bucket_info

    unet_cfg, sched_cfg = dict(st.model.unet.config), dict(st.model.scheduler.config)
    return {
        "epochs": st.plan.epochs,
        "precision": st.device.precision,
        "samples": len(st.samples),
        "max_steps": st.plan.total_steps,
        "batches_per_epoch": st.plan.batches_per_epoch,
        "processes": st.dist.world,
        "started_at": st.started_at,
        "bucket_info": bucket_info(s["meta"] for s in st.samples),
        "architecture": architecture_metadata(unet_cfg, sched_cfg),
    }


def _te_states(te: list[dict]) -> tuple[dict | None, dict | None]:
    """(first, second) text encoder's LoRA state: SDXL has two, SD one, none when untrained."""
    return (te[0] if te else None), (te[1] if len(te) > 1 else None)


def _te_meta(st: State) -> dict | None:
    from .models import adapter_metadata

    return adapter_metadata(st.model.text_cfg) if st.model.trains_text else None


def _write_outputs(st: State, t_start: float) -> dict:
    """The final LoRA (diffusers layout), metrics.jsonl, loss.png and train_summary.json."""
    from .export import save_diffusers_lora
    from .models import adapter_metadata

    if st.tracker is not None:  # every step sent (or given up on) before the run id is written
        st.tracker.flush()
    out_dir = Path(st.job.out_dir)
    trace = {k: v for k, v in st.file_meta().items() if k.startswith("lorapipe_")}
    lora, te = _lora_states(st)
    te1, te2 = _te_states(te)
    save_diffusers_lora(lora, adapter_metadata(st.model.lora_cfg),
                        out_dir / "pytorch_lora_weights.safetensors", trace,
                        te1, _te_meta(st), te2)  # fmt: skip
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in st.metrics))
    plot_loss(st.metrics, out_dir / "loss.png", st.job.run.name)
    graphs = compiled_graphs() if st.forward is not st.model.unet else 0
    s = summary(st, time.perf_counter() - t_start, graphs, trace.get("lorapipe_mlflow_run_id"))
    s.update({**_facts(st), **{k: s[k] for k in ("epochs", "precision", "samples", "processes")},
              "finished_at": time.time()})  # fmt: skip
    s.update(validation.summary(st))  # val_loss, best_step, best_val_loss, images per side
    atomic_write_text(out_dir / "train_summary.json", json.dumps(s, indent=1))
    log_summary(s)
    return s
