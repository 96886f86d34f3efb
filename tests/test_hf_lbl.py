"""Hugging Face drop-in on tiny random-init MoE models (no downloads)."""
import copy
import inspect
import os

import pytest
import torch

import trainops
from trainops import reference as ref

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

import trainops.integrations.transformers as tr_integration  # noqa: E402
from trainops.integrations import _hf_forwards, _hf_lbl_state  # noqa: E402
from trainops.integrations.transformers import apply_global_load_balancing, revert  # noqa: E402
from trainops.nn import reset_load_balancing  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=32, max_position_embeddings=64, num_experts_per_tok=2, output_router_logits=True,
              router_aux_loss_coef=0.02)


def _model(kind):
    if kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                          norm_topk_prob=False, **COMMON)
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=6, moe_intermediate_size=16, norm_topk_prob=True,
                                          head_dim=8, **COMMON)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=6, **COMMON)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.OlmoeConfig(num_experts=6, **COMMON)
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():  # routers may be zero-initialised: give them distinct logits
        for m in _routers(model):
            (m.gate if hasattr(m, "gate") else m).weight.normal_(0, 0.5)
    return model.eval()


def _routers(model):
    """The modules the drop-in patches: top-k routers (transformers >= 5) or sparse MoE
    blocks (4.x)."""
    return tr_integration._router_modules(model)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_patched_model_matches_and_aux_is_reference(kind):
    model = _model(kind)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    base = model(input_ids=ids, attention_mask=mask, labels=labels)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    losses = apply_global_load_balancing(model, scope="micro_batch")
    routers = _routers(model)
    assert len(losses) == len(routers) == 2
    fused = (_hf_forwards._router_forward, _hf_forwards._sparse_block_forward)
    assert all(r.forward.__trainops_impl__ in fused for r in routers)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, base.logits, rtol=1e-5, atol=1e-5)
    flat = mask.reshape(-1).bool()
    k = model.config.num_experts_per_tok
    per_layer = [ref.load_balancing_loss(lg, k, mask=flat) for lg in base.router_logits]
    expected = k * torch.stack(per_layer).mean()  # HF's factor K, per-layer average
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-5, atol=1e-6)
    lm = base.loss - model.router_aux_loss_coef * base.aux_loss
    torch.testing.assert_close(out.loss, lm + model.router_aux_loss_coef * expected, rtol=1e-5, atol=1e-5)
    assert out.keys() and all(torch.equal(v, model.state_dict()[k2]) for k2, v in sd.items())
    out.loss.backward()
    revert(model)
    assert all("forward" not in r.__dict__ for r in routers)
    again = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(again.aux_loss, base.aux_loss)


def _trainops_breaks(explanation) -> list:
    """The graph breaks of a torch._dynamo.explain result that arise in trainops' code."""
    return [b.reason for b in explanation.break_reasons
            if any(os.sep + "trainops" + os.sep in frame.filename for frame in b.user_stack)]


def _micro_batches(n):
    g = torch.Generator().manual_seed(3)
    out = []
    for m in range(n):
        ids = torch.randint(0, 64, (3, 10), generator=g)
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 6 + m:] = 0
        out.append((ids, mask, ids.masked_fill(mask == 0, -100)))
    return out


def _assert_same_training(model_a, run_a, model_b, run_b, losses_a, losses_b, micro_batches=2):
    """Two patched copies of a model give the same loss, aux loss, gradients and global
    counts over ``micro_batches`` forward-backward passes (run_x: the callable to run)."""
    for ids, mask, labels in _micro_batches(micro_batches):
        out_a = run_a(input_ids=ids, attention_mask=mask, labels=labels)
        out_b = run_b(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out_b.aux_loss, out_a.aux_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-5, atol=1e-5)
        out_a.loss.backward()
        out_b.loss.backward()
        for la, lb in zip(losses_a, losses_b):
            assert torch.equal(la.acc_counts, lb.acc_counts) and torch.equal(la.acc_tokens, lb.acc_tokens)
    _assert_same_grads(model_a, model_b)


def _assert_same_grads(model_a, model_b):
    grads = {n: p.grad for n, p in model_a.named_parameters() if p.grad is not None}
    assert grads and all(torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-5)
                         for n, p in model_b.named_parameters() if n in grads)


