"""Asynchronous collectives: one FIFO background thread per process group, and its work handle.

Why a thread and not chained futures: the two-shot quantized all-reduce is two
collectives with local compute between them. Issuing the second collective from a
future callback would let it interleave with collectives the caller issues meanwhile,
in a different order on different ranks, which gloo and NCCL cannot match. A single
thread per group runs the jobs of that group strictly in submission order, which is
the same on every rank. The caller must not issue other collectives on that group
from another thread while jobs are pending: give asynchronous traffic its own group
(``dist.new_group(...)``), as :class:`~trainops.distributed.DiLoCo` and
:class:`~trainops.distributed.QuantizedCommState` do.

On CUDA the job runs on a side stream that first waits for the submitting stream;
its future completes once the side stream's work is done.
"""
from __future__ import annotations

import queue
import threading

import torch
import torch.distributed as dist


class AsyncWork:
    """Handle returned by ``async_op=True`` (like ``dist.Work``): ``wait()``, ``is_completed()``, ``get_future()``."""

    def __init__(self, future: torch.futures.Future, done_event=None):
        self._future = future
        self._done_event = done_event

    def is_completed(self) -> bool:
        return self._future.done()

    def wait(self, timeout=None) -> bool:
        """Block until the collective finished; re-raises its error. ``timeout`` is accepted for API parity."""
        self._future.wait()
        if self._done_event is not None:
            torch.cuda.current_stream().wait_event(self._done_event)
        return True

    def get_future(self) -> torch.futures.Future:
        return self._future

    def result(self):
        self.wait()
        return self._future.value()


class _GroupWorker:
    """Daemon thread draining a FIFO of jobs for one process group."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="trainops-comm", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as e:  # delivered to whoever waits on the handle
                future.set_exception(e)

    def submit(self, fn) -> torch.futures.Future:
        future = torch.futures.Future()
        self._jobs.put((fn, future))
        return future


_WORKERS: dict = {}
_WORKERS_LOCK = threading.Lock()
_SIDE_STREAMS: dict = {}


def _key(group):
    return dist.group.WORLD if group is None else group


def has_worker(group) -> bool:
    return _key(group) in _WORKERS


def submit(group, fn, device: torch.device | None = None) -> AsyncWork:
    """Run ``fn()`` on ``group``'s background thread after the jobs submitted before it."""
    with _WORKERS_LOCK:
        worker = _WORKERS.get(_key(group))
        if worker is None:
            worker = _WORKERS[_key(group)] = _GroupWorker()
    if device is None or device.type != "cuda":
        return AsyncWork(worker.submit(fn))
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    done = torch.cuda.Event()

    def on_side_stream():
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            out = fn()
            done.record(stream)
        # Completing the future means the device work is done too (DDP reads the
        # bucket right after the future completes); this blocks the comm thread only.
        done.synchronize()
        return out

    return AsyncWork(worker.submit(on_side_stream), done)
