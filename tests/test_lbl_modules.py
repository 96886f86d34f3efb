"""LoadBalancingLoss scopes, accumulation, reset, checkpointing; TopKRouter; MoELayer; metrics."""
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import trainops
from trainops import reference as ref
from trainops.nn import (GlobalCountSync, LoadBalancingLoss, MoELayer, TopKRouter, expert_selection_frequency,
                         register_reset_hook, reset_load_balancing, specialization_score)
from trainops.nn.global_counts import add_unless_recomputing
from trainops.ops import router_topk

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")
E, K = 12, 3


def _logits(T, seed):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 1.5


def _stats(logits, mask=None):
    w, idx, counts, psum = router_topk(logits, K, mask=mask)
    return w, idx, counts, psum


def test_balanced_router_gives_coeff():
    lbl = LoadBalancingLoss(E, K, 0.25, "micro_batch")
    T = 40
    counts = torch.full((E,), K * T // E * 1, dtype=torch.int64)
    loss = lbl(counts, torch.full((E,), T / E), T)
    torch.testing.assert_close(loss, torch.tensor(0.25))


def test_micro_batch_matches_reference_and_grad():
    x = _logits(50, 0).requires_grad_()
    mask = torch.rand(50, generator=torch.Generator().manual_seed(1)) > 0.2
    _, _, counts, psum = _stats(x, mask)
    loss = LoadBalancingLoss(E, K, 0.1, "micro_batch")(counts, psum)
    x2 = x.detach().clone().requires_grad_()
    exp = ref.load_balancing_loss(x2, K, 0.1, mask=mask)
    torch.testing.assert_close(loss, exp)
    loss.backward()
    exp.backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-7)


def test_global_accumulates_over_micro_batches_and_resets():
    lbl = LoadBalancingLoss(E, K, 1.0, "global")
    xs = [_logits(30 + 7 * m, m) for m in range(3)]
    acc_c, acc_t = torch.zeros(E, dtype=torch.int64), 0
    for x in xs:
        _, _, c, p = _stats(x)
        acc_c, acc_t = acc_c + c, acc_t + x.shape[0]
        exp = ref.lbl_from_stats(acc_c, p, acc_t, x.shape[0], K)
        torch.testing.assert_close(lbl(c, p), exp)
    assert torch.equal(lbl.acc_counts, acc_c) and int(lbl.acc_tokens) == acc_t
    reset_load_balancing(torch.nn.ModuleList([lbl]))
    _, _, c, p = _stats(xs[0])
    torch.testing.assert_close(lbl(c, p), LoadBalancingLoss(E, K, 1.0, "micro_batch")(c, p))


def test_reset_hook_after_optimizer_step():
    router = TopKRouter(8, E, K, lbl_coeff=0.01)
    opt = torch.optim.SGD(router.parameters(), lr=0.1)
    register_reset_hook(opt, router)
    _, _, aux = router(torch.randn(10, 8))
    aux.backward()
    assert int(router.lbl.acc_tokens) == 10
    opt.step()
    assert int(router.lbl.acc_tokens) == 0 and int(router.lbl.acc_counts.sum()) == 0


def test_accumulator_checkpoint_roundtrip():
    lbl = LoadBalancingLoss(E, K, 1.0, "global")
    xs = [_logits(20, m) for m in range(3)]
    for x in xs[:2]:
        lbl(*_stats(x)[2:])
    state = copy.deepcopy(lbl.state_dict())
    assert set(state) == {"acc_counts", "acc_tokens"}
    expected = lbl(*_stats(xs[2])[2:])
    fresh = LoadBalancingLoss(E, K, 1.0, "global")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(*_stats(xs[2])[2:]), expected)


