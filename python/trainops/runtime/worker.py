"""What every worker of ``trainops train`` and ``trainops rl`` shares around its step bodies:
set-up and resume, the phase's optimizer and synchronizer, the clock, checkpoints, the
per-step tail (bytes, stop agreement, periodic checkpoint) and the phase end.

A loop (:mod:`trainops.runtime.loop`, :mod:`trainops.runtime.rl_loop`) creates one
:class:`WorkerRun`, calls :meth:`~WorkerRun.enter_phase` per phase, runs its own step body,
then :meth:`~WorkerRun.end_step`, and :meth:`~WorkerRun.end_phase` / :meth:`~WorkerRun.finish`.
Everything saved is a pure function of (seed, rank, phase, step) plus the checkpoint, so a
resumed run continues bit for bit (``tests/test_runtime_resume_exact.py``, ``tests/test_runtime_rl.py``).
"""
from __future__ import annotations

import hashlib
import os
import signal
import time

import torch
import torch.distributed as dist

from trainops.distributed.stats import CommStats, ring_all_reduce_bytes
from trainops.nn import reset_load_balancing
from trainops.runtime.checkpoint import check_resume_config, load_checkpoint, save_checkpoint
from trainops.runtime.config import ConfigError
from trainops.runtime.domains import VOCAB, generator, make_domains
from trainops.runtime.metrics_log import MetricsLog
from trainops.runtime.model import MoETransformer, apply_adapter, next_task_adapter
from trainops.runtime.monitor import RunMonitor
from trainops.runtime.sync import make_sync

__all__ = ["WorkerRun", "STOP", "StopAgreement", "device_of", "phases_of"]

STOP = {"flag": False}  # set by SIGTERM / SIGINT; every worker stops at the same step


def _on_signal(signum, frame):
    STOP["flag"] = True


def device_of(cfg):
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def phases_of(cfg, domains) -> list[tuple[str, int, int | None]]:
    """(name, steps, task index or None for pre-training)."""
    out = [("pretrain", cfg.pretrain_steps, None)] if cfg.pretrain_steps > 0 else []
    out += [(f"task{t}:{d.name}", cfg.task_steps, t) for t, d in enumerate(domains)]
    return out


def setup_phase(model, cfg, task, n_tasks):
    """Change the model's structure for entering ``task`` (deterministic: replayed on resume)."""
    if task == 0:
        apply_adapter(model, cfg, n_tasks)
    elif task is not None and task > 0:
        next_task_adapter(model, cfg)


