"""The continual-learning loop one worker runs (``run_worker(rank, world, cfg_dict)``).

Phases: ``pretrain`` (mixture of every domain, each micro-batch one domain, ``grad_accum``
micro-batches per step) then one phase per task (its domain only, plus rehearsal rows
from the :class:`~trainops.replay.ReplayBuffer` when ``replay`` is on). The workers
are synchronized by Streaming DiLoCo in the ``exchange`` format (``sync: diloco``) or by
DistributedDataParallel with the ``ddp_hook`` format (``sync: ddp``); a new synchronizer
(:mod:`trainops.runtime.sync`) starts each phase because the trainable parameters
change (adapters added). Each phase ends with a sync of every fragment, so all workers
hold the same weights (recorded as a digest per phase). After each phase rank 0
evaluates every domain (the accuracy matrix: greedy-decoding exact match, and
teacher-forced accuracy per answer byte) and the expert-by-domain routing counts
(specialization).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainops.distributed.stats import CommStats, ring_all_reduce_bytes
from trainops.nn import domain_expert_counts, reset_load_balancing, specialization_score
from trainops.replay import ReplayBuffer
from trainops.runtime.checkpoint import check_resume_config, load_checkpoint, save_checkpoint
from trainops.runtime.config import ConfigError, TrainConfig, config_from_dict
from trainops.runtime.domains import VOCAB, generator, make_domains
from trainops.runtime.model import MoETransformer, apply_adapter, lbl_disabled, next_task_adapter
from trainops.runtime.monitor import RunMonitor
from trainops.runtime.sync import make_sync

__all__ = ["run_worker"]

_STOP = {"flag": False}


def _on_signal(signum, frame):
    _STOP["flag"] = True


def _phases(cfg: TrainConfig, domains) -> list[tuple[str, int, int | None]]:
    """(name, steps, task index or None for pre-training)."""
    out = [("pretrain", cfg.pretrain_steps, None)] if cfg.pretrain_steps > 0 else []
    out += [(f"task{t}:{d.name}", cfg.task_steps, t) for t, d in enumerate(domains)]
    return out


def _setup_phase(model, cfg, task, n_tasks):
    """Change the model's structure for entering ``task`` (deterministic: replayed on resume)."""
    if task == 0:
        apply_adapter(model, cfg, n_tasks)
    elif task is not None and task > 0:
        next_task_adapter(model, cfg)


def _loss(model, tokens, mask):
    logits, aux = model(tokens)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.roll(-1, 1).reshape(-1), reduction="none")
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1), aux


def pretrain_step(forward, sync, domains, cfg, rank: int, phase_idx: int, step: int, device):
    """One supervised step on the mixture of ``domains`` (one domain per micro-batch, rotating
    over ranks, ``grad_accum`` micro-batches); returns (mean cross-entropy, mean LBL, tokens)."""
    lbl_sum, ce_sum, tokens_done = 0.0, 0.0, 0
    for m in range(cfg.grad_accum):
        d = (step * cfg.grad_accum + m + rank) % len(domains)
        tokens, mask = domains[d].sample(generator(cfg.seed, rank, phase_idx, step, m), cfg.batch_size)
        last = m == cfg.grad_accum - 1
        with contextlib.nullcontext() if last else sync.no_sync():  # DDP: all-reduce once per step
            ce, aux = _loss(forward, tokens.to(device), mask.to(device))
            ((ce + aux) / cfg.grad_accum).backward()
        if last:
            sync.after_backward(time.perf_counter())
        ce_sum, lbl_sum = ce_sum + ce.item(), lbl_sum + aux.item()
        tokens_done += tokens.numel()
    return ce_sum / cfg.grad_accum, lbl_sum / cfg.grad_accum, tokens_done


def agree_to_stop(cfg, global_step: int, device) -> tuple[bool, float]:
    """Every worker must stop at the same step: the MAX over the workers of "a signal arrived
    or --stop-after is reached"; returns (stop, seconds spent waiting for the others)."""
    flag = torch.tensor([1 if _STOP["flag"] or (cfg.stop_after and global_step == cfg.stop_after) else 0],
                        device=device)
    t0 = time.perf_counter()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item()), time.perf_counter() - t0


@torch.no_grad()
def greedy_answers(model, tokens, mask):
    """Free generation: the answer bytes of ``tokens`` replaced by the model's own greedy
    (argmax) continuation of the prompt, one position at a time. Rows may have answers
    of different lengths and positions (``mask`` marks the logits that predict them)."""
    gen = torch.where(mask.roll(1, 1).bool(), torch.zeros_like(tokens), tokens)
    for i in mask.any(0).nonzero().flatten().tolist():
        pred = model(gen[:, :i + 1])[0][:, i].argmax(-1)
        gen[:, i + 1] = torch.where(mask[:, i].bool(), pred, gen[:, i + 1])
    return gen