def test_combined_scopes():
    c_, p_ = _stats(_logits(40, 3))[2:]
    both = LoadBalancingLoss(E, K, 0.5, {"global": 1.0, "micro_batch": 0.01})(c_, p_)
    g = LoadBalancingLoss(E, K, 0.5, "global")(c_, p_)
    mb = LoadBalancingLoss(E, K, 0.5, "micro_batch")(c_, p_)
    torch.testing.assert_close(both, g + 0.01 * mb)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_sequence_scope_matches_reference(score):
    B, S = 3, 16
    x = _logits(B * S, 4).requires_grad_()
    mask = torch.ones(B * S, dtype=torch.bool)
    mask[S - 5:S] = False
    mask[S:2 * S] = False  # an all-padding sequence is skipped
    w, idx, c, p = router_topk(x, K, mask=mask, score=score)
    loss = LoadBalancingLoss(E, K, 0.3, "sequence")(c, p, logits=x, indices=idx, mask=mask, seq_len=S, score=score)
    x2 = x.detach().clone().requires_grad_()
    exp = ref.sequence_load_balancing_loss(x2, K, S, 0.3, mask=mask, score=score)
    torch.testing.assert_close(loss, exp)
    loss.backward()
    exp.backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_once(reentrant):
    torch.manual_seed(0)
    r1 = TopKRouter(16, E, K, lbl_coeff=0.1, scope="global")
    r2 = copy.deepcopy(r1)
    xs = [torch.randn(24, 16, requires_grad=True) for _ in range(2)]
    for x in xs:
        _, _, aux1 = r1(x)
        aux1.backward()

        def run(h):
            return r2(h)[2]

        aux2 = checkpoint(run, x.detach().clone().requires_grad_(), use_reentrant=reentrant)
        aux2.backward()
        torch.testing.assert_close(aux1, aux2)
    assert torch.equal(r1.lbl.acc_counts, r2.lbl.acc_counts)
    assert int(r2.lbl.acc_tokens) == 48
    torch.testing.assert_close(r1.weight.grad, r2.weight.grad)


def test_global_count_sync_equals_per_module_losses():
    # Two layers (E=12 and E=7), global + micro-batch scopes, three micro-batches: the
    # deferred losses after one sync equal the immediate ones, with the same gradients and
    # accumulated counts; a layer without the global scope is computed at once.
    scope = {"global": 1.0, "micro_batch": 0.01}
    layers = [(E, K, scope), (7, 2, scope), (E, K, "micro_batch")]
    eager = [LoadBalancingLoss(e, k, 0.3, s) for e, k, s in layers]
    batched = copy.deepcopy(eager)
    for m in range(3):
        inputs = [torch.randn(20 + m, e, generator=torch.Generator().manual_seed(10 * m + i)).requires_grad_()
                  for i, (e, _, _) in enumerate(layers)]
        twins = [x.detach().clone().requires_grad_() for x in inputs]
        sync = GlobalCountSync()
        terms = []
        for lbl_e, lbl_b, x, y, (e, k, _) in zip(eager, batched, inputs, twins, layers):
            _, _, c, p = router_topk(x, k)
            lbl_e(c, p).backward()
            _, _, c2, p2 = router_topk(y, k)
            terms.append(lbl_b.deferred(c2, p2, sync=sync))
        assert int(batched[0].acc_tokens) == sum(20 + i for i in range(m))  # nothing added before run()
        with pytest.raises(RuntimeError, match="run"):
            terms[0]()
        sync.run()
        for term, lbl_e, lbl_b, x, y in zip(terms, eager, batched, inputs, twins):
            loss = term()
            loss.backward()
            torch.testing.assert_close(y.grad, x.grad, rtol=1e-6, atol=1e-7)
            assert torch.equal(lbl_b.acc_counts, lbl_e.acc_counts)
            assert int(lbl_b.acc_tokens) == int(lbl_e.acc_tokens)
        assert int(batched[0].acc_tokens) == sum(20 + i for i in range(m + 1))
        with pytest.raises(RuntimeError, match="new GlobalCountSync"):
            sync.add(torch.zeros(E, dtype=torch.long), torch.tensor(1), "cpu")
    for make in (lambda g: LoadBalancingLoss(E, K, 1.0, "global", group=g), GlobalCountSync):
        with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
            make(object())


