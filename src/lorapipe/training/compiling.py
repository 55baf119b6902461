"""torch.compile around the training loop: warm-up on every batch shape before step 1, and the
guarded first step. A failed compile costs a redone step, never the run.

Neither changes anything the LoRA depends on: warm-up takes no optimizer step, zeroes the
gradients, makes no per-sample draws (fixed timestep, mean latents) and restores global RNG
(LoRA dropout); a first step redone eagerly starts from zeroed gradients and restored RNG.
"""

from __future__ import annotations

import logging
import time

from .batches import epoch_batches, warmup_shapes

log = logging.getLogger("lorapipe.train")


def compiled_graphs() -> int:
    """Graphs torch.compile (Dynamo) has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _shapes(st) -> list[list[int]]:
    """One batch of this rank per batch shape it will train on."""
    run, world = st.job.run, st.dist.world
    global_batches = epoch_batches(st.samples, run.batch_size * world, run.seed, 0)
    return warmup_shapes(st.samples, [b[st.dist.rank :: world] for b in global_batches])


def _warm_up_passes(st, forward, shapes: list[list[int]]) -> None:
    """Forward + backward once per batch shape in ``shapes``."""
    import torch

    dev = st.device.torch_device
    t_mid = st.model.scheduler.config.num_train_timesteps // 2
    names = list(st.recipe.empty)
    for batch in shapes:
        z = torch.stack([st.samples[i]["mean"].float() * st.model.scaling for i in batch]).to(dev)
        metas = [st.samples[i]["meta"] for i in batch]
        timesteps = torch.full((len(batch),), t_mid, device=dev, dtype=torch.long)
        with st.device.autocast():
            if st.model.trains_text:  # as in training: the trained encoders' outputs, with
                # grad and in their autocast dtypes (SDXL's pooled text_embeds, and the time_ids
                # made in its dtype, are bf16/fp16 there): no recompile at step 1
                prompts = [m.get("caption", "") for m in metas]
                cond = st.family.encode_prompts(st.model.text_parts, prompts, dev)
            else:
                cond = {n: torch.stack([st.samples[i][n].float() for i in batch]).to(dev)
                        for n in names}  # fmt: skip
            added = st.family.added_cond(cond, metas, dev)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            pred = forward(z, timesteps, cond["text"], return_dict=False, **kwargs)[0]
        pred.float().pow(2).mean().backward()


def warm_up(st) -> None:
    """Compile ``st.forward`` on every batch shape before step 1 (when it is compiled); on a
    failure, train eagerly. Records ``warmup_s``, the shapes and graphs in ``st.compile``."""
    import torch

    c = st.compile
    if st.forward is st.model.unet:
        return
    c["graphs_at_start"] = compiled_graphs()
    tw = time.perf_counter()
    shapes = _shapes(st)
    c["warmup_shapes"] = len(shapes)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if st.device.kind == "cuda" else None
    try:
        _warm_up_passes(st, st.forward, shapes)
    except Exception as e:  # a failed compile must not lose the run
        log.warning("torch.compile failed during warm-up (%s: %s); training without compile",
                    type(e).__name__, e)  # fmt: skip
        st.forward = st.model.unet
    st.opt.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    c["warmup_s"] = time.perf_counter() - tw
    c["warmup_graphs"] = compiled_graphs() - c["graphs_at_start"]
    log.info("torch.compile warm-up: %d batch shape(s) in %.1f s, %d graph(s) compiled%s",
             c["warmup_shapes"], c["warmup_s"], c["warmup_graphs"],
             "" if st.forward is not st.model.unet else " (failed)")  # fmt: skip
    c["graphs_after_warmup"] = compiled_graphs() if st.forward is not st.model.unet else 0


def guarded_first_step(st, forward_backward):
    """Run ``forward_backward()`` (this rank's share of one optimizer step). Until one whole
    compiled step has run, a compile failure (Inductor compiles the forward here and the
    backward at the first backward()) redoes the step eagerly and turns compile off."""
    import torch

    if st.compile_checked:
        return forward_backward()
    rng = torch.get_rng_state()
    try:
        result = forward_backward()
    except FloatingPointError:
        raise
    except Exception as e:
        log.warning("torch.compile failed in the first step (%s: %s); redoing the step eagerly "
                    "and training without compile", type(e).__name__, e)  # fmt: skip
        st.opt.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        st.forward = st.model.unet
        result = forward_backward()
    st.compile_checked = True
    return result
