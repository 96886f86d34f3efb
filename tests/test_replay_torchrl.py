"""trainops.replay.torchrl.FusedPrioritizedSampler inside stock TorchRL 0.14 buffers: TorchRL's
PER conventions (weight (p + eps)^alpha, importance weight (w_i / min w)^-beta, new items at the
largest raw priority), the sampling distribution (chi-square), TensorDict priority routing,
checkpoints (state_dict, dumps/loads: safetensors, checked before applied) and errors.

TorchRL's own PrioritizedSampler needs TorchRL's compiled segment trees, built for torch 2.14:
the side-by-side comparison with it is tests/test_replay_torchrl_stock.py
(scripts/check_torchrl_stock.sh). Here the expected values are computed independently."""
import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import PrioritizedSampler

import trainops
from trainops.replay.torchrl import FusedPrioritizedSampler

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")

Z_1E4 = 3.719  # standard normal quantile at 1 - 1e-4


def chi2_threshold(dof: int) -> float:
    """Upper 1e-4 quantile of chi-square(dof) (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + Z_1E4 * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def make(cap=64, n=None, alpha=0.7, beta=0.5, eps=1e-8, seed=3, td=True):
    sampler = FusedPrioritizedSampler(cap, alpha=alpha, beta=beta, eps=eps, seed=seed)
    rb = ReplayBuffer(storage=LazyTensorStorage(cap), sampler=sampler)
    n = cap if n is None else n
    x = torch.arange(n, dtype=torch.float32)
    rb.extend(TensorDict({"x": x, "nested": {"y": -x}}, [n]) if td else x)
    return rb, sampler


def test_is_a_prioritized_sampler_and_new_items_get_the_largest_raw_priority():
    rb, s = make(cap=16, n=4)
    assert isinstance(s, PrioritizedSampler)  # TorchRL's buffers route priorities by this class
    assert torch.equal(s._weights[:4], torch.ones(4)) and float(s._weights[4:].abs().sum()) == 0.0
    rb.update_priority(torch.tensor([0, 1, 2]), torch.tensor([0.5, 3.0, 2.0]))
    rb.extend(TensorDict({"x": torch.zeros(2), "nested": {"y": torch.zeros(2)}}, [2]))  # slots 4, 5
    expected = torch.tensor(3.0 + 1e-8, dtype=torch.float64) ** 0.7  # raw max 3.0, transformed once
    torch.testing.assert_close(s._weights[4:6].double(), expected.expand(2), rtol=1e-6, atol=0)
    rb.add(TensorDict({"x": torch.tensor(1.0), "nested": {"y": torch.tensor(1.0)}}, []))
    torch.testing.assert_close(s._weights[6].double(), expected, rtol=1e-6, atol=0)
    assert float(s.default_priority) == 3.0


def test_sampling_distribution_and_importance_weights_follow_torchrl_conventions():
    cap, alpha, beta, eps = 97, 0.7, 0.5, 0.25  # a large eps: the eps convention shows
    rb, s = make(cap=128, n=cap, alpha=alpha, beta=beta, eps=eps, td=False)
    prio = torch.linspace(0.0, 4.0, cap)  # includes p = 0: weight eps^alpha, still sampled
    rb.update_priority(torch.arange(cap), prio)
    w = (prio.double() + eps) ** alpha
    probs = w / w.sum()
    counts = torch.zeros(cap, dtype=torch.float64)
    for _ in range(60):
        data, info = rb.sample(500, return_info=True)
        idx = info["index"]
        assert torch.equal(data, idx.float())  # TorchRL gathered the sampled rows
        counts += torch.bincount(idx, minlength=cap).double()
        expected_w = (w[idx] / w.min()) ** (-beta)  # = (N P(i))^-beta / max_j (N P(j))^-beta
        torch.testing.assert_close(info["priority_weight"].double(), expected_w, rtol=1e-5, atol=0)
    assert chi2(counts, probs) < chi2_threshold(cap - 1)
    # the test can fail: trainops.ReplayBuffer's eps convention max(p, eps)^alpha, or alpha - 0.2
    for wrong in (prio.double().clamp_min(eps) ** alpha, (prio.double() + eps) ** (alpha - 0.2)):
        assert chi2(counts, wrong / wrong.sum()) > chi2_threshold(cap - 1)


def test_only_stored_items_are_sampled_and_minimum_is_over_them():
    rb, s = make(cap=64, n=10, alpha=1.0, beta=1.0, eps=0.0)
    rb.update_priority(torch.arange(10), torch.arange(1, 11).float())
    s.update_priority(torch.tensor([40]), torch.tensor(0.001))  # no storage given: any slot < capacity
    rb.update_priority(torch.tensor([41]), torch.tensor(0.001))  # storage given: not stored yet, skipped
    assert float(s._weights[41]) == 0.0
    idx, info = s.sample(rb._storage, 4000)
    assert int(idx.max()) < 10 and int(idx.min()) >= 0
    torch.testing.assert_close(info["priority_weight"], 1.0 / (idx + 1).float(), rtol=1e-6, atol=0)


def test_tensordict_buffer_routes_priorities_by_key():
    s = FusedPrioritizedSampler(16, alpha=1.0, beta=1.0, seed=0)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(16), sampler=s, priority_key="td_error")
    rb.extend(TensorDict({"obs": torch.randn(6, 2), "td_error": torch.arange(1, 7).float()}, [6]))
    torch.testing.assert_close(s._weights[:6], torch.arange(1, 7).float() + 1e-8)
    batch = rb.sample(8)
    assert {"index", "priority_weight"} <= set(batch.keys())
    batch["td_error"] = torch.full((8,), 9.0)
    rb.update_tensordict_priority(batch)
    assert bool((s._weights[batch["index"]] == 9.0).all())


def test_alpha_and_beta_annealing():
    rb, s = make(cap=32, alpha=0.5, beta=0.4)
    prio = torch.rand(32, generator=torch.Generator().manual_seed(0)) * 3
    rb.update_priority(torch.arange(32), prio)
    s.alpha = 0.9
    torch.testing.assert_close(s._weights.double(), (prio.double() + 1e-8) ** 0.9, rtol=1e-6, atol=0)
    s.beta = 1.0
    idx, info = s.sample(rb._storage, 64)
    w = (prio.double() + 1e-8) ** 0.9
    torch.testing.assert_close(info["priority_weight"].double(), w.min() / w[idx], rtol=1e-5, atol=0)
    for name, bad in (("alpha", -0.1), ("alpha", float("nan")), ("beta", float("inf"))):
        with pytest.raises(ValueError, match=name):
            setattr(s, name, bad)
    assert s.alpha == 0.9 and s.beta == 1.0


def same_samples(rb_a, rb_b, calls=3):
    for _ in range(calls):
        a, b = rb_a.sample(16, return_info=True)[1], rb_b.sample(16, return_info=True)[1]
        if not (torch.equal(a["index"], b["index"]) and torch.equal(a["priority_weight"], b["priority_weight"])):
            return False
    return True


def test_state_dict_and_dumps_round_trip(tmp_path):
    rb, s = make(cap=40, n=30)
    rb.update_priority(torch.arange(30), torch.rand(30, generator=torch.Generator().manual_seed(1)) + 0.1)
    rb.sample(8)
    state = rb.state_dict()
    rb.dumps(tmp_path / "rb")
    assert (tmp_path / "rb" / "sampler" / "sampler.safetensors").exists()
    for restore in ("state_dict", "dumps"):
        other, _ = make(cap=40, n=1, seed=99)
        if restore == "state_dict":
            other.load_state_dict(state)
        else:
            other.loads(tmp_path / "rb")
        assert torch.equal(other._sampler._weights, s._weights)
        assert torch.equal(other._sampler._block_stats, s._block_stats)
        ref, _ = make(cap=40, n=1, seed=99)
        ref.load_state_dict(state)
        assert same_samples(other, ref)
    assert not same_samples(rb, make(cap=40, n=30, seed=4)[0])  # another seed: another stream


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda sd: sd.update(_format="other/1"), "not a FusedPrioritizedSampler state"),
    (lambda sd: sd.update(_max_capacity=41), "max_capacity"),
    (lambda sd: sd.update(_alpha=float("nan")), "_alpha"),
    (lambda sd: sd.update(_offset=-1), "_offset"),
    (lambda sd: sd.update(_weights=sd["_weights"][:-1]), "_weights"),
    (lambda sd: sd.update(_shifted=sd["_shifted"].double()), "_shifted"),
    (lambda sd: sd["_shifted"].__setitem__(0, float("inf")), "finite"),
    (lambda sd: sd["_weights"].__setitem__(0, 7.0), r"not \(p \+ eps\)\^alpha"),
    (lambda sd: sd["_max_p"].fill_(float("nan")), "_max_p"),
])
def test_bad_sampler_state_is_refused_and_changes_nothing(corrupt, pattern):
    rb, s = make(cap=40, n=30)
    rb.update_priority(torch.arange(30), torch.arange(30).float())
    sd = s.state_dict()
    target = FusedPrioritizedSampler(40, alpha=0.7, beta=0.5, seed=1)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in target.state_dict().items()}
    corrupt(sd)
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert all(torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())


def test_bad_files_and_input(tmp_path):
    rb, s = make(cap=8)
    with pytest.raises(ValueError, match="not a readable"):
        s.loads(tmp_path / "nothing")
    torch.save({"x": 1}, tmp_path / "sampler.safetensors")  # a pickle under the expected name: refused
    with pytest.raises(ValueError, match="not a readable"):
        s.loads(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        rb.update_priority(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=">= 0"):
        rb.update_priority(torch.tensor([0]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="overflows"):  # 1e30 is a float32, 1e30^2 is not
        FusedPrioritizedSampler(8, alpha=2.0, beta=0.4).update_priority(0, 1e30)
    with pytest.raises(ValueError, match="max_capacity"):
        rb.update_priority(torch.tensor([8]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one number or one per index"):
        rb.update_priority(torch.tensor([0, 1]), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(s._weights, torch.ones(8))  # nothing above was applied
    rb.update_priority(torch.tensor([-1, 2]), torch.tensor([5.0, 2.0]))  # -1: TorchRL's "skip"
    assert float(s._weights[2]) == pytest.approx(2.0 ** 0.7) and float(s._weights[0]) == 1.0
    with pytest.raises(ValueError, match="one-dimensional"):
        ReplayBuffer(storage=LazyTensorStorage(8, ndim=2), sampler=FusedPrioritizedSampler(8, 0.6, 0.4)).extend(
            TensorDict({"x": torch.zeros(2, 4)}, [2, 4]))
    with pytest.raises(ValueError, match="max_priority_within_buffer"):
        FusedPrioritizedSampler(8, 0.6, 0.4, max_priority_within_buffer=True)
    with pytest.raises(ValueError, match="dtype"):
        FusedPrioritizedSampler(8, 0.6, 0.4, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_size"):
        s.sample(rb._storage, -1)
    with pytest.raises(RuntimeError, match="empty storage"):
        ReplayBuffer(storage=LazyTensorStorage(8), sampler=FusedPrioritizedSampler(8, 0.6, 0.4)).sample(4)
    rb.empty()
    assert len(rb) == 0 and float(s._weights.sum()) == 0.0 and float(s.default_priority) == 1.0


def test_the_buffers_generator_decides_the_stream():
    def draws(seed):
        sampler = FusedPrioritizedSampler(64, 0.6, 0.4)  # its own seed differs each time
        rb = ReplayBuffer(storage=LazyTensorStorage(64), sampler=sampler, generator=torch.Generator().manual_seed(seed))
        rb.extend(torch.arange(64.0))
        return torch.cat([rb.sample(16, return_info=True)[1]["index"] for _ in range(3)])

    assert torch.equal(draws(5), draws(5)) and not torch.equal(draws(5), draws(6))