def test_router_z_loss_and_grad_reach_weight():
    r = TopKRouter(8, E, K, lbl_coeff=0.01, z_loss_coeff=1e-3, scope="micro_batch")
    x = torch.randn(20, 8)
    w, idx, aux = r(x)
    logits = x @ r.weight.detach().T
    exp = ref.load_balancing_loss(logits, K, 0.01) + 1e-3 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(aux, exp)
    aux.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_aux_free_bias_update():
    torch.manual_seed(0)
    r = TopKRouter(8, 4, 1, lbl_coeff=0.0, aux_free_bias=True, bias_update_rate=0.02, renormalize=False)
    with torch.no_grad():
        r.weight.normal_(0, 0.3)
        r.weight[0] += 0.5  # expert 0 is preferred by most tokens
    x = torch.randn(64, 8).abs()
    w0, idx0, _ = r(x)
    load0 = torch.bincount(idx0.flatten(), minlength=4)
    assert torch.equal(r.load, load0) and int(load0.max()) >= 48
    reset_load_balancing(r)
    assert r.expert_bias[0] < 0 and (r.expert_bias[load0 < 16] > 0).all() and int(r.load.sum()) == 0
    for _ in range(60):
        r(x)
        r.update_bias()
    w, idx, _ = r(x)
    assert int(torch.bincount(idx.flatten(), minlength=4).max()) <= 32  # load spread out
    # The bias moves the choice, not the gate value: weights are the raw softmax scores.
    s = torch.softmax(x @ r.weight.detach().T, -1)
    torch.testing.assert_close(w, s.gather(1, idx))


def _dense_moe(layer, x):
    w, idx, _ = layer.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(layer.top_k):
            e = int(idx[t, j])
            g, u = (layer.gate_up[e] @ x[t]).chunk(2)
            out[t] += w[t, j] * (layer.down[e] @ (torch.nn.functional.silu(g) * u))
    return out


def test_moe_layer_matches_dense_loop():
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 6, 2, lbl_coeff=0.01, scope="micro_batch")
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, aux = layer(x)
    torch.testing.assert_close(y.reshape(-1, 16), _dense_moe(layer, x.detach().reshape(-1, 16)), rtol=1e-5, atol=1e-5)
    (y.square().mean() + aux).backward()
    assert x.grad is not None and layer.gate_up.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_specialization_metrics():
    T = 600
    domains = torch.arange(T) % 3
    idx = torch.stack([domains, domains + 3], 1)  # domain d -> experts d and d + 3
    freq = expert_selection_frequency(idx, domains, 6)
    torch.testing.assert_close(freq.sum(1), torch.ones(3, dtype=torch.float64))
    assert freq[1, 1] == 0.5 and freq[1, 0] == 0
    assert specialization_score(idx, domains, 6) == pytest.approx(1.0)
    rand_idx = torch.randint(0, 6, (T, 2), generator=torch.Generator().manual_seed(0))
    assert specialization_score(rand_idx, domains, 6) < 0.05


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="scope"):
        LoadBalancingLoss(E, K, 1.0, "batch")
    with pytest.raises(ValueError, match="top_k"):
        LoadBalancingLoss(E, E + 1, 1.0)
    with pytest.raises(ValueError, match="counts"):
        LoadBalancingLoss(E, K, 1.0)(torch.zeros(E - 1, dtype=torch.long), torch.zeros(E - 1))
    with pytest.raises(ValueError, match="sequence"):
        LoadBalancingLoss(E, K, 1.0, "sequence")(torch.zeros(E, dtype=torch.long), torch.zeros(E))


@pytest.mark.parametrize("aux_free_bias", [False, True])
def test_router_under_torch_compile(aux_free_bias):
    # One graph: the global scope's all-reduce and accumulation and the aux-free load are
    # ops in it; the compiled router gives eager's outputs, gradient and counts.
    torch.manual_seed(0)
    r = TopKRouter(16, 8, 2, lbl_coeff=0.01, scope="global", z_loss_coeff=1e-3, aux_free_bias=aux_free_bias)
    x = torch.randn(32, 16)
    w, idx, aux = r(x)
    aux.backward()
    grad = r.weight.grad.clone()
    load = None if r.expert_bias is None else r.load.clone()
    r.weight.grad = None
    reset_load_balancing(r, update_bias=False)
    if aux_free_bias:
        r.load.zero_()
    w2, idx2, aux2 = torch.compile(r, fullgraph=True)(x)
    aux2.backward()
    assert torch.equal(idx, idx2) and int(r.lbl.acc_tokens) == 32
    torch.testing.assert_close(aux2, aux)
    torch.testing.assert_close(r.weight.grad, grad)
    if aux_free_bias:
        assert torch.equal(r.load, load)
    torch._dynamo.reset()


