"""The GRPO loop one worker of ``trainops rl`` runs (``run_rl_worker(rank, world, cfg_dict)``).

Phases as in ``trainops train``: ``pretrain`` (the same supervised steps, on the mixture of
the task domains) then one phase per task, trained by GRPO (:mod:`trainops.runtime.grpo`) on
a fixed pool of ``rl_pool`` prompts of its domain. Each step a worker draws ``batch_size``
prompts of the pool, samples ``rollouts`` completions of each with temperature, verifies
them (exact match of the answer), and with ``rlep on`` adds to each prompt's group up to
``replay_per_group`` completions of that prompt stored earlier in a
:class:`~trainops.replay.ReplayBuffer` on the training device (RLEP, arXiv 2507.07451);
advantages are standardized over the whole group. After the update the step's verified
successes (``rlep_store successes``, the paper's choice) or all its completions go into
the buffer, keyed by prompt. Workers are synchronized by the same DiLoCo / DDP paths as
``trainops train``; checkpoints hold the buffer too, and every draw is a pure function of
(seed, rank, phase, step), so a resumed run continues exactly.

The replay path adds no host synchronization to a step on a GPU: there the step keeps fixed
shapes (``fixed_shapes``): all P·(G+M) rows go through the model, the rows a group lacks
masked out of the GRPO loss and of the MoE load-balancing loss, the successes go into the
buffer with a masked insert whose counters stay on the device, and the step's numbers
(loss, replayed rows, buffer size...) come back in the step's one host read. On the CPU,
where reading a tensor costs nothing, the step compacts the valid rows instead (fewer rows
through the model); the two give the same loss and gradients up to float rounding.

Rank 0 measures the greedy exact-match accuracy on the held-out set of every domain every
``eval_every`` steps of a task and at the end of each phase: the accuracy-against-step curve.
"""
from __future__ import annotations

import time

import torch

from trainops.replay import ReplayBuffer
from trainops.runtime.config import config_from_dict
from trainops.runtime.domains import generator
from trainops.runtime.grpo import answer_logprobs, exact_match_rewards, group_advantages, grpo_loss, sample_rollouts
from trainops.runtime.loop import evaluate, greedy_answers, pretrain_step
from trainops.runtime.model import lbl_disabled
from trainops.runtime.rl_config import RLConfig
from trainops.runtime.worker import WorkerRun

__all__ = ["run_rl_worker", "grpo_step", "rlep_buffer", "pool_accuracy", "replay_groups", "training_rows",
           "store_rollouts"]


def rlep_buffer(cfg: RLConfig, rank: int, device) -> ReplayBuffer | None:
    """Per-worker store of verified completions, grouped by prompt id (FIFO)."""
    if cfg.rlep == "off":
        return None
    spec = {"tokens": ((cfg.seq_len,), torch.int64), "mask": ((cfg.seq_len,), torch.int64),
            "reward": ((), torch.float32)}
    return ReplayBuffer(cfg.replay_capacity, spec, device=device, seed=cfg.seed * 1009 + rank,
                        sampler="uniform", eviction="fifo")


@torch.no_grad()
def pool_accuracy(model, pool, device) -> float:
    """Greedy exact match on a task's training prompts (what GRPO trains on; the held-out
    accuracy measures what carries over to prompts it never saw)."""
    was = model.training
    model.eval()
    tokens, mask = pool[0].to(device), pool[1].to(device)
    with lbl_disabled(model):
        acc = float((greedy_answers(model, tokens, mask) == tokens).all(1).float().mean())
    model.train(was)
    return acc


def replay_groups(buffer, ids, tokens, masks, rewards, per_group: int):
    """Each group extended by up to ``per_group`` stored rows of its prompt: ``tokens`` /
    ``masks`` [P, K, S], ``rewards`` and ``valid`` [P, K] (K = G + per_group; False where a
    group has fewer stored rows) and the number of replayed rows (a device tensor)."""
    got = buffer.sample_groups(ids, per_group)
    valid = torch.cat([torch.ones_like(rewards, dtype=torch.bool), got.mask], 1)
    return (torch.cat([tokens, got.batch["tokens"]], 1), torch.cat([masks, got.batch["mask"]], 1),
            torch.cat([rewards, got.batch["reward"]], 1), valid, got.mask.sum())


