"""The Hugging Face drop-in under ``transformers.Trainer`` with default arguments (tiny
random-init MoE models, no downloads): the aux loss of every micro-batch equals the
global-batch reference built from the router logits of the optimizer step's micro-batches,
the callback resets the counts per optimizer step and logs the aux loss and the load
balance. ``run_trainer`` and ``reference`` also serve test_hf_trainer_distributed."""
import json
import math
import os

import pytest
import torch

import trainops
from trainops import reference as ref

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

GA, STEPS, BATCH, SEQ = 2, 2, 2, 10


class _Rows(torch.utils.data.Dataset):
    """Token rows with padding; ``length`` is a column the model's forward does not take
    (Trainer drops it by the forward's signature, or the forward would fail on it)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            ids = torch.randint(0, 64, (SEQ,), generator=g)
            length = SEQ - int(torch.randint(0, 5, (), generator=g))
            mask = (torch.arange(SEQ) < length).long()
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                              "length": length})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class _Recorder:
    """Forward hooks: per training forward (not the recomputation of checkpointed layers),
    the padding mask, every router's logits and the returned aux loss."""

    def __init__(self, model, routers):
        from trainops.nn.global_counts import in_backward

        self.forwards = []
        self._in_backward = in_backward
        model.register_forward_pre_hook(self._begin, with_kwargs=True)
        model.register_forward_hook(self._end, with_kwargs=True)
        for r in routers:
            r.register_forward_hook(self._router)

    def _live(self, module):
        return module.training and not self._in_backward()

    def _begin(self, module, args, kwargs):
        if self._live(module):
            self.forwards.append({"mask": kwargs["attention_mask"].reshape(-1).tolist(), "logits": []})

    def _router(self, module, args, out):
        if self._live(module):
            logits = out[0] if isinstance(out, tuple) else out
            self.forwards[-1]["logits"].append(logits.detach().float().tolist())

    def _end(self, module, args, kwargs, out):
        if self._live(module):
            self.forwards[-1]["aux"] = float(out.aux_loss.detach())
            self.forwards[-1]["loss"] = float(out.loss.detach())


def run_trainer(kind, out_dir, *, checkpointing, seed=0, lora=False):
    """Train a tiny patched ``kind`` model with Trainer for STEPS optimizer steps of GA
    micro-batches; returns (recorded forwards, log_history, K). Default arguments except
    the output dir, max_steps, batch size, GA, checkpointing, report_to, use_cpu and
    logging every step. ``lora``: the patched model goes to Trainer inside a PEFT LoRA
    model (Trainer then reads the signature of the base model's forward)."""
    from test_hf_lbl import _model, _routers

    from trainops.integrations.transformers import GlobalLoadBalancingCallback, apply_global_load_balancing

    model = _model(kind).train()
    model.config.output_router_logits = False  # HF's default: the patch must not need it
    apply_global_load_balancing(model)  # scope="global"
    recorder = _Recorder(model, _routers(model))
    trained = model
    if lora:
        peft = pytest.importorskip("peft")
        trained = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    fields = transformers.TrainingArguments.__dataclass_fields__
    if "activation_checkpointing" in fields:  # transformers >= 5.x: non-reentrant by default
        ckpt = {"activation_checkpointing": checkpointing}
    else:  # 4.x: reentrant by default, which the patch refuses
        ckpt = {"gradient_checkpointing": checkpointing, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=seed, **ckpt)
    trainer = transformers.Trainer(model=trained, args=args, train_dataset=_Rows(BATCH * GA * STEPS * 2, seed),
                                   callbacks=[GlobalLoadBalancingCallback()])
    trainer.train()
    losses = [lbl for r in _routers(model) for lbl in r._trainops_lbl_losses]
    assert all(int(lbl.acc_tokens) == 0 for lbl in losses)  # reset at the end of the last step
    logs = [h for h in trainer.state.log_history if "aux_loss" in h]
    return recorder.forwards, logs, model.config.num_experts_per_tok


