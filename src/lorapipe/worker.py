"""Entry point of ranks 1..N-1 of a data-parallel run: ``python -m lorapipe.worker SPEC.json``.

Rank 0 (the train job's own process) starts them through `distributed.start` with the `train.Job`
it trains as the spec; each trains the same job on its slice of every global batch. Rank 0 writes
every file, so a worker writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path


def _exit_with_parent(parent: int) -> None:
    """A rank whose rank 0 was killed (kill -9) would wait in a collective (nccl: until its
    timeout): end it when its parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def main(argv: list[str]) -> int:
    """Train the job of the spec file ``argv[1]`` as the rank the environment names."""
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    spec = json.loads(Path(argv[1]).read_text())
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import torch

    torch.set_num_threads(spec.pop("threads"))
    from .train import Job, run_job

    run_job(Job.from_dict(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