def training_rows(tokens, masks, advantages, valid, fixed_shapes: bool):
    """The groups as rows for the loss: (tokens, answer mask [B, S], advantages, valid [B]).
    ``fixed_shapes``: all P·K rows, invalid ones marked (no host read); else only the valid rows
    (a boolean compaction: its size is read on the host)."""
    S = tokens.shape[-1]
    rows, row_mask, row_adv, row_valid = (tokens.reshape(-1, S), masks.reshape(-1, S), advantages.reshape(-1),
                                          valid.reshape(-1))
    if fixed_shapes:
        return rows, row_mask, row_adv, row_valid
    rows, row_mask, row_adv = rows[row_valid], row_mask[row_valid], row_adv[row_valid]
    return rows, row_mask, row_adv, torch.ones_like(row_adv, dtype=torch.bool)


def store_rollouts(buffer, rollouts, masks, rewards, group_ids, store, fixed_shapes: bool) -> None:
    """Insert the rollouts [N, S] where ``store`` [N] is True under their prompt's group id:
    a masked insert with ``fixed_shapes`` (no host read), else the compacted rows."""
    rows = {"tokens": rollouts, "mask": masks, "reward": rewards}
    if fixed_shapes:
        buffer.extend(rows, group=group_ids, mask=store)
    elif bool(store.any()):
        buffer.extend({k: v[store] for k, v in rows.items()}, group=group_ids[store])


def grpo_step(model, forward, sync, cfg: RLConfig, pool, id_offset: int, buffer, gen: torch.Generator,
              device, *, fixed_shapes: bool | None = None) -> tuple[dict, dict]:
    """One GRPO (+ RLEP) step's rollouts, loss and backward; the optimizer step is the caller's.

    ``pool`` = (tokens, mask) [rl_pool, S] of the task's prompts with their answers;
    prompt ``i`` has the RLEP group id ``id_offset + i``. Returns the step's numbers (a
    metrics row, ``buffer_size`` included) and its groups: ``ids`` [P], ``tokens`` [P, K, S],
    ``rewards``, ``valid`` and ``advantages`` [P, K] with K = G + M (the first G fresh).
    ``fixed_shapes`` (default: on every device but the CPU): see the module docstring; with
    it a buffer whose counters stay on the device (``lazy_counters``) is sampled even when
    empty, so K = G + M from the first step."""
    P, G, S = cfg.batch_size, cfg.rollouts, cfg.seq_len
    fixed = device.type != "cpu" if fixed_shapes is None else bool(fixed_shapes)
    idx = torch.randint(0, pool[0].shape[0], (P,), generator=gen)
    targets, mask = pool[0][idx].to(device), pool[1][idx].to(device)
    ids = (idx + id_offset).to(device)
    targets_g, mask_g = targets.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    with lbl_disabled(model):  # sampling is no training step: no LBL counts, no collective
        rollouts = sample_rollouts(model, targets_g, mask_g, cfg.rl_temperature, gen)
    rewards = exact_match_rewards(rollouts, targets_g, mask_g)
    tokens, masks, group_rewards = rollouts.view(P, G, S), mask_g.view(P, G, S), rewards.view(P, G)
    valid = torch.ones(P, G, dtype=torch.bool, device=device)
    replay_s, replayed = 0.0, torch.zeros((), dtype=torch.int64, device=device)
    # with lazy counters the size is not read: an empty buffer gives all-masked groups
    if buffer is not None and ((fixed and buffer.lazy_counters) or len(buffer) > 0):
        t0 = time.perf_counter()
        tokens, masks, group_rewards, valid, replayed = replay_groups(buffer, ids, tokens, masks, group_rewards,
                                                                      cfg.replay_per_group)
        replay_s += time.perf_counter() - t0
    advantages = group_advantages(group_rewards, valid)
    rows, row_mask, row_adv, row_valid = training_rows(tokens, masks, advantages, valid, fixed)
    if fixed and buffer is not None:  # rows a group lacks stay out of the load-balancing loss
        logits, aux = forward(rows, mask=row_valid[:, None].expand(-1, S))
    else:
        logits, aux = forward(rows)
    logp = answer_logprobs(logits, rows, cfg.rl_temperature)
    loss = grpo_loss(logp, logp.detach(), row_mask, row_adv, row_valid, cfg.clip_eps)
    (loss + aux).backward()
    sync.after_backward(time.perf_counter())
    if buffer is not None:  # after sampling: a step never replays its own completions
        t0 = time.perf_counter()
        store = rewards >= 1.0 if cfg.rlep_store == "successes" else torch.ones_like(rewards, dtype=torch.bool)
        store_rollouts(buffer, rollouts, mask_g, rewards, ids.repeat_interleave(G), store, fixed)
        replay_s += time.perf_counter() - t0
    stored = buffer.stored_count() if buffer is not None else torch.zeros((), dtype=torch.int64, device=device)
    # the step's one host read
    loss_v, lbl_v, reward_v, replayed_v, n_rows, size_v = torch.stack([
        loss.detach().double(), aux.detach().double(), rewards.mean().double(), replayed.double(),
        row_valid.sum().double(), stored.to(device).double()]).tolist()
    row = {"loss": loss_v, "lbl": lbl_v, "reward": reward_v, "replay_rows": int(replayed_v), "replay_s": replay_s,
           "tokens": int(n_rows) * S + rollouts.numel(), "buffer_size": int(size_v)}
    return row, {"ids": ids, "tokens": tokens, "rewards": group_rewards, "valid": valid, "advantages": advantages}


