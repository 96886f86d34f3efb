"""DDP with quantized_comm_hook over 2 gloo processes: training, identical replicas, error feedback state."""
import io

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import trainops.distributed.all_reduce as all_reduce_mod
from trainops.distributed import QuantizedCommState, quantized_comm_hook, spawn
from trainops.distributed.all_reduce import owner_chunk_numel


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 4))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 16, generator=g)
    return x, (x[:, :4] * 2 - x[:, 4:8]).detach()


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def _eval(model):
    x, y = _batch(99, 0)
    return torch.nn.functional.mse_loss(model(x), y).item()


def _replicas_equal(model):
    flat = _flat_params(model)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _train(ddp, opt, steps, start, rank):
    losses = []
    for step in range(start, start + steps):
        x, y = _batch(rank, step)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _count_calls(name, undo=False):
    """Count calls of ``trainops.distributed.all_reduce.<name>`` (``undo``: restore the original)."""
    fn = getattr(all_reduce_mod, name)
    if undo:
        setattr(all_reduce_mod, name, fn.__wrapped__)
        return None
    counter = {"n": 0}

    def counted(*args, **kwargs):
        counter["n"] += 1
        return fn(*args, **kwargs)

    counted.__wrapped__ = fn
    setattr(all_reduce_mod, name, counted)
    return counter


def _worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    model = _model()
    # Small buckets: several per model, rebuilt by DDP after the first iteration.
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = QuantizedCommState(module=model, fmt="fp4_e3m0", block_size=64, min_numel=0)
    ddp.register_comm_hook(state, quantized_comm_hook)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.01)
    out["eval_before"] = _eval(model)
    equal = []
    checks, calls = _count_calls("_agree"), _count_calls("_two_shot")
    for step in range(12):
        _train(ddp, opt, 1, step, rank)
        equal.append(_replicas_equal(model))
    out["agreement_checks"], out["reductions"] = checks["n"], calls["n"]
    _count_calls("_agree", undo=True), _count_calls("_two_shot", undo=True)
    out["equal"] = equal
    out["eval_after"] = _eval(model)
    sd = state.state_dict()
    out["ef_keys"] = sorted(sd["errors"])
    out["names"] = sorted(n for n, _ in model.named_parameters())
    out["ef_norms"] = {k: float(v.norm()) for k, v in sd["errors"].items()}
    out["owner_norms"] = {k: float(v.norm()) for k, v in sd["owner_errors"].items()}
    out["bytes"] = state.stats.bytes_sent

    # Checkpoint: save the residuals, rebuild everything, load, keep training.
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "comm": sd}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model2 = _model()
    model2.load_state_dict(ckpt["model"])
    ddp2 = DDP(model2, bucket_cap_mb=0.01)
    state2 = QuantizedCommState(module=model2, fmt="fp4_e3m0", block_size=64, min_numel=0)
    state2.load_state_dict(ckpt["comm"])
    out["reloaded_same"] = all(torch.equal(state2.state_dict()["errors"][k], v) for k, v in sd["errors"].items())
    out["owner_reloaded_same"] = all(torch.equal(state2.state_dict()["owner_errors"][k], v)
                                     for k, v in sd["owner_errors"].items())
    ddp2.register_comm_hook(state2, quantized_comm_hook)
    opt2 = torch.optim.Adam(ddp2.parameters(), lr=0.01)
    opt2.load_state_dict(ckpt["opt"])
    _train(ddp2, opt2, 4, 12, rank)
    out["eval_after2"] = _eval(model2)
    out["equal2"] = _replicas_equal(model2)
    out["ef_after_reload"] = all(float(v.norm()) > 0 for v in state2.state_dict()["errors"].values())

    # Bucket layout change: residual slices follow their parameters, in any order.
    params = list(model2.parameters())
    st = QuantizedCommState(module=model2, fmt="int8", min_numel=0, async_comm=False)
    b1 = torch.zeros(params[0].numel() + params[1].numel())
    e1 = st.bucket_error([params[0], params[1]], b1)
    e1.copy_(torch.arange(e1.numel(), dtype=torch.float32))
    restored = QuantizedCommState(module=model2, fmt="int8", min_numel=0, async_comm=False)
    restored.load_state_dict(st.state_dict())
    for s in (st, restored):
        b2 = torch.zeros(params[1].numel() + params[2].numel() + params[0].numel())
        e2 = s.bucket_error([params[1], params[2], params[0]], b2)
        n0, n1 = params[0].numel(), params[1].numel()
        ok = (torch.equal(e2[:n1], torch.arange(n0, n0 + n1, dtype=torch.float32))
              and bool((e2[n1:n1 + params[2].numel()] == 0).all())
              and torch.equal(e2[-n0:], torch.arange(n0, dtype=torch.float32)))
        out.setdefault("relayout", []).append(ok)
    out["owner_fold"] = _owner_fold(rank, world, params)
    try:
        restored.load_state_dict({**st.state_dict(), "fmt": "int4"})
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    dist.barrier()
    return out


