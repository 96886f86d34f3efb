"""trainops.nn under bad input: hostile scalar arguments are refused with an error naming the
argument, and a bad state dict changes nothing (every module bitwise as before)."""
import pytest
import torch
from torch import nn

from trainops.nn import LoadBalancingLoss, MoELayer, MoRALinear, TopKRouter, apply_mora, load_mora_state_dict
from trainops.nn import add_task, mora_modules, mora_state_dict

NAN, INF = float("nan"), float("inf")


def bitwise_snapshot(module: nn.Module) -> dict:
    """Every parameter and buffer (by name, with its identity) plus MoRA layouts."""
    snap = {name: (id(t), t.detach().clone()) for name, t in
            list(module.named_parameters()) + list(module.named_buffers())}
    snap["_flags"] = {name: p.requires_grad for name, p in module.named_parameters()}
    snap["_mora"] = {name: (list(m.task_ranks), m.num_frozen, m.capacity, m.num_ranks)
                     for name, m in mora_modules(module)}
    snap["_types"] = {name: type(m).__name__ for name, m in module.named_modules()}
    return snap


def assert_unchanged(module: nn.Module, snap: dict) -> None:
    now = bitwise_snapshot(module)
    for key in ("_flags", "_mora", "_types"):
        assert now.pop(key) == snap[key], key
    assert set(now) == set(k for k in snap if not k.startswith("_"))
    for name, (ident, value) in now.items():
        assert ident == snap[name][0], f"{name} was replaced"
        assert torch.equal(value.reshape(-1).view(torch.uint8), snap[name][1].reshape(-1).view(torch.uint8)), name


# ----------------------------------------------------------------------------- MoRA arguments

MORA_BAD = [
    ("scaling", INF, ValueError), ("scaling", NAN, ValueError), ("scaling", -INF, ValueError),
    ("scaling", "2", TypeError),
    ("temperature", 0.0, ValueError), ("temperature", -0.1, ValueError), ("temperature", INF, ValueError),
    ("temperature", NAN, ValueError), ("temperature", None, TypeError),
    ("threshold", NAN, ValueError), ("threshold", INF, ValueError), ("threshold", "0.2", TypeError),
    ("dropout", -0.1, ValueError), ("dropout", 1.0, ValueError), ("dropout", NAN, ValueError),
    ("dropout", INF, ValueError), ("dropout", True, TypeError),
    ("rank", 0, ValueError), ("rank", 1.5, TypeError), ("rank", True, TypeError),
    ("top_k", 0, ValueError), ("top_k", 2.0, TypeError),
    ("capacity", 0, ValueError), ("capacity", -4, ValueError), ("capacity", 8.0, TypeError),
]


@pytest.mark.parametrize("name,value,error", MORA_BAD)
def test_mora_linear_refuses_hostile_arguments(name, value, error):
    base = nn.Linear(4, 3)
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(error, match=name):
        MoRALinear(base, **{name: value})
    assert [p.requires_grad for p in base.parameters()] == flags  # nothing frozen either


@pytest.mark.parametrize("name,value,error", MORA_BAD)
def test_apply_mora_refuses_hostile_arguments_before_touching_the_model(name, value, error):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    before = bitwise_snapshot(model)
    with pytest.raises(error, match=name):
        apply_mora(model, ["0", "2"], **{name: value})
    assert_unchanged(model, before)


def test_mora_add_task_refuses_bad_rank():
    m = MoRALinear(nn.Linear(4, 3), rank=2)
    before = bitwise_snapshot(m)
    for rank, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="rank"):
            m.add_task(rank)
    assert_unchanged(m, before)


# ----------------------------------------------------------------------------- MoRA state loading

