"""What RLEP costs per GRPO step of ``trainops rl``, measured side by side in one process.

Rows per case (timed round-robin, ``measure_interleaved``), each a whole training step on one
worker: rollouts sampled from the policy, verified, the loss, backward and the AdamW step:

  plain GRPO      ``--rlep off``: G fresh completions per prompt
  RLEP            ``--rlep on``: the same plus up to M replayed completions per prompt
                  (drawn with ``ReplayBuffer.sample_groups``) and the step's successes stored
  replay path     the RLEP step's buffer calls alone (sample_groups of the step's prompts,
                  extend with its successes)
  RLEP fixed shapes / replay path, fixed shapes
                  the same with the GPU's step forced on the CPU (``fixed_shapes=True``, the
                  buffer's counters on the device): all P·(G+M) rows through the model, the
                  successes stored with ``extend(mask=...)``, no host read on the replay path

``replay path % of RLEP step`` is what the buffer adds; the rest of the difference between
the two steps is the forward and backward of the M extra rows per group, which is the method,
not overhead. The buffer is filled beforehand with successes of every prompt (a steady state).

    python benchmarks/bench_rlep_overhead.py            # the default trainops rl model and sizes
    python benchmarks/bench_rlep_overhead.py --quick
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Table, measure_interleaved, quick_cpu_args, results_suffix  # noqa: E402
from trainops.runtime.config import config_from_dict  # noqa: E402
from trainops.runtime.domains import VOCAB, generator, make_domains  # noqa: E402
from trainops.runtime.model import MoETransformer  # noqa: E402
from trainops.runtime.rl_config import RLConfig  # noqa: E402
from trainops.runtime.rl_loop import grpo_step, rlep_buffer  # noqa: E402


class _Local:
    """One worker, no synchronization."""

    def after_backward(self, seconds: float) -> None:
        pass


def _stepper(cfg, buffer, pool, seed: int, fixed: bool = False):
    torch.manual_seed(cfg.seed)
    model = MoETransformer(cfg, VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.task_lr)
    count = [seed]

    def step():
        count[0] += 1
        grpo_step(model, model, _Local(), cfg, pool, 0, buffer, torch.Generator().manual_seed(count[0]),
                  torch.device("cpu"), fixed_shapes=fixed)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_case(table: Table, overrides: dict, min_run_time: float) -> None:
    cfg = config_from_dict({"out_dir": "unused", **overrides}, cls=RLConfig)
    pool = make_domains(cfg.task_list(), cfg.seq_len)[0].sample(generator(cfg.seed, 4242, 0), cfg.rl_pool)
    # one buffer per row: the replay-path rows store the same prompts' rows over and over, which
    # would evict the other prompts' successes from a buffer that a step then samples
    step_buffer, step_lazy, buffer, lazy = (
        rlep_buffer(config_from_dict({"out_dir": "unused", **overrides, "rlep": "on"}, cls=RLConfig), 0,
                    torch.device("cpu")) for _ in range(4))
    step_lazy._lazy = lazy._lazy = True  # counters on the device, as on a GPU
    n = min(cfg.replay_capacity, 4 * cfg.rl_pool)  # four stored successes of every prompt
    rows = torch.arange(n) % cfg.rl_pool
    for b in (step_buffer, step_lazy, buffer, lazy):
        b.extend({"tokens": pool[0][rows], "mask": pool[1][rows], "reward": torch.ones(n)}, group=rows)
    ids = torch.randint(0, cfg.rl_pool, (cfg.batch_size,), generator=torch.Generator().manual_seed(1))
    # the step's rollouts, half of them successes
    rollouts = {"tokens": pool[0][ids].repeat(4, 1), "mask": pool[1][ids].repeat(4, 1),
                "reward": torch.ones(4 * cfg.batch_size)}
    store = torch.arange(4 * cfg.batch_size) % 2 == 0

    def replay_path():
        buffer.sample_groups(ids, cfg.replay_per_group)
        if bool(store.any()):
            buffer.extend({k: v[store] for k, v in rollouts.items()}, group=ids.repeat(4)[store])

    def replay_path_fixed():
        lazy.sample_groups(ids, cfg.replay_per_group)
        lazy.extend(rollouts, group=ids.repeat(4), mask=store)

    fns = {"plain GRPO": _stepper(cfg, None, pool, 0), "RLEP": _stepper(cfg, step_buffer, pool, 0),
           "RLEP fixed shapes": _stepper(cfg, step_lazy, pool, 0, fixed=True), "replay path": replay_path,
           "replay path, fixed shapes": replay_path_fixed}
    t = measure_interleaved(fns, "cpu", min_run_time)
    case = {"prompts x G + M": f"{cfg.batch_size} x {cfg.rollouts} + {cfg.replay_per_group}",
            "d_model": cfg.d_model, "seq_len": cfg.seq_len}
    table.add(case, "plain GRPO", t["plain GRPO"])
    table.add(case, "RLEP", t["RLEP"], baseline="plain GRPO")
    table.add(case, "RLEP fixed shapes", t["RLEP fixed shapes"], baseline="plain GRPO")
    for name, step in (("replay path", "RLEP"), ("replay path, fixed shapes", "RLEP fixed shapes")):
        table.add(case, name, t[name],
                  **{"replay path % of RLEP step": round(100 * t[name].median_s / t[step].median_s, 2)})


def main(argv=None) -> str:
    args = quick_cpu_args(__doc__.splitlines()[0], argv)
    if args.threads is None:
        torch.set_num_threads(1)  # as a trainops rl worker (--threads 1)
    table = Table(f"RLEP cost per GRPO step ({torch.get_num_threads()} torch thread(s); speedup < 1 is the "
                  "RLEP step's extra time)", "cpu")
    cases = [{"batch_size": 2, "rollouts": 2, "replay_per_group": 1, "d_model": 16, "ffn_size": 16, "n_heads": 2,
              "n_layers": 1, "rl_pool": 8}] if args.quick \
        else [{}, {"rollouts": 16, "replay_per_group": 4}]
    for overrides in cases:
        run_case(table, overrides, 0.2 if args.quick else 2.0)
    return table.report(f"rlep_overhead_{results_suffix('cpu')}.csv")


if __name__ == "__main__":
    main()