def _mass(params, err, owner, rank, world, block_size=128):
    """Per parameter: worker residual + W * owner residual (placed at the owned elements)."""
    n = err.numel()
    lo = rank * owner_chunk_numel(n, world, block_size)
    full = torch.zeros(n)
    owned = max(0, min(n, lo + owner.numel()) - lo)
    full[lo:lo + owned] = owner[:owned]
    return list((err + world * full).split([p.numel() for p in params]))


def _owner_fold(rank, world, params):
    """A new bucket layout moves owner residuals with their parameters or folds them into the
    worker residual: per parameter, e_w + W * e_s is unchanged. A state dict restores them."""
    g = torch.Generator().manual_seed(rank)
    st = QuantizedCommState(fmt="int8", min_numel=0, async_comm=False)
    first = [params[0], params[1], params[2]]
    err, owner = st.bucket_residuals(first, torch.zeros(sum(p.numel() for p in first)))
    err.copy_(torch.randn(err.numel(), generator=g))
    owner.copy_(torch.randn(owner.numel(), generator=g))
    lo = rank * owner.numel()
    owner[max(0, err.numel() - lo):] = 0  # past the end of the bucket (padding) it stays zero
    before = dict(zip((0, 1, 2), _mass(first, err, owner, rank, world)))
    saved = st.state_dict()
    restored = QuantizedCommState(fmt="int8", min_numel=0, async_comm=False)
    restored.load_state_dict(saved)
    err_r, owner_r = restored.bucket_residuals(first, torch.zeros(err.numel()))  # same layout: exact
    out = {"exact_restore": torch.equal(err_r, err) and torch.equal(owner_r, owner)}
    second = [params[2], params[0], params[1]]
    err2, owner2 = st.bucket_residuals(second, torch.zeros(err.numel()))
    after = dict(zip((2, 0, 1), _mass(second, err2, owner2, rank, world)))
    out["conserved"] = all(torch.allclose(before[i], after[i], rtol=1e-6, atol=1e-6) for i in range(3))
    out["moved"] = bool(owner2.abs().sum() > 0)
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, 2, backend="gloo")


def test_replicas_identical_and_training(results):
    for r in results:
        assert all(r["equal"]) and r["equal2"]
        assert r["eval_after"] < 0.5 * r["eval_before"]
        assert r["bytes"] > 0


def test_settings_checked_across_ranks_once(results):
    """DDP guarantees the buckets agree; the hook's own settings are checked on the first bucket only."""
    for r in results:
        assert r["reductions"] > 12  # several buckets per step
        assert r["agreement_checks"] == 1


def _fmt_mismatch_worker(rank, world, async_comm):
    torch.set_num_threads(1)
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = QuantizedCommState(module=model, fmt="int8" if rank == 1 else "fp4_e3m0", block_size=64, min_numel=0,
                               async_comm=async_comm)
    ddp.register_comm_hook(state, quantized_comm_hook)
    before = _flat_params(model)
    x, y = _batch(rank, 0)
    try:
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        return None
    except Exception as e:  # DDP may wrap the hook's ValueError
        return str(e), bool(torch.equal(before, _flat_params(model)))


@pytest.mark.parametrize("async_comm", [True, False], ids=["async", "inline"])
def test_fmt_mismatch_raises_on_every_rank(async_comm):
    results = spawn(_fmt_mismatch_worker, 2, async_comm, backend="gloo", timeout_s=60)
    for r in results:
        assert r is not None, "ranks with different formats must fail the backward pass"
        assert "fmt: rank 0 = 'fp4_e3m0', rank 1 = 'int8'" in r[0]
        assert r[1]


def test_error_feedback_per_parameter(results):
    for r in results:
        assert r["ef_keys"] == r["names"]
        assert all(v > 0 for v in r["ef_norms"].values())


def test_owner_residuals_per_parameter_survive_checkpoint_and_relayout(results):
    for r in results:
        assert r["owner_norms"] and all(v > 0 for v in r["owner_norms"].values())
        assert set(r["owner_norms"]) <= set(r["names"])
        assert r["owner_reloaded_same"]
        assert r["owner_fold"] == {"exact_restore": True, "conserved": True, "moved": True}


def test_error_feedback_survives_checkpoint_and_rebuild(results):
    for r in results:
        assert r["reloaded_same"]
        assert r["ef_after_reload"]
        assert r["relayout"] == [True, True]
        assert r["mismatch"] is not None and "fmt" in r["mismatch"]
        assert r["eval_after2"] < 0.5 * r["eval_before"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="fmt"):
        QuantizedCommState(fmt="float3")
    with pytest.raises(ValueError, match="block_size"):
        QuantizedCommState(block_size=100)
    with pytest.raises(TypeError, match="module"):
        QuantizedCommState(module="model")
    with pytest.raises(TypeError, match="owner_error_feedback"):
        QuantizedCommState(owner_error_feedback=1)
    with pytest.raises(ValueError, match="pipeline_numel"):
        QuantizedCommState(pipeline_numel=0)
    with pytest.raises(RuntimeError, match="process group"):
        QuantizedCommState()
