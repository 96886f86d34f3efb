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

__all__ = ["run_rl_worker", "grpo_step", "rlep_buffer", "pool_accuracy"]


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


def grpo_step(model, forward, sync, cfg: RLConfig, pool, id_offset: int, buffer, gen: torch.Generator,
              device) -> tuple[dict, dict]:
    """One GRPO (+ RLEP) step's rollouts, loss and backward; the optimizer step is the caller's.

    ``pool`` = (tokens, mask) [rl_pool, S] of the task's prompts with their answers;
    prompt ``i`` has the RLEP group id ``id_offset + i``. Returns the step's numbers (a
    metrics row) and its groups: ``ids`` [P], ``tokens`` [P, K, S], ``rewards``, ``valid``
    and ``advantages`` [P, K] with K = G + M (the first G fresh)."""
    P, G, S = cfg.batch_size, cfg.rollouts, cfg.seq_len
    idx = torch.randint(0, pool[0].shape[0], (P,), generator=gen)
    targets, mask = pool[0][idx].to(device), pool[1][idx].to(device)
    ids = (idx + id_offset).to(device)
    targets_g, mask_g = targets.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    with lbl_disabled(model):  # sampling is no training step: no LBL counts, no collective
        rollouts = sample_rollouts(model, targets_g, mask_g, cfg.rl_temperature, gen)
    rewards = exact_match_rewards(rollouts, targets_g, mask_g)
    tokens, masks, group_rewards = rollouts.view(P, G, S), mask_g.view(P, G, S), rewards.view(P, G)
    valid = torch.ones(P, G, dtype=torch.bool, device=device)
    replay_s, replayed = 0.0, 0
    if buffer is not None and len(buffer) > 0:
        t0 = time.perf_counter()
        got = buffer.sample_groups(ids, cfg.replay_per_group)
        tokens = torch.cat([tokens, got.batch["tokens"]], 1)
        masks = torch.cat([masks, got.batch["mask"]], 1)
        group_rewards = torch.cat([group_rewards, got.batch["reward"]], 1)
        valid = torch.cat([valid, got.mask], 1)
        replay_s += time.perf_counter() - t0
        replayed = int(got.mask.sum())
    advantages = group_advantages(group_rewards, valid)
    keep = valid.reshape(-1)
    rows, row_mask, row_adv = tokens.reshape(-1, S)[keep], masks.reshape(-1, S)[keep], advantages.reshape(-1)[keep]
    logits, aux = forward(rows)
    logp = answer_logprobs(logits, rows, cfg.rl_temperature)
    loss = grpo_loss(logp, logp.detach(), row_mask, row_adv, torch.ones_like(row_adv, dtype=torch.bool),
                     cfg.clip_eps)
    (loss + aux).backward()
    sync.after_backward(time.perf_counter())
    if buffer is not None:  # after sampling: a step never replays its own completions
        t0 = time.perf_counter()
        store = rewards >= 1.0 if cfg.rlep_store == "successes" else torch.ones_like(rewards, dtype=torch.bool)
        if bool(store.any()):
            buffer.extend({"tokens": rollouts[store], "mask": mask_g[store], "reward": rewards[store]},
                          group=ids.repeat_interleave(G)[store])
        replay_s += time.perf_counter() - t0
    row = {"loss": float(loss.detach()), "lbl": float(aux.detach()), "reward": float(rewards.mean()),
           "replay_rows": replayed, "replay_s": replay_s, "tokens": int(rows.numel() + rollouts.numel())}
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
            run.optimizer_step()
            tps = tokens_done * world / max(time.perf_counter() - t0, 1e-9)
            run.metrics.log(global_step=gs, phase=name, step=step, **row, tokens_per_s=tps,
                            buffer_size=0 if run.buffer is None else len(run.buffer), bytes_sent=stats.bytes_sent,
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
