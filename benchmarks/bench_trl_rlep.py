"""Step time of trl.GRPOTrainer with RLEP on (trainops.integrations.trl) against RLEP off, on CPU.

Two trainers on the same tiny Llama (character-level tokenizer built offline, a verifiable
digit-parity reward) in one process: ``RLEPGRPOTrainer`` with ``replay_per_group=0`` (stock
``GRPOTrainer``) and with ``replay_per_group=M``. Each round runs ``--steps`` optimizer steps of
each trainer, alternating which goes first; a step's time is from the trainer's step-begin to
step-end callback (generation, rewards, the replay mix, forward, backward, optimizer), the first
step of every round left out. The replay mix (``_mix_replay``: hashing the prompts, the pool draw
and insert, the batch rebuild, advantages over G+M) is also timed on its own. A step with RLEP on
also trains on the replayed rows (up to M per G fresh ones): that is RLEP's cost, not overhead.

    python benchmarks/bench_trl_rlep.py                  # 4 prompts x G=8, M=2, 6 rounds x 4 steps
    python benchmarks/bench_trl_rlep.py --hidden 128 --layers 4 --completion-length 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Table, timing_of  # noqa: E402


def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("0123456789+=")}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def tiny_model(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=14, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                                        bos_token_id=None))


def parity(prompts, completions, answer, **kwargs):
    return [float(c[:1].isdigit() and int(c[0]) % 2 == int(a) % 2) for c, a in zip(completions, answer)]


class StepTimes:
    """A TrainerCallback that records each optimizer step's wall time."""

    def __init__(self):
        from transformers import TrainerCallback

        times = self.times = []

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t0)

        self.callback = _Callback()


def build(m: int, a, out: str):
    from datasets import Dataset

    from trainops.integrations.trl import RLEPConfig, RLEPGRPOTrainer

    prompts = [f"{i}+{j}=" for i, j in ((1, 2), (2, 2), (3, 4), (5, 1), (6, 3), (7, 7), (8, 1), (9, 4))][:a.prompts]
    data = Dataset.from_dict({"prompt": prompts, "answer": [str(sum(map(int, p[:-1].split("+")))) for p in prompts]})
    cfg = RLEPConfig(output_dir=out, per_device_train_batch_size=a.prompts * a.generations,
                     num_generations=a.generations, max_completion_length=a.completion_length, max_steps=a.steps + 1,
                     learning_rate=1e-3, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                     seed=0, disable_tqdm=True, dataloader_num_workers=0, replay_per_group=m)
    steps = StepTimes()
    trainer = RLEPGRPOTrainer(model=tiny_model(a.hidden, a.layers), reward_funcs=parity, args=cfg,
                              train_dataset=data, processing_class=tokenizer(), callbacks=[steps.callback])
    mix = []
    if m:
        inner = trainer._mix_replay

        def timed_mix(*args, **kw):
            t0 = time.perf_counter()
            out = inner(*args, **kw)
            mix.append((time.perf_counter() - t0, float(trainer.last_replay_step.is_replay.float().mean())))
            return out

        trainer._mix_replay = timed_mix
    return trainer, steps, mix


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8, help="G")
    p.add_argument("--replay", type=int, default=2, help="M")
    p.add_argument("--completion-length", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and trainer")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"RLEP off": build(0, a, os.path.join(tmp, "off")), f"RLEP on (M={a.replay})":
                build(a.replay, a, os.path.join(tmp, "on"))}
        names = list(arms)
        for r in range(a.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                trainer, steps, _ = arms[name]
                before = len(steps.times)
                trainer.train()
                del steps.times[before]  # the round's first step: warm-up
        on_trainer, _, mix = arms[names[1]]
    case = {"prompts": a.prompts, "G": a.generations, "M": a.replay, "completion": a.completion_length,
            "hidden": a.hidden, "layers": a.layers, "steps": a.rounds * a.steps}
    table = Table("trl.GRPOTrainer step time, RLEP on vs off (CPU)", "cpu")
    off, on = (timing_of(arms[n][1].times) for n in names)
    table.add(case, names[0], off)
    table.add(case, names[1], on, baseline=names[0], ratio_on_off=round(on.median_s / off.median_s, 3),
              mix_ms=round(statistics.median(t for t, _ in mix) * 1e3, 3),
              replayed_fraction=round(statistics.mean(f for _, f in mix), 3),
              pool=len(on_trainer.replay_buffer))
    table.report("trl_rlep_cpu.csv")


if __name__ == "__main__":
    main()