def mora_model(seed: int, tasks: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    apply_mora(model, ["0", "2", "4"], rank=2, top_k=2)
    for t in range(tasks):
        for _, m in mora_modules(model):
            nn.init.normal_(m.lora_B)
        add_task(model, rank=3 if t % 2 else 2)
    return model


def source_state() -> dict:
    """A valid adapter state with another task layout than the target's: applying any part of
    it would show."""
    return {k: v.clone() for k, v in mora_state_dict(mora_model(seed=1, tasks=3)).items()}


def put(key, fn):
    def f(sd):
        sd[key] = fn(sd[key])
    return f


def drop(key):
    return lambda sd: sd.pop(key)


def add(key, value):
    return lambda sd: sd.__setitem__(key, value)


LAST = "4"  # the last MoRA layer: a check that ran per layer while applying would have applied "0" and "2"
STATE_BAD = [
    ("lora_A_rows", put(f"{LAST}.lora_A", lambda t: t[:-1]), "lora_A must be"),
    ("lora_B_cols", put(f"{LAST}.lora_B", lambda t: t[:, :-1]), "lora_B must be"),
    ("lora_A_features", put(f"{LAST}.lora_A", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)), "lora_A must be"),
    ("frozen_A_rows", put(f"{LAST}.frozen_A", lambda t: t[:-1]), "frozen_A must be"),
    ("frozen_B_cols", put(f"{LAST}.frozen_B", lambda t: t[:, :-1]), "frozen_B must be"),
    ("frozen_A_int", put(f"{LAST}.frozen_A", lambda t: t.long()), "frozen_A must be"),
    ("lora_B_meta", put(f"{LAST}.lora_B", lambda t: t.to("meta")), "lora_B must be"),
    ("lora_A_list", put(f"{LAST}.lora_A", lambda t: t.tolist()), "lora_A must be"),
    ("task_ranks_zero", put(f"{LAST}.task_ranks", lambda t: torch.cat([t[:-1], t.new_zeros(1)])), "positive"),
    ("task_ranks_negative", put(f"{LAST}.task_ranks", lambda t: -t), "positive"),
    ("task_ranks_float", put(f"{LAST}.task_ranks", lambda t: t.float()), "integer tensor"),
    ("task_ranks_empty", put(f"{LAST}.task_ranks", lambda t: t[:0]), "non-empty"),
    ("task_ranks_2d", put(f"{LAST}.task_ranks", lambda t: t[None]), "1-D"),
    ("task_ranks_disagree", put(f"{LAST}.task_ranks", lambda t: t + 1), "must be"),
    ("task_ranks_huge", put(f"{LAST}.task_ranks", lambda t: torch.tensor([10**9, 2])), "frozen_A must be"),
    ("missing_lora_B", drop(f"{LAST}.lora_B"), "missing"),
    ("missing_task_ranks", drop(f"{LAST}.task_ranks"), "missing"),
    ("missing_layer", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(f"{LAST}.")], "no adapter tensors"),
    ("unknown_in_layer", add(f"{LAST}.base.weight", torch.zeros(3, 4)), "unexpected"),
    ("unknown_layer", add("9.lora_A", torch.zeros(2, 4)), "no MoRA layer"),
]


@pytest.mark.parametrize("corrupt,pattern", [pytest.param(c, p, id=i) for i, c, p in STATE_BAD])
def test_bad_mora_state_changes_no_layer(corrupt, pattern):
    target = mora_model(seed=0, tasks=1)
    sd = source_state()
    load_mora_state_dict(mora_model(seed=0, tasks=1), {k: v.clone() for k, v in sd.items()})  # valid as is
    corrupt(sd)
    before = bitwise_snapshot(target)
    with pytest.raises((KeyError, ValueError, TypeError), match=pattern):
        load_mora_state_dict(target, sd)
    assert_unchanged(target, before)