def run_rl_worker(rank: int, world: int, cfg_dict: dict) -> dict:
    cfg = config_from_dict(cfg_dict, cls=RLConfig)
    run = WorkerRun(rank, world, cfg, {"acc_matrix": [], "acc_rows": [], "curve": [], "weights_sha1": {},
                                       "bytes_fp32": 0, "global_step": 0, "phase_seconds": {}, "replay_s": 0.0},
                    lambda cfg, rank, n_tasks, device: rlep_buffer(cfg, rank, device))
    model, state, stats, device = run.model, run.state, run.stats, run.device
    pools = [d.sample(generator(cfg.seed, 4242, i), cfg.rl_pool) for i, d in enumerate(run.domains)]

    def evaluate_now(name, step, phase_end):
        accs, byte_accs, _, spec = evaluate(model, run.eval_sets, cfg.num_experts)
        pool_accs = [pool_accuracy(model, pool, device) for pool in pools]
        state["curve"].append({"global_step": state["global_step"], "phase": name, "step": step, "accuracy": accs,
                               "pool_accuracy": pool_accs})
        if phase_end:
            state["acc_rows"].append(name)
            state["acc_matrix"].append(accs)
        run.metrics.log(global_step=state["global_step"], phase=name, event="eval", accuracy=accs,
                        byte_accuracy=byte_accs, pool_accuracy=pool_accs, specialization=spec)

    interrupted = False
    for phase_idx in range(run.start_phase, len(run.phases)):
        name, steps, task = run.phases[phase_idx]
        forward, first, bar = run.enter_phase(phase_idx)
        t0, tokens_done = time.perf_counter(), 0
        for step in range(first, steps + 1):
            if task is not None and rank == 0 and step > 1 and (step - 1) % cfg.eval_every == 0:
                evaluate_now(name, step - 1, phase_end=False)  # the policy after step - 1 GRPO steps
            gs = run.begin_step()
            if task is None:
                loss, lbl, n = pretrain_step(forward, run.sync, run.domains, cfg, rank, phase_idx, step, device)
                row = {"loss": loss, "lbl": lbl, "tokens": n}
            else:
                row, _ = grpo_step(model, forward, run.sync, cfg, pools[task], task * cfg.rl_pool, run.buffer,
                                   generator(cfg.seed, rank, phase_idx, step), device)
                state["replay_s"] += row["replay_s"]
            tokens_done += row.pop("tokens")
            buffer_size = row.pop("buffer_size") if "buffer_size" in row else (
                0 if run.buffer is None else len(run.buffer))
            run.optimizer_step()
            tps = tokens_done * world / max(time.perf_counter() - t0, 1e-9)
            run.metrics.log(global_step=gs, phase=name, step=step, **row, tokens_per_s=tps,
                            buffer_size=buffer_size, bytes_sent=stats.bytes_sent,
                            bytes_fp32_equiv=state["bytes_fp32"], wall_s=state["wall_s"], comm_s=state["comm_s"],
                            flag_s=state["flag_s"])
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row.get('reward', float('nan')):.3f}",
                                refresh=False)
                bar.update(1)
            if run.end_step(phase_idx, step):
                interrupted = True
                break
        if bar is not None:
            bar.close()
        if interrupted:
            break
        run.end_phase(name)
        if rank == 0:
            evaluate_now(name, steps, phase_end=True)
    run.finish(interrupted)
    summary = {"interrupted": interrupted, "state": state, "domains": [d.name for d in run.domains],
               "chance": [d.chance for d in run.domains], "bytes_sent": stats.bytes_sent, "comm": stats.as_dict()}
    if rank == 0 and not interrupted:
        from trainops.runtime.rl_report import write_rl_report
        write_rl_report(cfg, world, summary)
    return summary