class StopAgreement:
    """Every worker stops at the same step: after a signal on any worker, or at ``--stop-after``.

    ``--stop-after`` needs no collective (every worker counts the same steps). A signal
    arrives on some workers only, so the workers agree on it with a MAX all-reduce of a
    flag, issued without waiting at the end of step t and read at the end of step t + 1:
    the whole job stops one step after the signal, and no worker waits at every step for
    the slowest one (a blocking agreement would hold the workers in lockstep and take
    away the slack that Streaming DiLoCo's overlapped exchange leaves them)."""

    def __init__(self, device):
        self.device = device
        self._pending = None  # (work, flag) of the agreement issued at the end of the last step

    def poll(self, cfg, global_step: int) -> tuple[bool, float]:
        """(stop now, seconds spent waiting for the last step's agreement)."""
        t0 = time.perf_counter()
        stop = self.settle()
        waited = time.perf_counter() - t0
        stop = stop or bool(cfg.stop_after and global_step == cfg.stop_after)
        if not stop:
            flag = torch.tensor([1 if STOP["flag"] else 0], device=self.device)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return stop, waited

    def settle(self) -> bool:
        """Wait for the agreement in flight, if any (before the job's last collectives); its verdict."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())


def weights_sha1(model) -> str:
    """A digest of every parameter and buffer, to check that the workers agree."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class WorkerRun:
    """One worker's run. ``state`` is the run state the checkpoint holds (``initial_state``
    for a fresh run, plus the time stamps ``wall_s``, ``comm_s``, ``flag_s``, cumulative
    over resumed runs: wall time since the start of training, time blocked in the exchange,
    time blocked agreeing on stopping; compute utilization = 1 - (comm_s + flag_s) / wall_s).
    ``make_buffer(cfg, rank, n_tasks, device)`` gives the replay buffer or None."""

    def __init__(self, rank: int, world: int, cfg, initial_state: dict, make_buffer):
        self.rank, self.world, self.cfg = rank, world, cfg
        torch.set_num_threads(cfg.threads)
        self.device = device_of(cfg)
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.ckpt_root = os.path.join(cfg.out_dir, "checkpoint")
        if rank == 0:
            os.makedirs(self.ckpt_root, exist_ok=True)
        self.domains = make_domains(cfg.task_list(), cfg.seq_len)
        self.n_tasks = len(self.domains)
        self.phases = phases_of(cfg, self.domains)
        self.eval_sets = [tuple(t.to(self.device) for t in d.sample(generator(cfg.seed, 7777, i), cfg.eval_size))
                          for i, d in enumerate(self.domains)]
        saved = None
        if cfg.resume:
            saved = load_checkpoint(self.ckpt_root, rank, world)
            check_resume_config(saved["config"], cfg.to_dict(), type(cfg)().to_dict())
        self.saved = saved
        self.start_phase, self.start_step = (saved["phase"], saved["step"]) if saved else (0, 0)

        torch.manual_seed(cfg.seed)
        self.model = MoETransformer(cfg, VOCAB).to(self.device)
        if saved:
            if self.start_phase >= len(self.phases):
                raise ConfigError(f"--resume: the run in {cfg.out_dir} is already complete; use a new --out-dir")
            for p in range(self.start_phase + 1):  # rebuild the adapters the checkpointed model has
                setup_phase(self.model, cfg, self.phases[p][2], self.n_tasks)
        self.buffer = make_buffer(cfg, rank, self.n_tasks, self.device)
        self.stats = CommStats()
        self.state = initial_state
        if saved:
            self.model.load_state_dict(saved["model"])
            if self.buffer is not None:
                self.buffer.load_state_dict(saved["replay"])
            self.state = {**initial_state, **saved["state"]}  # keys added since the checkpoint start empty
            for k, v in saved["comm"].items():
                if hasattr(self.stats, k) and k != "calls":
                    setattr(self.stats, k, v)
        for key in ("wall_s", "comm_s", "flag_s"):
            self.state.setdefault(key, 0.0)
        resume_step = self.state["global_step"] if saved else None
        self.metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), rank == 0, resume_step)
        self.monitor = RunMonitor(cfg, rank, [d.name for d in self.domains], {n: s for n, s, _ in self.phases},
                                  resume_step)
        self.metrics.on_row = self.monitor.log
        self._clock_base, self._clock_start = self.state["wall_s"], time.perf_counter()
        self.sync = self.opt = self._hook_group = None
        self._stop = StopAgreement(self.device)

    # -- time and checkpoints --------------------------------------------------------------
    def clock(self) -> None:
        self.state["wall_s"] = self._clock_base + time.perf_counter() - self._clock_start
        if self.sync is not None:
            self.state["comm_s"] += self.sync.comm_s
            self.sync.comm_s = 0.0

    def checkpoint(self, phase_idx: int, step: int, final: bool = False) -> None:
        self.clock()
        torch_state = {
            "config": self.cfg.to_dict(), "world_size": self.world, "phase": phase_idx, "step": step,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "diloco": self.sync.state_dict(),
            "replay": None if self.buffer is None else self.buffer.state_dict(), "rng": torch.get_rng_state(),
            "state": self.state, "comm": self.stats.as_dict()}
        save_checkpoint(self.ckpt_root, self.state["global_step"], self.rank, torch_state, dist.barrier, final)

    # -- phases and steps ------------------------------------------------------------------
    def enter_phase(self, phase_idx: int):
        """Enter a phase: adapters, optimizer, synchronizer (restored when resuming inside
        it). Returns (forward, first step, progress bar or None)."""
        cfg = self.cfg
        name, steps, task = self.phases[phase_idx]
        resuming_here = self.saved is not None and phase_idx == self.start_phase
        if not resuming_here:
            setup_phase(self.model, cfg, task, self.n_tasks)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr if task is None else cfg.task_lr, weight_decay=0.0)
        # On resume the model holds this worker's own checkpointed weights, which differ
        # between the DiLoCo workers when the checkpoint lies between two syncs: no
        # broadcast. (DDP broadcasts rank 0's; under DDP the workers agree at every step.)
        if cfg.sync == "ddp" and cfg.ddp_hook != "fp32" and self._hook_group is None:
            self._hook_group = dist.new_group()  # the quantized hook's background reductions, for every phase
        self.sync = make_sync(self.model, self.opt, cfg, self.stats, broadcast_init=not resuming_here,
                              comm_group=self._hook_group)
        forward = self.sync.ddp if cfg.sync == "ddp" else self.model
        first = 1
        if resuming_here:
            self.opt.load_state_dict(self.saved["optimizer"])
            self.sync.load_state_dict(self.saved["diloco"])
            torch.set_rng_state(self.saved["rng"])
            first = self.start_step + 1
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=first - 1, desc=name, dynamic_ncols=True, leave=True)
        self._phase_t0 = time.perf_counter()
        return forward, first, bar

    def begin_step(self) -> int:
        """Count the step; returns its global step number."""
        self.state["global_step"] += 1
        self._elements_before = self.stats.elements  # a DDP hook already exchanges during backward
        return self.state["global_step"]

    def optimizer_step(self) -> None:
        """The optimizer step, LBL counts reset, the synchronizer's step; counts what the
        step's syncs would have cost in fp32 (ring all-reduce), for the report's ratio."""
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        reset_load_balancing(self.model)
        self.sync.step()
        self._count_fp32(self._elements_before)
        self.clock()

    def _count_fp32(self, elements_before: int) -> None:
        if self.stats.elements > elements_before:
            self.state["bytes_fp32"] += ring_all_reduce_bytes(4 * (self.stats.elements - elements_before), self.world)

    def end_step(self, phase_idx: int, step: int) -> bool:
        """After the step's row is logged: agree on stopping, checkpoint when due; True to stop."""
        gs = self.state["global_step"]
        stop, waited = self._stop.poll(self.cfg, gs)
        self.state["flag_s"] += waited
        if stop or (self.cfg.checkpoint_every and gs % self.cfg.checkpoint_every == 0):
            self.checkpoint(phase_idx, step)
        return stop

    def end_phase(self, name: str) -> None:
        """Streaming DiLoCo leaves the fragments not sent at the last step slightly apart on
        each worker: sync them all, so every worker holds the same weights for evaluation,
        the next phase and the final checkpoint."""
        before = self.stats.elements
        self.sync.sync_all()
        self.clock()
        self._count_fp32(before)
        self.state["weights_sha1"][name] = weights_sha1(self.model)
        self.state["phase_seconds"][name] = (self.state["phase_seconds"].get(name, 0.0)
                                             + time.perf_counter() - self._phase_t0)

    def finish(self, interrupted: bool) -> None:
        self._stop.settle()  # the last step's agreement: a signal there comes too late to matter
        self.monitor.close()
        if not interrupted:  # the final checkpoint: phase index past the end marks a complete run
            self.checkpoint(len(self.phases), 0, final=True)