def test_bad_mora_state_non_strict_changes_no_layer():
    target = mora_model(seed=0, tasks=1)
    before = bitwise_snapshot(target)
    for _, corrupt, _ in STATE_BAD[:15]:  # shape/dtype/layout problems fail also without strict
        sd = source_state()
        corrupt(sd)
        with pytest.raises(ValueError):
            load_mora_state_dict(target, sd, strict=False)
        assert_unchanged(target, before)
    sd = source_state()
    for k in [k for k in sd if k.startswith(f"{LAST}.") and not k.endswith("task_ranks")]:
        del sd[k]
    with pytest.raises(ValueError, match="cannot be resized"):  # task_ranks alone would resize to garbage
        load_mora_state_dict(target, sd, strict=False)
    assert_unchanged(target, before)
    with pytest.raises(TypeError, match="state_dict"):
        load_mora_state_dict(target, [("0.lora_A", torch.zeros(1))])
    assert_unchanged(target, before)


def test_valid_mora_state_loads_every_layer():
    target, src = mora_model(seed=0, tasks=1), mora_model(seed=1, tasks=3)
    load_mora_state_dict(target, mora_state_dict(src))
    for (_, a), (_, b) in zip(mora_modules(target), mora_modules(src)):
        assert a.task_ranks == b.task_ranks and a.num_frozen == b.num_frozen
        assert torch.equal(a.frozen_A[: a.num_frozen], b.frozen_A[: b.num_frozen])
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_mora_module_load_state_dict_bad_layout_changes_nothing():
    m = MoRALinear(nn.Linear(4, 3), rank=2)
    src = MoRALinear(nn.Linear(4, 3), rank=2).add_task(3)
    sd = src.state_dict()
    sd["task_ranks"] = torch.tensor([2, 4])  # lora_A has 3 rows
    before = bitwise_snapshot(m)
    with pytest.raises(RuntimeError, match="lora_A must be"):
        m.load_state_dict(sd)
    assert_unchanged(m, before)
    sd = src.state_dict()
    sd["base.weight"] = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="base.weight must be"):
        m.load_state_dict(sd)
    assert_unchanged(m, before)
    m.load_state_dict(src.state_dict())
    assert m.task_ranks == [2, 3] and torch.equal(m.lora_A, src.lora_A)


# ----------------------------------------------------------------------------- router / LBL / MoE arguments

E, K, H = 6, 2, 8


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(coeff=NAN), ValueError, "coeff"), (dict(coeff=INF), ValueError, "coeff"),
    (dict(coeff=-1.0), ValueError, "coeff"), (dict(coeff="0.01"), TypeError, "coeff"),
    (dict(coeff=None), TypeError, "coeff"),
    (dict(num_experts=0), ValueError, "num_experts"), (dict(num_experts=6.0), TypeError, "num_experts"),
    (dict(num_experts=True), TypeError, "num_experts"),
    (dict(top_k=0), ValueError, "top_k"), (dict(top_k=E + 1), ValueError, "top_k"),
    (dict(top_k=1.5), TypeError, "top_k"),
    (dict(scope={"global": NAN}), ValueError, "scope weight"),
    (dict(scope={"global": INF}), ValueError, "scope weight"),
    (dict(scope={"micro_batch": -1.0}), ValueError, "scope weight"),
])
def test_load_balancing_loss_refuses_hostile_arguments(kw, error, pattern):
    args = {"num_experts": E, "top_k": K, "coeff": 0.01, **kw}
    with pytest.raises(error, match=pattern):
        LoadBalancingLoss(**args)


ROUTER_BAD = [
    (dict(lbl_coeff=NAN), ValueError, "lbl_coeff"),  # NaN > 0 is False: the loss was silently off
    (dict(lbl_coeff=INF), ValueError, "lbl_coeff"), (dict(lbl_coeff=-0.1), ValueError, "lbl_coeff"),
    (dict(z_loss_coeff=NAN), ValueError, "z_loss_coeff"), (dict(z_loss_coeff=INF), ValueError, "z_loss_coeff"),
    (dict(bias_update_rate=NAN), ValueError, "bias_update_rate"),
    (dict(bias_update_rate=INF), ValueError, "bias_update_rate"),
    (dict(bias_update_rate=-1e-3), ValueError, "bias_update_rate"),
    (dict(top_k=0), ValueError, "top_k"), (dict(top_k=E + 1), ValueError, "top_k"),
    (dict(num_experts=0), ValueError, "num_experts"), (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(hidden_size="8"), TypeError, "hidden_size"), (dict(score="relu"), ValueError, "score"),
    (dict(renormalize="yes"), TypeError, "renormalize"), (dict(aux_free_bias=1), TypeError, "aux_free_bias"),
]


