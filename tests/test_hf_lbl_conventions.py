"""The scaling conventions of docs/load_balancing_conventions.md, checked on numbers:
Hugging Face's ``load_balancing_loss_func`` against trainops on the same router logits,
and Megatron-Core's switch / global aux-loss formulas (written out in plain PyTorch from
their definition) against trainops' per-rank global loss."""
import importlib

import pytest
import torch

import trainops
from trainops import reference as ref

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")

E, K, B, S = 6, 2, 3, 8


def _logits(seed, layers=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B * S, E, generator=g) * 1.5 for _ in range(layers)]


def _mask():
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return mask


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_hf_is_k_times_trainops_per_layer_and_pools_layers(family):
    hf = importlib.import_module(f"transformers.models.{family}.modeling_{family}").load_balancing_loss_func
    mask = _mask()
    flat = mask.reshape(-1).bool()
    (one,) = _logits(0)
    # One layer: HF's value is K × trainops' (HF's f lacks the 1/K), with padding excluded.
    trainops_layer = ref.load_balancing_loss(one, K, mask=flat)
    _, _, counts, prob_sum = trainops.ops.router_topk(one, K, mask=flat)
    module = trainops.nn.LoadBalancingLoss(E, K, 1.0, scope="micro_batch")(counts, prob_sum)
    torch.testing.assert_close(module, trainops_layer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hf((one,), E, K, mask), K * trainops_layer, rtol=1e-5, atol=1e-6)
    # Several layers: HF pools them (counts and probabilities summed over layers before the
    # product), which is one LBL over all layers' rows, not the mean of per-layer LBLs.
    layers = _logits(1, layers=3)
    pooled = ref.load_balancing_loss(torch.cat(layers), K, mask=flat.repeat(3))
    per_layer = torch.stack([ref.load_balancing_loss(lg, K, mask=flat) for lg in layers]).mean()
    torch.testing.assert_close(hf(tuple(layers), E, K, mask), K * pooled, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(pooled, per_layer, rtol=1e-3)
    # Uniform router probabilities (balanced in expectation): HF gives K, trainops 1.
    uniform = torch.zeros(E * 10, E)
    assert float(ref.load_balancing_loss(uniform, K)) == pytest.approx(1.0)
    assert float(hf((uniform,), E, K, None)) == pytest.approx(K)


def _megatron_switch(probs, tokens_per_expert, total_tokens, coeff):
    """Megatron-Core's switch load-balancing loss, from its definition:
    coeff · E / (K · T²) · Σ_i tokens_i · Σ_tokens p_i, with T the tokens behind tokens_i."""
    return coeff * E / (K * total_tokens * total_tokens) * (probs.sum(0) * tokens_per_expert).sum()


def test_megatron_global_aux_loss_per_rank_is_trainops_over_dp_size():
    # N data-parallel ranks, M micro-batches, no padding. Megatron's global aux loss of rank r,
    # micro-batch m: counts all-reduced over the DP group and averaged over the micro-batches
    # so far, T = this micro-batch's tokens over the group, probabilities local. trainops:
    # counts accumulated over group and micro-batches over their tokens, P over local tokens.
    N, M, coeff = 4, 3, 0.01
    logits = [[_logits(100 * r + m)[0] for m in range(M)] for r in range(N)]
    acc_counts, acc_tokens = torch.zeros(E), 0
    for m in range(M):
        stats = [ref.router_topk(logits[r][m], K) for r in range(N)]
        group_counts = sum(s[2] for s in stats).float()
        acc_counts += group_counts
        acc_tokens += N * B * S
        for r in range(N):
            probs = torch.softmax(logits[r][m], -1)
            megatron = _megatron_switch(probs, acc_counts / (m + 1), N * B * S, coeff)
            lbl = trainops.nn.LoadBalancingLoss(E, K, coeff, scope="micro_batch")
            ours = ref.lbl_from_stats(acc_counts, stats[r][3], acc_tokens, B * S, K, coeff)
            torch.testing.assert_close(megatron * N, ours, rtol=1e-5, atol=1e-7)
            # Megatron's micro-batch aux loss (counts over the local tokens only) is trainops'
            # micro_batch scope with the same coefficient.
            local = _megatron_switch(probs, stats[r][2].float(), B * S, coeff)
            torch.testing.assert_close(local, lbl(stats[r][2], stats[r][3]), rtol=1e-5, atol=1e-7)