SCOPES = [{"micro_batch": 1.0, "sequence": 0.5}, {"global": 1.0, "micro_batch": 0.01}]


@pytest.mark.parametrize("scope", SCOPES, ids=["micro_batch+sequence", "global+micro_batch"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_patched_model_under_torch_compile(kind, scope):
    # The drop-in adds no graph break of its own (whatever the installed transformers'
    # model code does), the global scope's all-reduce and accumulation included, and the
    # compiled model gives the eager losses, gradients and accumulated counts.
    model = _model(kind).train()
    twin = copy.deepcopy(model)
    losses = apply_global_load_balancing(model, scope=scope, batch_all_reduce=True)
    twin_losses = apply_global_load_balancing(twin, scope=scope, batch_all_reduce=True)
    for m in (model, twin):  # what GlobalLoadBalancingCallback turns on: traced as well
        m._trainops_lbl_patch["state"].recording = True
    ids, mask = _batch()
    explanation = torch._dynamo.explain(twin)(input_ids=ids, attention_mask=mask, labels=ids)
    reset_load_balancing(twin)
    twin._trainops_lbl_patch["state"].take_metrics()
    if not tr_integration._is_sparse_block(_routers(model)[0]):
        # transformers >= 5. In 4.x the replaced block keeps HF's expert loop over the
        # experts that got tokens, data-dependent and a graph break in HF's code as well.
        assert _trainops_breaks(explanation) == []
        assert explanation.graph_count == 1
    torch._dynamo.reset()
    # aot_eager: the traced graph, the ops' fake kernels and their autograd, without
    # inductor's C++ compile time (test_lbl_modules compiles the router with inductor).
    compiled = torch.compile(twin, backend="aot_eager")
    _assert_same_training(model, model, twin, compiled, losses, twin_losses)
    (aux_a, n_a, loads_a), (aux_b, n_b, loads_b) = (m._trainops_lbl_patch["state"].take_metrics()
                                                    for m in (model, twin))
    assert n_a == n_b == 2 and torch.equal(loads_b, loads_a)
    torch.testing.assert_close(aux_b, aux_a, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("scope", SCOPES, ids=["micro_batch+sequence", "global+micro_batch"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_gradient_checkpointing(kind, scope, batched):
    # Non-reentrant checkpointing recomputes each layer in backward, after the forward has
    # returned: the recomputed routers repeat their loss ops (checkpointing matches saved
    # tensors one by one) without adding the global counts again.
    model = _model(kind).train()
    twin = copy.deepcopy(model)
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses = apply_global_load_balancing(model, scope=scope, batch_all_reduce=batched)
    twin_losses = apply_global_load_balancing(twin, scope=scope, batch_all_reduce=batched)
    _assert_same_training(model, model, twin, twin, losses, twin_losses, micro_batches=3)


@pytest.mark.parametrize("scope", SCOPES, ids=["micro_batch+sequence", "global+micro_batch"])
def test_gradient_checkpointing_pipelined(scope):
    # Micro-batches with different padding run forward, forward, then backward in forward
    # order (a pipeline schedule): each recomputed layer uses its own forward's mask, found
    # through its aux loss, not the latest forward's. Compared with sequential, unchecked.
    model = _model("qwen3_moe").train()
    twin = copy.deepcopy(model)
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses = apply_global_load_balancing(model, scope=scope)
    twin_losses = apply_global_load_balancing(twin, scope=scope)
    batches = _micro_batches(3)
    for ids, mask, labels in batches:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    outs = [twin(input_ids=ids, attention_mask=mask, labels=labels) for ids, mask, labels in batches]
    for out in outs:
        out.loss.backward()
    for la, lb in zip(losses, twin_losses):
        assert torch.equal(la.acc_counts, lb.acc_counts)
    _assert_same_grads(model, twin)


def test_reentrant_checkpointing_is_refused():
    # Reentrant checkpointing runs the layers without gradients: the load-balancing loss
    # would silently get none (HF's own aux loss has no gradient there).
    model = _model("qwen3_moe").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    apply_global_load_balancing(model, scope="micro_batch")
    ids, mask = _batch()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    with torch.no_grad():  # evaluation without gradients is fine
        model(input_ids=ids, attention_mask=mask, labels=ids)


@pytest.mark.parametrize("check_finite", [True, False])
def test_non_finite_router_logits(check_finite):
    model = _model("mixtral")
    ids, mask = _batch()
    apply_global_load_balancing(model, scope="micro_batch", check_finite=check_finite)
    router = _routers(model)[0]
    with torch.no_grad():
        (router.gate if hasattr(router, "gate") else router).weight[3, 0] = float("nan")
    if check_finite:
        with pytest.raises(ValueError, match="NaN or Inf"):
            model(input_ids=ids, attention_mask=mask)
    else:  # routed without the check: the NaN shows in the aux loss
        assert torch.isnan(model(input_ids=ids, attention_mask=mask).aux_loss)
    revert(model)
    assert "_trainops_check_finite" not in router.__dict__


def test_global_scope_accumulates_and_resets():
    model = _model("qwen3_moe")
    ids, mask = _batch()
    losses = apply_global_load_balancing(model, scope={"global": 1.0, "micro_batch": 0.01})
    assert len(losses) == model.config.num_hidden_layers
    model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=mask)
    assert all(int(lbl.acc_tokens) == 2 * int(mask.sum()) for lbl in losses)
    reset_load_balancing(model)
    assert all(int(lbl.acc_tokens) == 0 for lbl in losses)
    # No aux loss requested: routers route but nothing accumulates.
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=False)
    assert out.aux_loss is None and all(int(lbl.acc_tokens) == 0 for lbl in losses)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_bf16_model_and_generate(kind):
    # A bf16 model: the same logits up to bf16 rounding (the gate weights are fp32 in both),
    # an fp32 aux loss with a gradient, and greedy generation with the KV cache (one token a
    # step, no mask of that length; aux loss on) gives the unpatched model's tokens.
    model = _model(kind).to(torch.bfloat16)
    ids, mask = _batch()
    base = model(input_ids=ids, attention_mask=mask)
    # (transformers 4.x's own aux loss fails in generate: its mask no longer fits the tokens)
    tokens = model.generate(ids[:1], max_new_tokens=5, do_sample=False, output_router_logits=False)
    apply_global_load_balancing(model, scope={"global": 1.0, "micro_batch": 0.01})
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, base.logits, rtol=0, atol=2 ** -6)
    assert out.aux_loss.dtype == torch.float32
    out.loss.backward()
    assert all(r.weight.grad is not None for r in _routers(model) if not hasattr(r, "gate"))
    assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False), tokens)