def reference(per_rank, K, reset=True):
    """(``reset=False``: counts never reset, to show that the run's values differ.) Per rank and forward, the expected aux loss (HF convention, global scope: f from the
    counts of all ranks' micro-batches of the optimizer step so far, P local), and per step
    the expected logs (aux mean over ranks and micro-batches, load max/mean and CV)."""
    world, n = len(per_rank), len(per_rank[0])
    assert n == GA * STEPS and all(len(f) == n for f in per_rank)
    expected = [[None] * n for _ in range(world)]
    steps = []
    acc, tokens = None, 0
    for s in range(STEPS):
        if reset:
            acc, tokens = None, 0
        for m in range(s * GA, (s + 1) * GA):
            stats = []
            for rank in range(world):
                fw = per_rank[rank][m]
                mask = torch.tensor(fw["mask"], dtype=torch.bool)
                layers = [ref.router_topk(torch.tensor(lg), K, mask=mask)[2:] for lg in fw["logits"]]
                stats.append((layers, int(mask.sum())))
            counts = torch.stack([torch.stack([c for c, _ in layers]) for layers, _ in stats]).sum(0)
            acc = counts if acc is None else acc + counts
            tokens += sum(t for _, t in stats)
            for rank, (layers, n_local) in enumerate(stats):
                expected[rank][m] = K * torch.stack([ref.lbl_from_stats(acc[i], p, tokens, n_local, K)
                                                     for i, (_, p) in enumerate(layers)]).mean()
        loads = acc.double()
        mean = loads.mean(1)
        steps.append({"aux_loss": float(torch.stack([expected[r][m] for r in range(world)
                                                     for m in range(s * GA, (s + 1) * GA)]).mean()),
                      "expert_load_max_over_mean": float((loads.max(1).values / mean).mean()),
                      "expert_load_cv": float((loads.std(1, unbiased=False) / mean).mean())})
    return expected, steps


def check(per_rank, logs, K):
    expected, steps = reference(per_rank, K)
    for rank, forwards in enumerate(per_rank):
        for m, fw in enumerate(forwards):
            assert math.isclose(fw["aux"], float(expected[rank][m]), rel_tol=1e-5, abs_tol=1e-6), (rank, m)
    assert len(logs) == STEPS
    for log, want in zip(logs, steps):
        for key, value in want.items():
            assert math.isclose(log[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, log[key], value)
    # Trainer's logged loss of a step is world × the sum over micro-batches of the rank-mean
    # model loss (it scales the whole loss, aux term included, for its token-normalized LM
    # loss): the aux term weighs GA × world × coef (docs/load_balancing_conventions.md).
    world = len(per_rank)
    for s, log in enumerate(logs):
        micro = range(s * GA, (s + 1) * GA)
        total = world * sum(sum(per_rank[r][m]["loss"] for r in range(world)) / world for m in micro)
        assert math.isclose(log["loss"], total, rel_tol=1e-4), (log["loss"], total)
    # Without the per-step reset, the second step's values would differ.
    stale, _ = reference(per_rank, K, reset=False)
    assert all(abs(per_rank[0][m]["aux"] - float(stale[0][m])) > 1e-5 for m in range(GA, 2 * GA))


# Qwen3-MoE with checkpointing runs on 2 ranks in test_hf_trainer_distributed.
@pytest.mark.parametrize("kind, checkpointing, lora", [("qwen2_moe", True, False), ("qwen3_moe", False, False),
                                                       ("mixtral", False, False), ("mixtral", True, True)])
def test_trainer_with_default_arguments(kind, checkpointing, lora, tmp_path):
    forwards, logs, K = run_trainer(kind, str(tmp_path), checkpointing=checkpointing, lora=lora)
    check([forwards], logs, K)


def test_callback_needs_a_patched_model_and_can_go_first(tmp_path):
    from test_hf_lbl import _model

    from trainops.integrations.transformers import add_global_load_balancing_callback

    model = _model("mixtral")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(4, 0))
    callback = add_global_load_balancing_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is callback  # ahead of any report_to integration
    with pytest.raises(ValueError, match="apply_global_load_balancing"):
        callback.on_train_begin(args, trainer.state, trainer.control, model=model)


if __name__ == "__main__":  # a rank of test_hf_trainer_distributed, under torchrun
    import sys

    forwards, logs, K = run_trainer("qwen3_moe", sys.argv[1], checkpointing=True)
    with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"forwards": forwards, "logs": logs, "K": K}, f)