@pytest.mark.parametrize("kw,error,pattern", ROUTER_BAD)
def test_top_k_router_refuses_hostile_arguments(kw, error, pattern):
    args = {"hidden_size": H, "num_experts": E, "top_k": K, **kw}
    with pytest.raises(error, match=pattern):
        TopKRouter(args.pop("hidden_size"), args.pop("num_experts"), args.pop("top_k"), **args)


@pytest.mark.parametrize("kw,error,pattern", ROUTER_BAD[:8] + [(dict(ffn_size=0), ValueError, "ffn_size")])
def test_moe_layer_refuses_hostile_arguments(kw, error, pattern):
    args = {"ffn_size": 5, **kw}
    with pytest.raises(error, match=pattern):
        MoELayer(H, args.pop("ffn_size"), E, K, **args)


# ----------------------------------------------------------------------------- router / LBL / MoE state loading

def trained(module, seed):
    """``module`` with non-default state: random weights, counts from two training forwards."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    module.train()
    for _ in range(2):
        if isinstance(module, LoadBalancingLoss):
            module(torch.randint(0, 9, (E,)), torch.rand(E))
        else:
            module(torch.randn(2, 5, H))
    return module


def snap_with_ring(module):
    snap = bitwise_snapshot(module)
    snap["_ring"] = [int(m._snap_len) for m in module.modules() if isinstance(m, LoadBalancingLoss)]
    return snap


def assert_unchanged_with_ring(module, snap):
    assert [int(m._snap_len) for m in module.modules() if isinstance(m, LoadBalancingLoss)] == snap.pop("_ring")
    assert_unchanged(module, snap)


def test_load_balancing_state_loads_and_forgets_old_snapshots():
    target, src = trained(lbl(), 0), trained(lbl(), 1)
    assert int(target._snap_len) == 2
    target.load_state_dict(src.state_dict())
    assert torch.equal(target.acc_counts, src.acc_counts) and int(target._snap_len) == 0


def lbl():
    return LoadBalancingLoss(E, K, 0.01, scope="global")


def router():
    return TopKRouter(H, E, K, aux_free_bias=True, lbl_coeff=0.01, scope="micro_batch")


def moe():
    return MoELayer(H, 5, E, K, aux_free_bias=True, lbl_coeff=0.01, scope="global")


MODULE_BAD = [
    (lbl, "acc_counts_negative", put("acc_counts", lambda t: t - 100), "acc_counts must be >= 0"),
    (lbl, "acc_counts_float", put("acc_counts", lambda t: t.float() + 0.5), "acc_counts must be an integer"),
    (lbl, "acc_counts_shape", put("acc_counts", lambda t: t[:-1]), "acc_counts must be"),
    (lbl, "acc_tokens_negative", put("acc_tokens", lambda t: -t), "acc_tokens must be >= 0"),
    (lbl, "acc_tokens_shape", put("acc_tokens", lambda t: t.reshape(1)), "acc_tokens must be"),
    (lbl, "acc_tokens_list", put("acc_tokens", lambda t: [int(t)]), "acc_tokens must be a tensor"),
    (router, "weight_shape", put("weight", lambda t: t[:, :-1]), "weight must be"),
    (router, "weight_int", put("weight", lambda t: t.long()), "weight must be a floating-point"),
    (router, "bias_nan", put("expert_bias", lambda t: t.index_fill(0, torch.tensor([1]), NAN)), "must be finite"),
    (router, "bias_inf", put("expert_bias", lambda t: t.index_fill(0, torch.tensor([1]), INF)), "must be finite"),
    (router, "bias_shape", put("expert_bias", lambda t: t[:-1]), "expert_bias must be"),
    (router, "load_negative", put("load", lambda t: t - 1000), "load must be >= 0"),
    (router, "load_float", put("load", lambda t: t.float()), "load must be an integer"),
    (router, "lbl_counts_negative", put("lbl.acc_counts", lambda t: t - 1000), "acc_counts must be >= 0"),
    (router, "lbl_tokens_shape", put("lbl.acc_tokens", lambda t: t.reshape(1)), "acc_tokens must be"),
    (moe, "down_shape", put("down", lambda t: t[:-1]), "down must be"),
    (moe, "gate_up_meta", put("gate_up", lambda t: t.to("meta")), "gate_up must be"),
    (moe, "router_bias_nan", put("router.expert_bias", lambda t: t * NAN), "must be finite"),
    (moe, "router_lbl_tokens_negative", put("router.lbl.acc_tokens", lambda t: t - 10**6), "acc_tokens must be >= 0"),
]


@pytest.mark.parametrize("make,corrupt,pattern", [pytest.param(m, c, p, id=f"{m.__name__}-{i}")
                                                  for m, i, c, p in MODULE_BAD])
def test_bad_lbl_router_or_moe_state_changes_nothing(make, corrupt, pattern):
    target = trained(make(), 0)
    sd = {k: v.clone() for k, v in trained(make(), 1).state_dict().items()}
    make().load_state_dict(sd)  # the uncorrupted state loads
    corrupt(sd)
    before = snap_with_ring(target)
    with pytest.raises(RuntimeError, match=pattern):
        target.load_state_dict(sd)
    assert_unchanged_with_ring(target, before)
    wrapped = nn.Sequential(nn.Linear(2, 2), make())  # also inside a model
    before = snap_with_ring(wrapped[1])
    with pytest.raises(RuntimeError, match=pattern):
        wrapped.load_state_dict({**{f"0.{k}": v for k, v in wrapped[0].state_dict().items()},
                                 **{f"1.{k}": v for k, v in sd.items()}})
    assert_unchanged_with_ring(wrapped[1], before)


@pytest.mark.parametrize("make,name,value,error", [
    (lambda: MoRALinear(nn.Linear(4, 3)), "scaling", INF, ValueError),
    (lambda: MoRALinear(nn.Linear(4, 3)), "temperature", 0.0, ValueError),
    (lambda: MoRALinear(nn.Linear(4, 3)), "threshold", NAN, ValueError),
    (lambda: MoRALinear(nn.Linear(4, 3)), "dropout", 1.0, ValueError),
    (lambda: MoRALinear(nn.Linear(4, 3)), "scaling", "2", TypeError),
    (lambda: LoadBalancingLoss(E, K, 0.01), "coeff", NAN, ValueError),
    (lambda: TopKRouter(H, E, K), "z_loss_coeff", INF, ValueError),
    (lambda: TopKRouter(H, E, K), "bias_update_rate", -1.0, ValueError),
])
def test_hostile_values_assigned_later_are_refused(make, name, value, error):
    module = make()
    before = getattr(module, name)
    with pytest.raises(error, match=name):
        setattr(module, name, value)
    assert getattr(module, name) == before
    setattr(module, name, 0.5)  # a valid value is taken, as a float
    assert getattr(module, name) == 0.5


def test_mora_linear_compiles_with_checked_attributes():
    m = MoRALinear(nn.Linear(4, 3), rank=2, top_k=2).eval()
    nn.init.normal_(m.lora_B)
    x = torch.randn(5, 4)
    compiled = torch.compile(m, backend="eager")
    torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)
    m.scaling = 2.0  # a changed attribute is seen by the compiled module
    torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)
