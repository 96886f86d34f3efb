"""Hugging Face drop-in on tiny random-init MoE models (no downloads)."""
import pytest
import torch

import trainops
from trainops import reference as ref

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

import trainops.integrations.transformers as tr_integration  # noqa: E402
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
        for m in model.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0, 0.5)
    return model.eval()


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
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    assert len(losses) == len(routers) == 2
    assert all(r.forward.__func__ is tr_integration._router_forward for r in routers)
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


def test_class_level_patch_and_revert():
    model = _model("olmoe")
    ids, mask = _batch()
    base = model(input_ids=ids, attention_mask=mask)
    assert apply_global_load_balancing(None, scope="micro_batch") == []
    try:
        out = model(input_ids=ids, attention_mask=mask)  # built before the patch
        fresh = _model("mixtral")  # built after it
        fresh_out = fresh(input_ids=ids, attention_mask=mask)
        routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
        assert all("_trainops_lbl_losses" in r.__dict__ for r in routers)
    finally:
        revert(None)
    torch.testing.assert_close(out.logits, base.logits, rtol=1e-5, atol=1e-5)
    flat = mask.reshape(-1).bool()
    expected = 2 * torch.stack([ref.load_balancing_loss(lg, 2, mask=flat) for lg in base.router_logits]).mean()
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-5, atol=1e-6)
    assert fresh_out.aux_loss is not None
    again = _model("mixtral")(input_ids=ids, attention_mask=mask)
    assert again.router_logits is not None  # HF's own forward is back
    assert all("_trainops_lbl_losses" not in r.__dict__ for r in routers)


def test_bad_patch_targets():
    with pytest.raises(TypeError):
        apply_global_load_balancing("model")
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
