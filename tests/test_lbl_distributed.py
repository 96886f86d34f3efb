"""Global-scope LoadBalancingLoss across real gloo processes equals the single-process
computation over the concatenated global batch (micro-batch m uses counts of 1..m)."""
import pytest
import torch

import trainops
from trainops import reference as ref
from trainops.distributed.launch import spawn

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")
E, K, T, M, COEFF = 10, 2, 24, 3, 0.5


def _global_logits(world, seed=0):
    return torch.randn(M, world, T, E, generator=torch.Generator().manual_seed(seed)) * 2


def _masks(world):
    g = torch.Generator().manual_seed(9)
    return torch.rand(M, world, T, generator=g) > 0.25


def _worker(rank, world, use_mask, compiled=False):
    import torch.distributed as dist

    from trainops.nn import LoadBalancingLoss
    from trainops.ops import router_topk

    logits = _global_logits(world)
    masks = _masks(world) if use_mask else None
    # Compiled: over a group of its own (found again by name inside the op), and in one graph.
    group = dist.new_group(list(range(world))) if compiled else None
    lbl = LoadBalancingLoss(E, K, COEFF, "global", group=group)

    def step(x, mask):
        _, _, counts, psum = router_topk(x, K, mask=mask)
        return lbl(counts, psum)

    if compiled:
        step = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = []
    for m in range(M):
        x = logits[m, rank].clone().requires_grad_()
        mask = None if masks is None else masks[m, rank]
        loss = step(x, mask)
        loss.backward()
        # Plain Python values: tensors returned through the result queue share storage by
        # file descriptor, which races with the worker's exit.
        out.append((loss.item(), x.grad.tolist(), lbl.acc_counts.tolist(), int(lbl.acc_tokens)))
    return out


def _t(v):
    return torch.tensor(v, dtype=torch.int64 if isinstance(v, list) and v and isinstance(v[0], int) else torch.float32)


@pytest.mark.parametrize("compiled", [False, True])
def test_global_scope_two_ranks_three_micro_batches(compiled):
    world = 2
    results = spawn(_worker, world, False, compiled)
    logits = _global_logits(world)
    acc = torch.zeros(E, dtype=torch.int64)
    for m in range(M):
        xg = logits[m].reshape(world * T, E).clone().requires_grad_()
        _, _, counts, psum = ref.router_topk(xg, K)
        acc = acc + counts
        single = ref.lbl_from_stats(acc, psum, (m + 1) * world * T, world * T, K, COEFF)
        single.backward()
        # Mean over ranks of the rank losses = the global-batch loss (equal token counts);
        # DDP's gradient average gives the global-batch gradient.
        torch.testing.assert_close(torch.tensor(sum(r[m][0] for r in results) / world), single.detach(),
                                   rtol=1e-5, atol=1e-6)
        grads = torch.cat([_t(r[m][1]) for r in results]) / world
        torch.testing.assert_close(grads, xg.grad, rtol=1e-4, atol=1e-7)
        for r in results:
            assert r[m][2] == acc.tolist() and r[m][3] == (m + 1) * world * T


def test_global_scope_three_ranks_with_padding():
    world = 3
    results = spawn(_worker, world, True)
    logits, masks = _global_logits(world), _masks(world)
    acc, tokens = torch.zeros(E, dtype=torch.int64), 0
    for m in range(M):
        stats = [ref.router_topk(logits[m, r], K, mask=masks[m, r]) for r in range(world)]
        acc = acc + sum(s[2] for s in stats)
        tokens += int(masks[m].sum())
        for r in range(world):
            assert results[r][m][2] == acc.tolist() and results[r][m][3] == tokens
            local = ref.lbl_from_stats(acc, stats[r][3], tokens, int(masks[m, r].sum()), K, COEFF)
            torch.testing.assert_close(torch.tensor(results[r][m][0]), local, rtol=1e-5, atol=1e-6)


