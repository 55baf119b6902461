"""Batches made ahead: a background thread runs `batches.host_batch` for the coming micro-steps
while the device trains, so batch preparation overlaps compute.

The order of micro-batches is a pure function of the step (`batches.step_micro_batches`) and each
host batch a pure function of its samples, epoch and the seed, so a batch made ahead is exactly
the batch the loop would have made: the feed changes no bytes. On CUDA the batches are put in
page-locked memory, so the copies to the device can be non-blocking.
"""

from __future__ import annotations

import logging
import queue
import threading

from .batches import host_batch, step_micro_batches

log = logging.getLogger("lorapipe.train")
_DONE = object()


class Feed:
    """Host batches of this rank for steps ``start .. total-1``, in loop order.

    ``take(step, batch, epoch)`` returns the batch made ahead when it is the one asked for (the
    normal case) and makes it on the spot otherwise (a step redone after a failed compile).
    """

    def __init__(self, st, start: int, depth: int = 4, pin: bool = False, enabled: bool = True):
        self.st, self.pin, self.enabled = st, pin, enabled
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._run, args=(start,), daemon=True)
            self._thread.start()

    def _order(self, start: int):
        st = self.st
        run, world, rank = st.job.run, st.dist.world, st.dist.rank
        for step in range(start, st.plan.total_steps):
            epoch, micro = step_micro_batches(st.samples, run, world, st.plan, step)
            for global_batch in micro:
                batch = global_batch[rank::world]
                if batch:
                    yield step, epoch, batch

    def _run(self, start: int) -> None:
        try:
            for step, epoch, batch in self._order(start):
                hb = host_batch(self.st.samples, batch, epoch, self.st.recipe)
                item = (step, tuple(batch), hb.pinned() if self.pin else hb)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # surfaced in the training thread by take()
            self._error = e
        finally:
            self._q.put(_DONE) if not self._stop.is_set() else None

    def take(self, step: int, batch: list[int], epoch: int):
        """The host batch of (``step``, ``batch``)."""
        if self.enabled and not self._stop.is_set():
            item = self._q.get()
            if item is _DONE:
                self._stop.set()
                if self._error is not None:
                    raise self._error
            elif item[0] == step and item[1] == tuple(batch):
                return item[2]
            else:  # out of order (a redone step): the feed no longer matches the loop
                log.debug("prefetch out of order at step %d: making batches in the loop", step)
                self.close()
        hb = host_batch(self.st.samples, batch, epoch, self.st.recipe)
        return hb.pinned() if self.pin else hb

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