@torch.no_grad()
def evaluate(model, eval_sets, num_experts):
    """Per-domain accuracy and routing on the held-out sets.

    Returns ``(exact, byte, counts, spec)``: ``exact[d]`` is the free-generation exact-match
    accuracy (the whole answer greedily decoded from the prompt equals the target; the
    headline number), ``byte[d]`` the teacher-forced accuracy per answer byte (argmax at
    each answer position given the true prefix), ``counts`` the [layer][domain, expert]
    routing counts over the non-pad tokens of the teacher-forced pass, ``spec`` the mean
    specialization score over the MoE layers."""
    was = model.training
    model.eval()
    exact, byte, idx_by_layer, doms, valid = [], [], [[] for _ in model.moe_layers()], [], []
    with lbl_disabled(model):
        for d, (tokens, mask) in enumerate(eval_sets):
            logits, _ = model(tokens)
            for i, layer in enumerate(model.moe_layers()):
                idx_by_layer[i].append(layer.last_indices.cpu())
            hit = (logits.argmax(-1) == tokens.roll(-1, 1)) & mask.bool()
            byte.append(float(hit.sum() / mask.sum().clamp_min(1)))
            exact.append(float((greedy_answers(model, tokens, mask) == tokens).all(1).float().mean()))
            doms.append(torch.full((tokens.numel(),), d, dtype=torch.int64))
            valid.append((tokens != 0).reshape(-1).cpu())
    model.train(was)
    D = len(eval_sets)
    dom, keep = torch.cat(doms), torch.cat(valid)
    counts, scores = [], []
    for per in idx_by_layer:
        ind = torch.cat(per)
        counts.append(domain_expert_counts(ind, dom, num_experts, D, mask=keep).tolist())
        scores.append(specialization_score(ind, dom, num_experts, D, mask=keep))
    return exact, byte, counts, sum(scores) / len(scores)