def test_batched_all_reduce_gives_the_same_losses(monkeypatch):
    # One all-reduce per forward for all layers (no process group here, so none at all):
    # the same aux loss, gradients and accumulated counts as one per layer.
    runs = []
    run = tr_integration.GlobalCountSync.run
    monkeypatch.setattr(tr_integration.GlobalCountSync, "run", lambda self: runs.append(len(self._parts)) or run(self))
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for batched in (False, True):
        model = _model("qwen3_moe").train()
        losses = apply_global_load_balancing(model, scope={"global": 1.0, "micro_batch": 0.01},
                                             batch_all_reduce=batched)
        auxes = []
        for _ in range(2):  # two micro-batches: the second uses the counts of both
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            auxes.append(out.aux_loss.detach())
        router = _routers(model)[0]
        grad = (router.gate if hasattr(router, "gate") else router).weight.grad.clone()
        results.append((auxes, grad, [lbl.acc_counts.clone() for lbl in losses]))
    (aux_a, grad_a, acc_a), (aux_b, grad_b, acc_b) = results
    torch.testing.assert_close(torch.stack(aux_b), torch.stack(aux_a), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(acc_a, acc_b))
    assert all(int(c.sum()) == 2 * 2 * int(mask.sum()) for c in acc_b)  # K=2 slots per token, 2 forwards
    assert runs == [2, 2]  # one sync per forward, holding both layers


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral"])
def test_patched_forwards_keep_their_signatures(kind):
    # Trainer keeps only the dataset columns the forward's signature names (with
    # (*args, **kwargs) it dropped them all); accelerate and PEFT read it too.
    model = _model(kind)
    routers = _routers(model)
    before = [inspect.signature(m.forward) for m in (model, *routers)]
    apply_global_load_balancing(model)
    assert [inspect.signature(m.forward) for m in (model, *routers)] == before
    assert "input_ids" in inspect.signature(model.forward).parameters
    twin = copy.deepcopy(model)  # the copy's forwards are bound to the copy
    assert twin.forward.__self__ is twin and _routers(twin)[0].forward.__self__ is _routers(twin)[0]
    ids, mask = _batch()
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss,
                               model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss)


