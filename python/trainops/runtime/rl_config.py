"""Configuration of ``trainops rl``: :class:`TrainConfig`'s keys (model, pre-training,
distributed, checkpoints) with RL defaults, plus the GRPO and RLEP keys.

The phases are those of ``trainops train`` with the task phases trained by GRPO instead of
supervised steps: ``pretrain`` (supervised, on the mixture of the task domains) then, per
task, ``task_steps`` GRPO steps on a fixed pool of ``rl_pool`` prompts of its domain, with
the exact match of the sampled answer as the verified reward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainops.runtime.config import ConfigError, TrainConfig, _f

__all__ = ["RLConfig", "RLEP_MODES", "RLEP_STORE"]

RLEP_MODES = ("on", "off")
RLEP_STORE = ("successes", "all")
_MAX = {"rollouts": 1024, "replay_per_group": 1024, "rl_pool": 1_000_000, "eval_every": 10**9}


@dataclass
class RLConfig(TrainConfig):
    COMMAND: ClassVar[str] = "rl"

    # --- TrainConfig keys with other defaults (or meanings) under `trainops rl` --------------
    out_dir: str = _f("runs/rl", "output directory (metrics.jsonl, config.yaml, report.md, plots/, checkpoint/)")
    tasks: str = _f("reverse", "comma-separated domains trained by GRPO in sequence (reward = exact match of the "
                               "sampled answer; default: reversal of 4 letters, which the warm-up leaves near 10%; "
                               "'add', two-digit addition, is harder still)")
    batch_size: int = _f(16, "prompts per GRPO step per worker (each gets --rollouts fresh completions)")
    pretrain_steps: int = _f(60, "supervised steps on the mixture of the task domains before GRPO (a brief "
                                 "warm-up: the policy starts well below the ceiling)")
    task_steps: int = _f(200, "GRPO steps per task")
    task_lr: float = _f(1e-3, "AdamW learning rate of the GRPO steps")
    adapter: str = _f("none", "mora | lora | none (default: the whole model is the policy)")
    replay: str = _f("off", "supervised rehearsal of `trainops train`: must stay off (RLEP is --rlep)")
    replay_capacity: int = _f(4096, "RLEP buffer rows per worker (verified completions, FIFO)")
    # --- GRPO -----------------------------------------------------------------------------
    rollouts: int = _f(8, "G: fresh completions sampled per prompt and step")
    rl_temperature: float = _f(1.0, "sampling temperature of the rollouts (also of the policy's log-probs)")
    clip_eps: float = _f(0.2, "PPO clip range of the GRPO surrogate (inactive with one update per batch)")
    rl_pool: int = _f(512, "distinct training prompts per task, drawn once from the domain (RLEP replays "
                           "per prompt, so prompts recur: every rl_pool / batch_size steps on average)")
    eval_every: int = _f(25, "rank 0 measures greedy exact-match accuracy on the held-out set every N GRPO steps")
    # --- RLEP -----------------------------------------------------------------------------
    rlep: str = _f("on", "RL with experience replay: on (each group = G fresh + up to M replayed) | off (plain GRPO)")
    replay_per_group: int = _f(2, "M: replayed completions of the same prompt added to each group")
    rlep_store: str = _f("successes", "which completions RLEP keeps: successes (verified reward 1, the paper's "
                                      "choice) | all (every completion with its reward)")

    def validate(self) -> "RLConfig":
        super().validate()

        def need(cond, key, what):
            if not cond:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {what}")
        need(self.replay == "off", "replay", "trainops rl has no supervised rehearsal; replay of verified "
                                             "rollouts is --rlep on")
        for key in ("rollouts", "rl_pool", "eval_every"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.replay_per_group >= 0, "replay_per_group", "must be >= 0")
        for key, most in _MAX.items():
            need(getattr(self, key) <= most, key, f"must be <= {most}")
        need(self.rl_temperature > 0, "rl_temperature", "must be > 0")
        need(0 < self.clip_eps < 1, "clip_eps", "must be in (0, 1)")
        need(self.rlep in RLEP_MODES, "rlep", f"must be one of {', '.join(RLEP_MODES)}")
        need(self.rlep_store in RLEP_STORE, "rlep_store", f"must be one of {', '.join(RLEP_STORE)}")
        need(self.rlep == "off" or self.replay_per_group >= 1, "replay_per_group", "must be >= 1 with --rlep on")
        rows = self.batch_size * (self.rollouts + self.replay_per_group)
        need(rows * self.seq_len <= 1 << 20, "batch_size",
             f"x (rollouts + replay_per_group) x seq_len = {rows * self.seq_len} tokens per step; at most {1 << 20}")
        return self