def test_compiled_router_under_activation_checkpointing():
    # Eager non-reentrant checkpointing around a compiled router recomputes the compiled
    # graph during backward: the counts and the aux-free load are still added once.
    torch.manual_seed(0)
    eager = TopKRouter(16, 8, 2, lbl_coeff=0.1, scope={"global": 1.0, "micro_batch": 0.1}, aux_free_bias=True)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for m in range(3):
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(m))
        aux = eager(x)[2]
        aux.backward()
        aux2 = checkpoint(lambda h: compiled(h)[2], x.clone().requires_grad_(), use_reentrant=False)
        aux2.backward()
        torch.testing.assert_close(aux2, aux)
    assert torch.equal(twin.lbl.acc_counts, eager.lbl.acc_counts) and int(twin.lbl.acc_tokens) == 72
    assert torch.equal(twin.load, eager.load) and int(twin.load.sum()) == 72 * 2
    torch.testing.assert_close(twin.weight.grad, eager.weight.grad)
    torch._dynamo.reset()


def _accumulate_args(lbl, counts, tokens, reduced=None):
    return (lbl.acc_counts, lbl.acc_tokens, lbl._snap_counts, lbl._snap_totals, lbl._snap_len, counts,
            torch.tensor(tokens), reduced, "")


@pytest.mark.parametrize("reduced", [False, True])
def test_accumulate_global_op(reduced):
    lbl = LoadBalancingLoss(E, K, 1.0, "global")
    counts = torch.arange(E)
    given = torch.cat([counts * 3, torch.tensor([21])]) if reduced else None  # as if summed over 3 ranks
    torch.library.opcheck(torch.ops.trainops.lbl_accumulate_global.default,
                          _accumulate_args(lbl, counts, 7, given))
    lbl.reset()
    for m in range(1, 3):
        totals = torch.ops.trainops.lbl_accumulate_global(*_accumulate_args(lbl, counts, 7, given))
        scale = 3 if reduced else 1
        assert totals.tolist() == (counts * scale * m).tolist() + [7 * scale * m]
        assert torch.equal(lbl.acc_counts, counts * scale * m) and int(lbl._snap_len) == m


def test_add_unless_recomputing_op():
    acc = torch.zeros(5, dtype=torch.int64)
    torch.library.opcheck(torch.ops.trainops.add_unless_recomputing.default, (acc, torch.arange(5)))
    add_unless_recomputing(acc, torch.arange(5))
    _InBackward.apply(torch.zeros(1, requires_grad=True),
                      lambda: add_unless_recomputing(acc, torch.arange(5))).sum().backward()
    assert acc.tolist() == list(range(5))  # once: not again in the backward


class _InBackward(torch.autograd.Function):
    """Runs ``fn`` while the autograd engine runs a backward, as a recomputation does."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


def test_recomputed_forward_looks_up_its_original():
    lbl = LoadBalancingLoss(E, K, 1.0, "global")
    first, second = torch.arange(E), torch.ones(E, dtype=torch.long)
    lbl.global_stats(first, 5)
    lbl.global_stats(second, 4)
    seen = {}

    def recompute():
        seen["first"] = lbl.global_stats(first, 5)
        with pytest.raises(RuntimeError, match="no matching original forward"):
            lbl.global_stats(torch.full((E,), 9), 1)

    x = torch.zeros(2, requires_grad=True)
    _InBackward.apply(x, recompute).sum().backward()
    # The first micro-batch's totals, not the current ones; nothing added again.
    assert seen["first"][0].tolist() == first.tolist() and int(seen["first"][1]) == 5
    assert torch.equal(lbl.acc_counts, first + second) and int(lbl.acc_tokens) == 9


def test_recomputation_finds_the_last_64_forwards():
    from trainops.nn.global_counts import SNAPSHOTS

    lbl = LoadBalancingLoss(E, K, 1.0, "global")
    batches = [torch.full((E,), m) for m in range(SNAPSHOTS + 6)]  # the ring wraps around
    for c in batches:
        lbl.global_stats(c, 1)
    found = {}

    def recompute():
        for m in (6, 40, SNAPSHOTS + 5):
            found[m] = lbl.global_stats(batches[m], 1)
        with pytest.raises(RuntimeError, match="no matching original forward"):
            lbl.global_stats(batches[5], 1)  # older than the last 64

    _InBackward.apply(torch.zeros(1, requires_grad=True), recompute).sum().backward()
    for m, (counts, tokens) in found.items():
        assert counts.tolist() == [sum(range(m + 1))] * E and int(tokens) == m + 1