def test_training_mode_computes_the_aux_loss_without_the_config_flag():
    model = _model("qwen3_moe")
    model.config.output_router_logits = False  # HF's default: HF computes no aux loss then
    apply_global_load_balancing(model, scope="micro_batch")
    ids, mask = _batch()
    assert model(input_ids=ids, attention_mask=mask).aux_loss is None  # eval mode: as in HF
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert model(input_ids=ids, attention_mask=mask, output_router_logits=False).aux_loss is None


def test_bad_patch_targets():
    with pytest.raises(TypeError, match="model must be"):
        apply_global_load_balancing("model")
    with pytest.raises(TypeError, match="model must be"):
        apply_global_load_balancing(None)  # no class-level patch: the instance is patched
    with pytest.raises(ValueError, match="not patched"):
        revert(None)
    with pytest.raises(ValueError, match="not supported"):
        apply_global_load_balancing(torch.nn.Linear(2, 2))
    model = _model("mixtral")
    apply_global_load_balancing(model)
    with pytest.raises(RuntimeError, match="already patched"):
        apply_global_load_balancing(model)
    revert(model)
    with pytest.raises(ValueError, match="not patched"):
        revert(model)


class _Expert(torch.nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.up, self.down = torch.nn.Linear(hidden, inner, bias=False), torch.nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


class Qwen2MoeSparseMoeBlock(torch.nn.Module):
    """transformers 4.x's sparse MoE block, as that version computes it (routing inline:
    fp32 softmax, top-k, optional renormalization; dropless experts; gated shared
    expert), so the 4.x path of the drop-in runs in CI, whatever transformers is installed.
    Named like the HF class: the drop-in finds blocks by class name."""

    def __init__(self, hidden=12, num_experts=5, top_k=2, norm_topk_prob=False, jitter_noise=0.0):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.jitter_noise = jitter_noise
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.ModuleList([_Expert(hidden, 7) for _ in range(num_experts)])
        self.shared_expert = _Expert(hidden, 6)
        self.shared_expert_gate = torch.nn.Linear(hidden, 1, bias=False)

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1 - self.jitter_noise,
                                                                                     1 + self.jitter_noise)
        x = hidden_states.reshape(-1, h)
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(idx == e)
            if token.numel():
                out.index_add_(0, token, self.experts[e](x[token]) * w[token, slot, None])
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(b, s, h), logits


@pytest.mark.parametrize("norm_topk_prob,training", [(False, False), (True, False), (True, True)])
def test_transformers4_sparse_block_path(norm_topk_prob, training):
    torch.manual_seed(0)
    block = Qwen2MoeSparseMoeBlock(norm_topk_prob=norm_topk_prob, jitter_noise=0.1).train(training)
    hidden = torch.randn(3, 7, 12)
    torch.manual_seed(5)
    base_out, base_logits = block(hidden.clone())
    assert tr_integration._router_modules(torch.nn.Sequential(block)) == [block]
    state = _hf_lbl_state._ModelState()
    lbl = tr_integration._patch_router(block, "micro_batch", None, state)
    assert block.forward.__trainops_impl__ is _hf_forwards._sparse_block_forward
    torch.manual_seed(5)  # the same jitter draw
    coll = state.collector = _hf_lbl_state._Collector(None, 7)
    x = hidden.clone().requires_grad_()
    out, logits = block(x)
    torch.testing.assert_close(logits, base_logits)
    torch.testing.assert_close(out, base_out, rtol=1e-5, atol=1e-6)
    # The layer's LBL term from the fused statistics equals the reference on the same logits.
    assert len(coll.terms) == 1 and lbl.scopes == {"micro_batch": 1.0}
    torch.testing.assert_close(coll.terms[0], ref.load_balancing_loss(logits.detach(), 2), rtol=1e-5, atol=1e-6)
    (out.sum() + coll.terms[0]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
