"""RLEP (Zhang et al. 2025, arXiv 2507.07451) for TRL's ``GRPOTrainer``.

RLEP keeps the verified-correct rollouts of each prompt and, at every generation, mixes
``M = replay_per_group`` of them (drawn uniformly, without replacement, from that prompt's
pool) into the prompt's group of ``G = num_generations`` fresh rollouts; the group-relative
advantages are computed over all G + M items, and the replayed items enter the loss like fresh
ones. The pool is a :class:`trainops.replay.ReplayBuffer` (fixed-size token rows, group id =
a 64-bit hash of the prompt), saved with every checkpoint and restored on resume.

    from trainops.integrations.trl import RLEPConfig, RLEPGRPOTrainer
    args = RLEPConfig(output_dir="out", replay_per_group=2, replay_success_threshold=1.0)
    trainer = RLEPGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)

``RLEPGRPOTrainer`` takes ``GRPOTrainer``'s arguments; with ``replay_per_group=0`` (or a plain
``GRPOConfig``) it is ``GRPOTrainer``. The extension points are TRL's own: the batch that
``_generate_and_score_completions`` returns (fresh rows, scored and with TRL's advantages) is
extended with the replayed rows and its advantages recomputed; the rewards are read where TRL
computes them (``_calculate_rewards``); the buffer is saved by ``_save_checkpoint`` and read
back by ``_load_optimizer_and_scheduler``, as TRL does for its own trainer state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:
    raise ImportError(f"trainops.integrations.trl needs TRL >= 1.16: pip install \"trainops[trl]\" ({e})") from None
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from trainops._validation import check_finite_float, check_int
from trainops.integrations._trl_advantages import group_advantages
from trainops.replay import ReplayBuffer

__all__ = ["RLEPConfig", "RLEPGRPOTrainer", "ReplayStep", "prompt_group_id", "REPLAY_FILE"]

logger = logging.getLogger(__name__)

REPLAY_FILE = "rlep_replay.safetensors"
STORE_MODES = ("successes", "all")


def prompt_group_id(prompt) -> int:
    """Stable int64 id of a prompt: the first 8 bytes of BLAKE2b of its text (a conversational
    prompt, a list of messages, as canonical JSON). The same in every process and run, unlike
    Python's ``hash``."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


@dataclass
class RLEPConfig(GRPOConfig):
    """``GRPOConfig`` plus RLEP's settings.

    replay_per_group: M, replayed items mixed into each prompt's group (0: RLEP off). The paper
        uses G=16, M=2.
    replay_capacity: items the replay pool holds (FIFO: the oldest go first). The pool lives on
        the training device and takes about capacity × (max_completion_length + 2 + K) × 4 bytes
        (K reward functions): 16384 × 1024-token completions is 64 MiB.
    replay_success_threshold: a rollout is a verified success, and stored, when its weighted
        reward (Σ_k w_k r_k) is >= this.
    replay_store: ``"successes"`` (default; the paper's choice: replaying failures did not help)
        or ``"all"`` (every scored rollout).
    replay_seed: seed of the pool's draws (None: ``seed``).
    """

    replay_per_group: int = field(default=0, metadata={"help": "RLEP: replayed successes per group (0: off)."})
    replay_capacity: int = field(default=16384, metadata={"help": "RLEP: rollouts the replay pool holds."})
    replay_success_threshold: float = field(
        default=1.0, metadata={"help": "RLEP: a rollout with weighted reward >= this is a verified success."})
    replay_store: str = field(default="successes", metadata={"help": "RLEP: store 'successes' or 'all' rollouts."})
    replay_seed: int | None = field(default=None, metadata={"help": "RLEP: seed of the replay draws (None: seed)."})

    def __post_init__(self):
        super().__post_init__()
        check_int("replay_per_group", self.replay_per_group, 0)
        check_int("replay_capacity", self.replay_capacity, 1, 2**31 - 1)
        self.replay_success_threshold = check_finite_float("replay_success_threshold", self.replay_success_threshold)
        if self.replay_store not in STORE_MODES:
            raise ValueError(f"replay_store must be one of {STORE_MODES}, got {self.replay_store!r}")
        if self.replay_seed is not None:
            check_int("replay_seed", self.replay_seed)


