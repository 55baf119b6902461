"""Data-parallel training over torch.distributed: starting the processes, and what they share.

A leaf module: it knows processes and collectives, not what they train. The process that calls
`start` with ``num_processes: N > 1`` becomes rank 0. It hosts the rendezvous (a TCPStore on
127.0.0.1 at a port the OS picks free) and starts ranks 1..N-1 as ``python -m <entry> SPEC.json``
subprocesses (the train stage passes `lorapipe.worker`); the caller's rank 0 alone writes files.
Backend: gloo on CPU, nccl on CUDA (rank r on GPU r).

Each optimizer step takes one global batch of ``batch_size x N`` images from one bucket; rank r
trains on ``global_batch[r::N]`` with the loss scaled by 1 / (images in the global step), the
LoRA gradients are summed over ranks (one flat all_reduce), and every rank then takes the same
optimizer step. So N processes compute what one process with the same global batch computes, up
to float summation order.

Under an outside launcher (torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), that
process group is joined instead (env://), and RANK 0 is the one that writes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
GRACE_S = 60.0  # after a rank fails, how long rank 0 may take to notice before it is stopped


@dataclass
class Dist:
    """This process's place in the job; ``world == 1``: no torch.distributed at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    procs: list = field(default_factory=list)  # ranks this process started (rank 0 only)
    spec_dir: str | None = None
    threads: int | None = None  # rank 0: torch threads before the job was split
    store: object = None  # the rendezvous (None under torchrun: env://)
    device: str = "cpu"
    stopping: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_num_processes(setting, device: str) -> int:
    """``auto``: one process per visible GPU (CUDA_VISIBLE_DEVICES counts), 1 on CPU."""
    if setting == "auto":
        if device != "cuda":
            return 1
        import torch

        return max(1, torch.cuda.device_count())
    return int(setting)


def backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def start(name: str, num_processes, device: str, spec: dict, entry: str) -> Dist:
    """Join the process group this process belongs to, or start one of ``num_processes``.

    ``spec``: what the ranks this process starts need (JSON-serialisable; ``threads`` is added),
    written to a file they get as their one argument: ``python -m <entry> SPEC.json``.
    ``name``: the run, for messages.
    """
    import torch.distributed as td

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:  # started by us (below) or by torchrun
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        _set_device(device, local)
        store = None
        port = os.environ.get("LORAPIPE_STORE_PORT")
        if port:
            store = td.TCPStore(HOST, int(port), env_world, is_master=False)
        return Dist(rank=rank, world=env_world, local_rank=local, store=store, device=device)
    world = resolve_num_processes(num_processes, device)
    if world == 1:
        return Dist()
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < world:
            raise ValueError(
                f"runs.{name}.num_processes: {world} processes, but "
                f"{torch.cuda.device_count()} GPU(s) visible"
            )
    import torch

    _set_device(device, 0)
    threads = torch.get_num_threads()  # the job's threads, shared by its processes
    torch.set_num_threads(max(1, threads // world))
    store = td.TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False)
    spec_dir = tempfile.mkdtemp(prefix="lorapipe-ddp-")
    spec_path = Path(spec_dir) / "spec.json"
    spec_path.write_text(json.dumps({**spec, "threads": max(1, threads // world)}))
    src = str(Path(__file__).resolve().parents[1])
    procs = []
    for rank in range(1, world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR=HOST,
            MASTER_PORT=str(store.port),
            LORAPIPE_STORE_PORT=str(store.port),
            PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        )
        cmd = [sys.executable, "-m", entry, str(spec_path)]
        procs.append(subprocess.Popen(cmd, env=env))
    dist = Dist(rank=0, world=world, procs=procs, spec_dir=spec_dir, threads=threads,
                store=store, device=device)  # fmt: skip
    threading.Thread(target=_watch, args=(dist,), daemon=True).start()
    log.info("data-parallel: %d processes (%s), store %s:%d", world, backend(device), HOST,
             store.port)  # fmt: skip
    return dist


def connect(dist: Dist) -> None:
    """Join the process group (after the latents are read, so a rank that fails to read them
    fails alone and early)."""
    import torch.distributed as td

    if dist.world == 1 or td.is_initialized():
        return
    if dist.store is not None:
        td.init_process_group(
            backend(dist.device), store=dist.store, rank=dist.rank, world_size=dist.world
        )
    else:  # torchrun
        td.init_process_group(backend(dist.device), init_method="env://")


def _set_device(device: str, local_rank: int) -> None:
    if device == "cuda":
        import torch

        torch.cuda.set_device(local_rank)


def _watch(dist: Dist) -> None:
    """Rank 0's watchdog: a rank that dies makes rank 0's next collective wait until its
    timeout (nccl) or fail (gloo); if rank 0 has not stopped within GRACE_S, end it."""
    while not dist.stopping:
        for p in dist.procs:
            code = p.poll()
            if code not in (None, 0):
                log.error("training process pid %d exited with %s", p.pid, code)
                deadline = time.time() + GRACE_S
                while time.time() < deadline and not dist.stopping:
                    time.sleep(0.5)
                if not dist.stopping:
                    log.error("stopping: a training process failed (see its messages above)")
                    for q in dist.procs:
                        q.kill()
                    os._exit(1)
                return
        time.sleep(0.5)


def finish(dist: Dist, ok: bool) -> None:
    """Leave the process group; rank 0 waits for (or, after an error, stops) its ranks."""
    dist.stopping = True
    if dist.world == 1:
        return
    import shutil

    import torch.distributed as td

    for p in dist.procs:
        if not ok and p.poll() is None:
            p.terminate()
    failed = []
    for p in dist.procs:
        try:
            code = p.wait(timeout=120 if ok else 30)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        if code:
            failed.append(code)
    if td.is_initialized():
        td.destroy_process_group()
    if dist.spec_dir:
        shutil.rmtree(dist.spec_dir, ignore_errors=True)
    if dist.threads:
        import torch

        torch.set_num_threads(dist.threads)
    if ok and failed:
        raise RuntimeError(f"{len(failed)} training process(es) failed (exit codes {failed})")


def broadcast_params(params: list) -> None:
    """Every rank starts from rank 0's LoRA weights (same seed gives the same; this makes sure)."""
    import torch.distributed as td

    for p in params:
        td.broadcast(p.data, src=0)


def all_reduce_grads(params: list) -> None:
    """Sum the gradients of ``params`` over all ranks, in one flat buffer (missing grads = 0)."""
    import torch
    import torch.distributed as td

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    td.all_reduce(flat, op=td.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_floats(values: list[float], device) -> list[float]:
    """Sums of ``values`` over all ranks (in float64)."""
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor(t):
    """``t`` summed over all ranks (in place, and returned); no host sync of its own."""
    import torch.distributed as td

    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t