def _layered_worker(rank, world, batched, compiled=False):
    # Two MoE layers (E=10 and E=6) over three micro-batches, with every all-reduce counted.
    import torch.distributed as dist

    from trainops.nn import GlobalCountSync, LoadBalancingLoss
    from trainops.ops import router_topk

    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(args[0].numel())
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        sizes = (E, 6)
        lbls = [LoadBalancingLoss(e, K, COEFF, {"global": 1.0, "micro_batch": 0.1}) for e in sizes]

        def step(xs):
            sync = GlobalCountSync() if batched else None
            losses = []
            for lbl, x in zip(lbls, xs):
                _, _, counts, psum = router_topk(x, K)
                losses.append(lbl.deferred(counts, psum, sync=sync) if batched else lbl(counts, psum))
            if batched:
                sync.run()
                losses = [term() for term in losses]
            return losses

        if compiled:  # one graph: the batched collective is an op in it
            step = torch.compile(step, backend="aot_eager", fullgraph=True)
        out = []
        for m in range(M):
            g = torch.Generator().manual_seed(100 * m + rank)
            xs = [(torch.randn(T, e, generator=g) * 2).requires_grad_() for e in sizes]
            before = len(calls)
            losses = step(xs)
            sum(losses).backward()
            out.append(([loss.item() for loss in losses], [x.grad.tolist() for x in xs],
                        [lbl.acc_counts.tolist() for lbl in lbls], len(calls) - before, calls[before:]))
        if batched:  # the sync must sum over the modules' own group
            other = GlobalCountSync(dist.new_group(list(range(world))))
            with pytest.raises(ValueError, match="group"):
                lbls[0].deferred(torch.zeros(E, dtype=torch.long), torch.zeros(E), sync=other)
        return out
    finally:
        dist.all_reduce = all_reduce


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_batched_all_reduce_one_collective_per_micro_batch(compiled):
    world = 2
    per_layer = spawn(_layered_worker, world, False)
    batched = spawn(_layered_worker, world, True, compiled)
    for r in range(world):
        for m in range(M):
            losses, grads, acc, n_calls, numels = batched[r][m]
            ref_losses, ref_grads, ref_acc, ref_calls, _ = per_layer[r][m]
            assert ref_calls == 2 and n_calls == 1 and numels == [(E + 1) + (6 + 1)]
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=1e-7)
            for g, g_ref in zip(grads, ref_grads):
                torch.testing.assert_close(torch.tensor(g), torch.tensor(g_ref), rtol=1e-6, atol=1e-8)
            assert acc == ref_acc
        # The accumulated counts are the global ones: equal on every rank.
        assert batched[r][-1][2] == batched[0][-1][2]


def _ddp_input(m, rank):
    return torch.randn(T, 16, generator=torch.Generator().manual_seed(10 * m + rank))


def _ddp_router():
    from trainops.nn import TopKRouter

    torch.manual_seed(0)
    return TopKRouter(16, E, K, lbl_coeff=0.1, scope="global")


def _ddp_checkpoint_worker(rank, world):
    # DDP, non-reentrant checkpointing and gradient accumulation: every rank's recomputed
    # forwards find their own original counts, also after later micro-batches' forwards.
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = _ddp_router()

        def forward(self, x):
            return checkpoint(lambda h: self.router(h)[2], x, use_reentrant=False)

    net = DistributedDataParallel(Net())
    # Micro-batches 0 and 1 both run forward before either backward (pipeline order): the
    # recomputation of 0 comes after micro-batch 1's forward and its buffer broadcast.
    with net.no_sync():
        losses = [net(_ddp_input(m, rank).requires_grad_()) for m in range(M - 1)]
        for loss in reversed(losses):
            loss.backward()
    net(_ddp_input(M - 1, rank).requires_grad_()).backward()
    lbl = net.module.router.lbl
    return lbl.acc_counts.tolist(), int(lbl.acc_tokens)


def test_global_scope_under_ddp_with_activation_checkpointing():
    world = 2
    results = spawn(_ddp_checkpoint_worker, world)
    router = _ddp_router()
    expected = sum(torch.bincount(router(_ddp_input(m, r))[1].flatten(), minlength=E)
                   for m in range(M) for r in range(world))
    for counts, tokens in results:
        assert counts == expected.tolist() and tokens == M * world * T
