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
import time

import torch
import torch.nn.functional as F

from trainops.nn import domain_expert_counts, specialization_score
from trainops.replay import ReplayBuffer
from trainops.runtime.config import config_from_dict
from trainops.runtime.domains import generator
from trainops.runtime.model import lbl_disabled
from trainops.runtime.worker import WorkerRun

__all__ = ["run_worker", "pretrain_step", "greedy_answers", "evaluate"]


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


def _replay_buffer(cfg, rank, n_tasks, device):
    if cfg.replay == "off":
        return None
    spec = {"tokens": ((cfg.seq_len,), torch.int64), "mask": ((cfg.seq_len,), torch.int64),
            "task": ((), torch.int64)}
    kw = dict(sampler="power_law", eviction="fifo") if cfg.replay == "power_law" else \
        dict(sampler="uniform", eviction="reservoir")
    return ReplayBuffer(cfg.replay_capacity, spec, device=device, seed=cfg.seed * 1009 + rank,
                        max_tasks=max(n_tasks, 1), **kw)


def run_worker(rank: int, world: int, cfg_dict: dict) -> dict:
    cfg = config_from_dict(cfg_dict)
    run = WorkerRun(rank, world, cfg, {"acc_matrix": [], "byte_acc_matrix": [], "weights_sha1": {}, "acc_rows": [],
                                       "spec": {}, "routing": {}, "bytes_fp32": 0, "global_step": 0,
                                       "phase_seconds": {}}, _replay_buffer)
    model, state, stats, buffer, device = run.model, run.state, run.stats, run.buffer, run.device
    domains, n_tasks = run.domains, run.n_tasks
    interrupted = False
    for phase_idx in range(run.start_phase, len(run.phases)):
        name, steps, task = run.phases[phase_idx]
        forward, first, bar = run.enter_phase(phase_idx)
        _record_phase_info(state, name, model)
        t0, tokens_done = time.perf_counter(), 0
        for step in range(first, steps + 1):
            run.begin_step()
            replay_rows = 0
            if task is None:
                ce_val, lbl_val, n = pretrain_step(forward, run.sync, domains, cfg, rank, phase_idx, step, device)
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
                run.sync.after_backward(time.perf_counter())
                ce_val, lbl_val = ce.item(), aux.item()
                tokens_done += tokens.numel()
            run.optimizer_step()
            tps = tokens_done * world / max(time.perf_counter() - t0, 1e-9)
            lbl = model.moe_layers()[0].router.lbl
            run.metrics.log(global_step=state["global_step"], phase=name, step=step, loss=ce_val, lbl=lbl_val,
                            lbl_scope=lbl.scope if lbl else None, replay_rows=replay_rows, tokens_per_s=tps,
                            bytes_sent=stats.bytes_sent, bytes_fp32_equiv=state["bytes_fp32"],
                            exchange=cfg.exchange if cfg.sync == "diloco" else f"ddp:{cfg.ddp_hook}",
                            wall_s=state["wall_s"], comm_s=state["comm_s"], flag_s=state["flag_s"])
            if bar is not None:
                bar.set_postfix(loss=f"{ce_val:.3f}", lbl=f"{lbl_val:.4f}", tok_s=f"{tps:,.0f}",
                                sent=f"{stats.bytes_sent / 1e6:.2f}MB", refresh=False)
                bar.update(1)
            if run.end_step(phase_idx, step):
                interrupted = True
                break
        if bar is not None:
            bar.close()
        if interrupted:
            break
        run.end_phase(name)
        if task is not None and buffer is not None:  # rehearsal rows of the finished task
            n = max(1, cfg.replay_capacity // n_tasks)
            tokens, mask = domains[task].sample(generator(cfg.seed, rank, 5555, task), n)
            buffer.add({"tokens": tokens.to(device), "mask": mask.to(device),
                        "task": torch.full((n,), task, dtype=torch.int64, device=device)})
        if rank == 0:
            accs, byte_accs, counts, spec = evaluate(model, run.eval_sets, cfg.num_experts)
            state["acc_rows"].append(name)
            state["acc_matrix"].append(accs)
            state["byte_acc_matrix"].append(byte_accs)
            state["spec"][name] = spec
            state["routing"][name] = counts
            run.metrics.log(global_step=state["global_step"], phase=name, event="eval", accuracy=accs,
                            byte_accuracy=byte_accs, specialization=spec, weights_sha1=state["weights_sha1"][name])
            if bar is not None:
                print(f"[{name}] exact-match (greedy) " + " ".join(f"{d.name}={a:.3f}" for d, a in zip(domains, accs))
                      + f" specialization={spec:.3f}", flush=True)
    run.finish(interrupted)
    summary = {"interrupted": interrupted, "state": state, "domains": [d.name for d in domains],
               "chance": [d.chance for d in domains],
               "bytes_sent": stats.bytes_sent, "comm": stats.as_dict()}
    if rank == 0 and not interrupted:
        from trainops.runtime.report import write_report
        write_report(cfg, world, summary)
    return summary


def _record_phase_info(state: dict, name: str, model) -> None:
    """Trainable parameters and adapter modules of a phase, for the report."""
    params = [p for p in model.parameters() if p.requires_grad]
    kinds: dict = {}
    for mod in model.modules():
        if type(mod).__name__ in ("MoRALinear", "LoRALinear"):
            kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
    state.setdefault("phase_info", {})[name] = {
        "trainable_params": sum(p.numel() for p in params), "adapter_modules": kinds,
        "mora_ranks": [m.num_ranks for m in model.modules() if type(m).__name__ == "MoRALinear"][:1]}