def _weights_sha1(model) -> str:
    """A digest of every parameter and buffer, to check that the workers agree."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _device(cfg):
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _replay_buffer(cfg, rank, n_tasks, device):
    if cfg.replay == "off":
        return None
    spec = {"tokens": ((cfg.seq_len,), torch.int64), "mask": ((cfg.seq_len,), torch.int64),
            "task": ((), torch.int64)}
    kw = dict(sampler="power_law", eviction="fifo") if cfg.replay == "power_law" else \
        dict(sampler="uniform", eviction="reservoir")
    return ReplayBuffer(cfg.replay_capacity, spec, device=device, seed=cfg.seed * 1009 + rank,
                        max_tasks=max(n_tasks, 1), **kw)


class _Metrics:
    on_row = None  # also called with every row logged (TensorBoard, log lines)

    def __init__(self, path, enabled, resume_step):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            rows = self._read(path)  # drop what was logged after the checkpoint
            # an eval row at the checkpoint's step is logged again when the phase ends
            keep = [ln for ln, r in rows if r["global_step"] < resume_step
                    or (r["global_step"] == resume_step and "event" not in r)]
            with open(path, "w") as fh:
                fh.writelines(keep)
        elif enabled and resume_step is None:
            open(path, "w").close()

    @staticmethod
    def _read(path):
        """(line, row) pairs; a partial last line (the run was killed while writing it) is
        dropped with a warning, any other unreadable line is an error naming it."""
        with open(path, "rb") as fh:
            lines = fh.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        rows = []
        for no, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln)
                if not isinstance(row, dict) or not isinstance(row.get("global_step"), int):
                    raise ValueError("no global_step")
            except ValueError:
                if no == len(lines):
                    print(f"trainops train: warning: {path}: dropped a partial last line "
                          f"({len(ln.encode())} bytes; the run was stopped while writing it)", file=sys.stderr)
                    break
                raise ConfigError(f"--resume: {path}:{no} is not a metrics row; fix or remove that line") from None
            rows.append((ln if ln.endswith("\n") else ln + "\n", row))
        return rows

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.on_row is not None:
                self.on_row(row)


def run_worker(rank: int, world: int, cfg_dict: dict) -> dict:
    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    out = cfg.out_dir
    ckpt_root = os.path.join(out, "checkpoint")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)

    domains = make_domains(cfg.task_list(), cfg.seq_len)
    n_tasks = len(domains)
    phases = _phases(cfg, domains)
    eval_sets = [tuple(t.to(device) for t in d.sample(generator(cfg.seed, 7777, i), cfg.eval_size))
                 for i, d in enumerate(domains)]

    saved = None
    if cfg.resume:
        saved = load_checkpoint(ckpt_root, rank, world)
        check_resume_config(saved["config"], cfg.to_dict())
    start_phase, start_step = (saved["phase"], saved["step"]) if saved else (0, 0)

    torch.manual_seed(cfg.seed)
    model = MoETransformer(cfg, VOCAB).to(device)
    if saved:
        if start_phase >= len(phases):
            raise ConfigError(f"--resume: the run in {out} is already complete; use a new --out-dir")
        for p in range(start_phase + 1):  # rebuild the adapters the checkpointed model has
            _setup_phase(model, cfg, phases[p][2], n_tasks)
    buffer = _replay_buffer(cfg, rank, n_tasks, device)
    stats = CommStats()
    state = {"acc_matrix": [], "byte_acc_matrix": [], "weights_sha1": {}, "acc_rows": [], "spec": {}, "routing": {}, "bytes_fp32": 0,
             "global_step": 0, "phase_seconds": {}}
    if saved:
        model.load_state_dict(saved["model"])
        if buffer is not None:
            buffer.load_state_dict(saved["replay"])
        state = saved["state"]
        state.setdefault("byte_acc_matrix", [])
        state.setdefault("weights_sha1", {})
        for k, v in saved["comm"].items():
            if hasattr(stats, k) and k != "calls":
                setattr(stats, k, v)
    metrics = _Metrics(os.path.join(out, "metrics.jsonl"), rank == 0, state["global_step"] if saved else None)
    monitor = RunMonitor(cfg, rank, [d.name for d in domains], {n: s for n, s, _ in phases},
                         state["global_step"] if saved else None)
    metrics.on_row = monitor.log

    def barrier():
        dist.barrier()

    def checkpoint(phase_idx, step, opt, sync, final=False):
        torch_state = {
            "config": cfg.to_dict(), "world_size": world, "phase": phase_idx, "step": step,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "diloco": sync.state_dict(),
            "replay": None if buffer is None else buffer.state_dict(), "rng": torch.get_rng_state(),
            "state": state, "comm": stats.as_dict()}
        save_checkpoint(ckpt_root, state["global_step"], rank, torch_state, barrier, final)

    # Time stamps of the rows, cumulative over resumed runs: wall_s since the start of
    # training; comm_s blocked in the exchange (see trainops.runtime.sync); flag_s blocked
    # in the per-step agreement on stopping. Compute utilization = 1 - (comm_s + flag_s) / wall_s.
    for key in ("wall_s", "comm_s", "flag_s"):
        state.setdefault(key, 0.0)
    clock_base, clock_start = state["wall_s"], time.perf_counter()
    sync = None

    def clock():
        state["wall_s"] = clock_base + time.perf_counter() - clock_start
        if sync is not None:
            state["comm_s"] += sync.comm_s
            sync.comm_s = 0.0

    hook_group = None
    interrupted = False
    for phase_idx in range(start_phase, len(phases)):
        name, steps, task = phases[phase_idx]
        resuming_here = saved is not None and phase_idx == start_phase
        if not resuming_here:
            _setup_phase(model, cfg, task, n_tasks)
        params = [p for p in model.parameters() if p.requires_grad]
        kinds: dict = {}
        for mod in model.modules():
            if type(mod).__name__ in ("MoRALinear", "LoRALinear"):
                kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
        state.setdefault("phase_info", {})[name] = {
            "trainable_params": sum(p.numel() for p in params), "adapter_modules": kinds,
            "mora_ranks": [m.num_ranks for m in model.modules() if type(m).__name__ == "MoRALinear"][:1]}
        opt = torch.optim.AdamW(params, lr=cfg.lr if task is None else cfg.task_lr, weight_decay=0.0)
        # On resume the model holds this worker's own checkpointed weights, which differ
        # between the DiLoCo workers when the checkpoint lies between two syncs: no
        # broadcast. (DDP broadcasts rank 0's; under DDP the workers agree at every step.)
        if cfg.sync == "ddp" and cfg.ddp_hook != "fp32" and hook_group is None:
            hook_group = dist.new_group()  # the quantized hook's background reductions, for every phase
        sync = make_sync(model, opt, cfg, stats, broadcast_init=not resuming_here, comm_group=hook_group)
        forward = sync.ddp if cfg.sync == "ddp" else model
        first = 1
        if resuming_here:
            opt.load_state_dict(saved["optimizer"])
            sync.load_state_dict(saved["diloco"])
            torch.set_rng_state(saved["rng"])
            first = start_step + 1
        bar = None
        if rank == 0 and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=first - 1, desc=name, dynamic_ncols=True, leave=True)
        t0, tokens_done = time.perf_counter(), 0
        for step in range(first, steps + 1):
            state["global_step"] += 1
            gs = state["global_step"]
            replay_rows = 0
            elements_before = stats.elements
            if task is None:
                ce_val, lbl_val, n = pretrain_step(forward, sync, domains, cfg, rank, phase_idx, step, device)
                tokens_done += n
            else:
                tokens, mask = domains[task].sample(generator(cfg.seed, rank, phase_idx, step), cfg.batch_size)
                tokens, mask = tokens.to(device), mask.to(device)
                if buffer is not None and len(buffer) > 0 and cfg.replay_ratio > 0:
                    fresh = {"tokens": tokens, "mask": mask,
                             "task": torch.full((tokens.shape[0],), task, dtype=torch.int64, device=device)}
                    rb = buffer.sample(cfg.batch_size, fresh=fresh, replay_ratio=cfg.replay_ratio)
                    tokens, mask = rb.batch["tokens"], rb.batch["mask"]
                    replay_rows = int(rb.is_replay.sum())
                ce, aux = _loss(forward, tokens, mask)
                (ce + aux).backward()
                sync.after_backward(time.perf_counter())
                ce_val, lbl_val = ce.item(), aux.item()
                tokens_done += tokens.numel()
            opt.step()
            opt.zero_grad(set_to_none=True)
            reset_load_balancing(model)
            sync.step()
            if stats.elements > elements_before:  # what the same sync would have cost in fp32 (ring all-reduce)
                state["bytes_fp32"] += ring_all_reduce_bytes(4 * (stats.elements - elements_before), world)
            elapsed = time.perf_counter() - t0
            tps = tokens_done * world / max(elapsed, 1e-9)
            clock()
            row = {"global_step": gs, "phase": name, "step": step, "loss": ce_val, "lbl": lbl_val,
                   "lbl_scope": model.moe_layers()[0].router.lbl.scope if model.moe_layers()[0].router.lbl
                   else None, "replay_rows": replay_rows, "tokens_per_s": tps, "bytes_sent": stats.bytes_sent,
                   "bytes_fp32_equiv": state["bytes_fp32"], "exchange": cfg.exchange if cfg.sync == "diloco"
                   else f"ddp:{cfg.ddp_hook}", "wall_s": state["wall_s"], "comm_s": state["comm_s"],
                   "flag_s": state["flag_s"]}
            metrics.log(**row)
            if bar is not None:
                bar.set_postfix(loss=f"{ce_val:.3f}", lbl=f"{lbl_val:.4f}", tok_s=f"{tps:,.0f}",
                                sent=f"{stats.bytes_sent / 1e6:.2f}MB", refresh=False)
                bar.update(1)
            stop, waited = agree_to_stop(cfg, gs, device)
            state["flag_s"] += waited
            if stop or (cfg.checkpoint_every and gs % cfg.checkpoint_every == 0):
                clock()
                checkpoint(phase_idx, step, opt, sync)
            if stop:
                interrupted = True
                break
        if bar is not None:
            bar.close()
        if interrupted:
            break
        # Streaming DiLoCo leaves the fragments not sent at the last step slightly apart on
        # each worker: sync them all, so every worker holds the same weights for evaluation,
        # the next phase and the final checkpoint.
        before = stats.elements
        sync.sync_all()
        clock()
        state["bytes_fp32"] += ring_all_reduce_bytes(4 * (stats.elements - before), world)
        state["weights_sha1"][name] = _weights_sha1(model)
        state["phase_seconds"][name] = state["phase_seconds"].get(name, 0.0) + time.perf_counter() - t0
        if task is not None and buffer is not None:  # rehearsal rows of the finished task
            n = max(1, cfg.replay_capacity // n_tasks)
            tokens, mask = domains[task].sample(generator(cfg.seed, rank, 5555, task), n)
            buffer.add({"tokens": tokens.to(device), "mask": mask.to(device),
                        "task": torch.full((n,), task, dtype=torch.int64, device=device)})
        if rank == 0:
            accs, byte_accs, counts, spec = evaluate(model, eval_sets, cfg.num_experts)
            state["acc_rows"].append(name)
            state["acc_matrix"].append(accs)
            state["byte_acc_matrix"].append(byte_accs)
            state["spec"][name] = spec
            state["routing"][name] = counts
            metrics.log(global_step=state["global_step"], phase=name, event="eval", accuracy=accs,
                        byte_accuracy=byte_accs, specialization=spec, weights_sha1=state["weights_sha1"][name])
            if bar is not None:
                print(f"[{name}] exact-match (greedy) " + " ".join(f"{d.name}={a:.3f}" for d, a in zip(domains, accs))
                      + f" specialization={spec:.3f}", flush=True)
    monitor.close()
    if not interrupted:  # the final checkpoint: phase index past the end marks a complete run
        clock()
        checkpoint(len(phases), 0, opt, sync, final=True)
    summary = {"interrupted": interrupted, "state": state, "domains": [d.name for d in domains],
               "chance": [d.chance for d in domains],
               "bytes_sent": stats.bytes_sent, "comm": stats.as_dict()}
    if rank == 0 and not interrupted:
        from trainops.runtime.report import write_report
        write_report(cfg, world, summary)
    return summary