class ReplayStep(NamedTuple):
    """Layout of the last training generation: this process's R rows in the order of the batch
    handed to TRL (before its shuffle): group-major, each prompt's G fresh rows (those of this
    process), then its replayed rows (on the process holding the group's first fresh row)."""

    group_ids: torch.Tensor    # [R] int64 prompt id of each row
    is_replay: torch.Tensor    # [R] bool
    rewards: torch.Tensor      # [R] weighted reward of each row
    advantages: torch.Tensor   # [R]
    replay_slots: torch.Tensor  # [B, M] pool slots replayed into each group of the whole batch (-1: none)
    stored: int                # fresh rollouts (all processes') added to the pool after the draw


class RLEPGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with RLEP experience replay (see the module docstring and
    :class:`RLEPConfig`). ``replay_buffer`` is the pool (None when RLEP is off);
    ``last_replay_step`` the layout of the last training generation.

    Supported with RLEP on: text prompts (plain or conversational), generation by transformers,
    one or several processes; not yet: vLLM, tools, environments, images.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replay_per_group = int(getattr(self.args, "replay_per_group", 0))
        self.replay_buffer: ReplayBuffer | None = None
        self.last_replay_step: ReplayStep | None = None
        self._rlep_rewards_per_func = None
        if self.replay_per_group == 0:
            return
        unsupported = [name for name, on in (
            ("use_vllm", self.use_vllm),
            ("tools", bool(self.tools)), ("environment_factory", self.environment_factories is not None))
            if on]
        if unsupported:
            raise NotImplementedError(f"RLEP (replay_per_group > 0) does not support {', '.join(unsupported)} yet")
        seed = self.args.seed if self.args.replay_seed is None else self.args.replay_seed
        spec = {"completion_ids": ((self.max_completion_length,), torch.int32), "length": ((), torch.int32),
                "rewards": ((len(self.reward_funcs),), torch.float32)}
        device = self.accelerator.device  # "cpu:0" with several CPU processes: tensors say "cpu"
        device = torch.device("cpu") if device.type == "cpu" else device
        self.replay_buffer = ReplayBuffer(self.args.replay_capacity, spec, device=device,
                                          sampler="uniform", eviction="fifo", seed=seed,
                                          ragged={"completion_ids": "length"})

    # ------------------------------------------------------------------ TRL extension points
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rlep_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.replay_buffer is None or not self.model.training:
            return output
        return self._mix_replay(inputs, output, self._rlep_rewards_per_func)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.replay_buffer is not None and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.replay_buffer.save(os.path.join(self._get_output_dir(trial=trial), folder, REPLAY_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.replay_buffer is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, REPLAY_FILE)
        if os.path.isfile(path):
            self.replay_buffer.load(path)
        else:
            logger.warning("%s has no %s (saved without RLEP?): the replay pool starts empty", checkpoint, REPLAY_FILE)

    # ------------------------------------------------------------------ RLEP
    def _mix_replay(self, inputs: list, output: dict, rewards_per_func: torch.Tensor) -> dict:
        """``output`` (this process's n fresh rows) with up to M replayed rows per group, placed
        after the group's fresh rows, and advantages recomputed over each whole group; then the
        generation's stored-worthy fresh rollouts go into the pool (after the draw, so a group
        never replays its own fresh rollouts).

        With several processes, the generation batch is the processes' rows in rank order (TRL
        gathers rewards that way; a group may straddle two processes). Every process keeps the
        same pool (same seed, same inserts of the gathered rollouts), so all draw the same
        replayed rows and compute the same advantages over the whole batch; the replayed rows,
        in group order, are shared out evenly (TRL gathers per-row values, so every process
        needs the same row count)."""
        G, M, L = self.num_generations, self.replay_per_group, self.max_completion_length
        foreign = [k for k in ("tool_mask", "pixel_values", "num_images", "importance_sampling_ratio",
                               "sampling_per_token_logps", "token_type_ids", "mm_token_type_ids") if k in output]
        if foreign:
            raise NotImplementedError(f"RLEP does not support batches with {foreign} yet")
        dev = output["completion_ids"].device
        procs, rank, n = self.accelerator.num_processes, self.accelerator.process_index, len(inputs)
        total = n * procs
        if total % G:
            raise RuntimeError(f"a generation batch of {total} rows is not whole groups of num_generations={G}")
        B, K = total // G, rewards_per_func.shape[1]
        rewards_per_func = rewards_per_func.to(dev)
        row_ids = self._gather(torch.tensor([prompt_group_id(x["prompt"]) for x in inputs], dtype=torch.int64,
                                            device=dev))
        group_ids = row_ids[::G]

        # draw M of each prompt's stored successes
        if len(self.replay_buffer):
            drawn = self.replay_buffer.sample_groups(group_ids, M)
            mask, slots, rows = drawn.mask.clone(), drawn.indices.clone(), drawn.batch
        else:
            mask = torch.zeros(B, M, dtype=torch.bool, device=dev)
            slots = torch.full((B, M), -1, dtype=torch.int64, device=dev)
            rows = {"completion_ids": torch.zeros(B, M, L, dtype=torch.int32, device=dev),
                    "length": torch.zeros(B, M, dtype=torch.int32, device=dev),
                    "rewards": torch.zeros(B, M, K, device=dev)}
        # TRL splits each process's batch into steps_per_generation equal parts (a remainder would
        # be lost) and gathers per-row values across processes (equal counts needed): keep the most
        # replayed rows that give every process the same count, a multiple of the split.
        total_replayed = int(mask.sum())
        per_proc = total_replayed // procs
        while (n + per_proc) % self.args.steps_per_generation:
            per_proc -= 1
        excess = total_replayed - per_proc * procs
        if excess:
            mask.view(-1)[mask.view(-1).nonzero().view(-1)[-excess:]] = False
        slots.masked_fill_(~mask, -1)

        # advantages over G + M, for the whole batch
        combined = torch.full((B, G + M, K), float("nan"), device=dev)
        combined[:, :G] = rewards_per_func.view(B, G, K)
        combined[:, G:][mask] = rows["rewards"][mask].to(combined)
        weights = self.reward_weights.to(dev)
        advantages, _ = group_advantages(combined, weights, self.scale_rewards, self.multi_objective_aggregation)
        group_rewards = (combined * weights).nansum(-1)

        stored = self._store_fresh(output, rewards_per_func, row_ids)
        # the replayed rows in group order, split evenly: this process trains the rank-th share
        share = torch.zeros(B * M, dtype=torch.bool, device=dev)
        share[mask.view(-1).nonzero().view(-1)[rank * per_proc:(rank + 1) * per_proc]] = True
        local = share.view(B, M)
        mixed = self._append_replayed(output, rows, local)
        mixed["num_items_in_batch"] = output["num_items_in_batch"] + rows["length"][mask].sum()

        # each group's replayed rows right after its (local) fresh rows: sort keys in units of M + 1
        groups_local = local.nonzero()
        fresh_key = (torch.arange(n, device=dev) + rank * n) * (M + 1)
        replay_key = (groups_local[:, 0] * G + G - 1) * (M + 1) + 1 + groups_local[:, 1]
        order = torch.argsort(torch.cat([fresh_key, replay_key]), stable=True)
        del mixed["advantages"]  # the fresh rows' only; recomputed below
        for key, value in mixed.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                mixed[key] = value.index_select(0, order)
        fresh = slice(rank * n, (rank + 1) * n)
        mixed["advantages"] = torch.cat([advantages[:, :G].reshape(-1)[fresh], advantages[:, G:][local]])[order]

        num_replayed = int(local.sum())
        metrics = self._metrics["train"]
        metrics["rlep/replayed_fraction"].append(num_replayed / (n + num_replayed))
        metrics["rlep/stored"].append(float(stored))
        metrics["rlep/buffer_size"].append(float(len(self.replay_buffer)))
        self.last_replay_step = ReplayStep(
            torch.cat([row_ids[fresh], group_ids[groups_local[:, 0]]])[order],
            torch.cat([torch.zeros(n, dtype=torch.bool, device=dev), torch.ones(num_replayed, dtype=torch.bool,
                                                                                  device=dev)])[order],
            torch.cat([group_rewards[:, :G].reshape(-1)[fresh], group_rewards[:, G:][local]])[order],
            mixed["advantages"], slots, stored)
        return mixed

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t) if self.accelerator.num_processes > 1 else t

    def _store_fresh(self, output: dict, rewards_per_func: torch.Tensor, row_ids: torch.Tensor) -> int:
        """Add the generation's fresh rollouts (all processes') that the store mode keeps
        (verified successes by default) to the pool."""
        L = self.max_completion_length
        ids = output["completion_ids"]
        ids = ids[:, :L] if ids.shape[1] >= L else torch.nn.functional.pad(ids, (0, L - ids.shape[1]))
        ids, lengths = self._gather(ids.contiguous()), self._gather(output["completion_mask"].sum(1))
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(1)
        scored = ~torch.isnan(rewards_per_func).all(1)
        keep = scored & (lengths > 0)  # a completion masked out entirely (truncated, when masked) is no answer
        if self.args.replay_store == "successes":
            keep &= rewards >= self.args.replay_success_threshold
        count = int(keep.sum())
        if count == 0:
            return 0
        ids = ids[keep].masked_fill(torch.arange(L, device=ids.device) >= lengths[keep].unsqueeze(1), 0)
        self.replay_buffer.extend({"completion_ids": ids.to(torch.int32), "length": lengths[keep].to(torch.int32),
                                   "rewards": rewards_per_func[keep].float()}, group=row_ids[keep])
        return count

    def _append_replayed(self, output: dict, rows: dict, mask: torch.Tensor) -> dict:
        """``output`` with the replayed rows of ``mask`` [B, M] appended at the end (prompt = their
        group's prompt, taken from any process; completion tensors padded to a common width;
        old/reference log-probs of the replayed rows computed by the current/reference model, as
        TRL does for fresh rows)."""
        G = self.num_generations
        out = dict(output)
        count = int(mask.sum())
        if count == 0:
            return out
        pad_id = self._tokenizer.pad_token_id
        dev = output["completion_ids"].device
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        if self.accelerator.num_processes > 1:  # prompts are left-padded: pad on the left to gather
            pad = self.accelerator.pad_across_processes
            all_ids = self._gather(pad(prompt_ids, dim=1, pad_index=pad_id, pad_first=True))
            all_mask = self._gather(pad(prompt_mask, dim=1, pad_index=0, pad_first=True))
        else:
            all_ids, all_mask = prompt_ids, prompt_mask
        group_of_row = mask.nonzero()[:, 0]
        replay_prompt_ids, replay_prompt_mask = all_ids[group_of_row * G], all_mask[group_of_row * G]
        # the narrowest width that holds every prompt, local and replayed (left padding kept)
        prompt_width = max(prompt_ids.shape[1], int(replay_prompt_mask.sum(1).max()))
        if self.pad_to_multiple_of:
            prompt_width = -(-prompt_width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def fit_left(t, value):
            return torch.nn.functional.pad(t, (max(0, prompt_width - t.shape[1]), 0), value=value)[:, -prompt_width:]

        prompt_ids, prompt_mask = fit_left(prompt_ids, pad_id), fit_left(prompt_mask, 0)
        replay_prompt_ids, replay_prompt_mask = fit_left(replay_prompt_ids, pad_id), fit_left(replay_prompt_mask, 0)
        lengths = rows["length"][mask].long()
        width_fresh = output["completion_ids"].shape[1]
        width = max(width_fresh, int(lengths.max()))
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = rows["completion_ids"][mask].long()
        ids = torch.nn.functional.pad(ids, (0, max(0, width - ids.shape[1])))[:, :width]
        completion_mask = (torch.arange(width, device=dev) < lengths.unsqueeze(1)).to(output["completion_mask"].dtype)
        ids = ids.masked_fill(completion_mask == 0, pad_id)

        def widen(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        out["prompt_ids"] = torch.cat([prompt_ids, replay_prompt_ids])
        out["prompt_mask"] = torch.cat([prompt_mask, replay_prompt_mask])
        out["completion_ids"] = torch.cat([widen(output["completion_ids"], pad_id), ids])
        out["completion_mask"] = torch.cat([widen(output["completion_mask"], 0), completion_mask])
        if "old_per_token_logps" in output or "ref_per_token_logps" in output:
            old, ref = self._replayed_logps(replay_prompt_ids, replay_prompt_mask, ids, completion_mask,
                                            "old_per_token_logps" in output, "ref_per_token_logps" in output)
            if old is not None:
                out["old_per_token_logps"] = torch.cat([widen(output["old_per_token_logps"], 0.0), old])
            if ref is not None:
                out["ref_per_token_logps"] = torch.cat([widen(output["ref_per_token_logps"], 0.0), ref])
        return out

    def _replayed_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask, want_old: bool,
                        want_ref: bool):
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        keep = completion_ids.shape[1]
        batch_size = self.args.per_device_train_batch_size
        old = ref = None
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if want_old:
                old = self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, keep,
                                                              batch_size=batch_size)[0]
            if want_ref:
                if self.ref_model is not None:
                    ref = self._get_per_token_logps_and_entropies(self.ref_model, input_ids, attention_mask, keep,
                                                                  batch_size=batch_size)[0]
                else:  # a PEFT model: the reference is the base (or the "ref" adapter), as in TRL
                    model = self.accelerator.unwrap_model(self.model)
                    with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                        ref = self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, keep,
                                                                      batch_size=batch_size)[0]
        return old, ref
