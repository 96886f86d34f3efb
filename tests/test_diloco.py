"""DiLoCo / Streaming DiLoCo over 2 gloo processes: FP4 vs FP32 on the demo task, checkpoints, schedule."""
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainops.distributed import DiLoCo, spawn
from trainops.examples import diloco as demo

STREAM = dict(sync_every=10, num_fragments=2, overlap_steps=3, fragment_alpha=0.0)
# Fragment 0 is sent after steps 2, 6, 10 and merged 3 steps later, fragment 1 after 4, 8, 12:
# from step 2 on one or both fragments are in flight at every step.
RESUME = dict(sync_every=4, num_fragments=2, overlap_steps=3, fragment_alpha=0.5, fmt="fp4_e3m0",
              error_feedback=True, min_numel=0)
RESUME_STEPS = 14


def _batch(task, rank, step):
    return task.batch(torch.Generator().manual_seed(7919 * rank + step), 32)


def _inner_step(model, opt, task, rank, step):
    x, y = _batch(task, rank, step)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _build(seed, **kw):
    model = demo.make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, opt, DiLoCo(model, opt, **kw)


def _fragment_flat(frag):
    return torch.cat([p.detach().reshape(-1) for _, p in frag])


def _equal_across_ranks(t):
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _checkpoint_run(rank, task, kw, total, save_at):
    """Params after `total` steps, straight or with a save/rebuild/load at `save_at`."""
    model, opt, dl = _build(0, **kw)
    for step in range(total if save_at is None else save_at):
        _inner_step(model, opt, task, rank, step)
        dl.step()
    if save_at is not None:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "diloco": dl.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf)
        model, opt, dl = _build(5, **kw)  # different init: everything must come from the checkpoint
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        dl.load_state_dict(ckpt["diloco"])
        for step in range(save_at, total):
            _inner_step(model, opt, task, rank, step)
            dl.step()
    dl.flush()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _differences(a, b, path=""):
    """Where two (nested) states differ; tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _resume_from_every_step(rank, task):
    """Streaming DiLoCo with overlapping exchanges (RESUME), checkpointed after every inner
    step and resumed the way a restarted job does it: a fresh model (other init) loads its
    weights first, then a new DiLoCo is built on it (with and without the broadcast of
    rank 0's weights) and loads the DiLoCo state. Each resumed run must end bit for bit
    like the uninterrupted one: weights, inner optimizer, θ_global, outer momentum, residuals."""
    def finish(model, opt, dl, start):
        for step in range(start, RESUME_STEPS):
            _inner_step(model, opt, task, rank, step)
            dl.step()
        dl.flush()
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "diloco": dl.state_dict()}
        del state["diloco"]["stats"]  # byte counters (a resumed DiLoCo counts from zero)
        return state

    straight = finish(*_build(0, **RESUME), 0)
    model, opt, dl = _build(0, **RESUME)
    saved, in_flight = [], []
    for step in range(RESUME_STEPS):
        _inner_step(model, opt, task, rank, step)
        dl.step()
        in_flight.append(sorted(dl._in_flight))
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "diloco": dl.state_dict()}, buf)
        saved.append(buf.getvalue())
    differ = {}
    diff = _differences(straight, finish(model, opt, dl, RESUME_STEPS))  # saving must not change the run
    if diff:
        differ["saving run"] = diff[:4]
    for k, data in enumerate(saved, 1):
        for broadcast in (True, False):
            ckpt = torch.load(io.BytesIO(data))
            model = demo.make_model(5)
            model.load_state_dict(ckpt["model"])
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            opt.load_state_dict(ckpt["opt"])
            dl = DiLoCo(model, opt, broadcast_init=broadcast, **RESUME)
            dl.load_state_dict(ckpt["diloco"])
            diff = _differences(straight, finish(model, opt, dl, k))
            if diff:
                differ[f"step {k}, broadcast_init={broadcast}"] = diff[:4]
    return {"differ": differ, "in_flight": in_flight}


def _worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    # 1. The demo task with its default settings, FP32 and FP4 exchange.
    cfg = {"steps": 600, "sync_every": 30, "fragments": 1, "overlap": 0, "alpha": 0.0, "block_size": 128,
           "error_feedback": False, "lr": 3e-3, "batch_size": 64, "seed": 0}
    out["fp32"] = demo.train(rank, world, {**cfg, "fmt": None})
    out["fp4"] = demo.train(rank, world, {**cfg, "fmt": "fp4_e3m0"})

    task = demo.TeacherTask(0)
    # 2. Streaming schedule: when is each fragment identical across workers?
    model, opt, dl = _build(0, fmt="fp4_e3m0", min_numel=0, **STREAM)
    out["offsets"] = [dl.send_offset(f) for f in range(2)]
    equal_at = {0: [], 1: []}
    in_flight_at = []
    for step in range(1, 25):
        _inner_step(model, opt, task, rank, step)
        dl.step()
        for f in range(2):
            if _equal_across_ranks(_fragment_flat(dl.fragments[f])):
                equal_at[f].append(step)
        if dl._in_flight:
            in_flight_at.append(step)
    out["equal_at"] = equal_at
    out["in_flight_at"] = in_flight_at
    out["unit_split"] = [[n for n, _ in frag] for frag in dl.fragments]

    # 3. alpha mixing on arrival: theta = alpha * local + (1 - alpha) * global.
    model, opt, dl = _build(0, fmt=None, sync_every=4, fragment_alpha=0.25)
    for step in range(1, 4):
        _inner_step(model, opt, task, rank, step)
        dl.step()
    _inner_step(model, opt, task, rank, 4)
    local = [p.detach().clone() for p in model.parameters()]
    dl.step()
    glob = [g for frag in dl.global_parameters() for g in frag]
    out["alpha_ok"] = all(torch.equal(p, l.mul(0.25).add_(g, alpha=0.75))
                          for p, l, g in zip(model.parameters(), local, glob))
    out["alpha_globals_equal"] = all(_equal_across_ranks(g) for g in glob)

    # 4. Checkpoint round trip with a sync in flight at the save (step 16: fragment 0 sent at 15).
    kw = dict(fmt="fp4_e3m0", error_feedback=True, min_numel=0, **{**STREAM, "fragment_alpha": 0.5})
    straight = _checkpoint_run(rank, task, kw, 30, None)
    resumed = _checkpoint_run(rank, task, kw, 30, 16)
    out["resume_identical"] = bool(torch.equal(straight, resumed))
    # 5. Resume from every step of a run with overlapping exchanges.
    out["resume_every_step"] = _resume_from_every_step(rank, task)
    # A state dict from before local_params still loads; local_params of another model do not.
    model, opt, dl = _build(0, fmt=None, sync_every=4)
    state = dl.state_dict()
    dl.load_state_dict({k: v for k, v in state.items() if k != "local_params"})
    state["local_params"] = [[p.double() for p in frag] for frag in state["local_params"]]
    try:
        dl.load_state_dict(state)
        out["bad_local_params"] = "loaded"
    except ValueError as e:
        out["bad_local_params"] = str(e)
    out["two_stage"] = _two_stage_and_pipelined(rank, task)
    dist.barrier()
    return out


def _two_stage_and_pipelined(rank, task):
    """Owner residuals kept per fragment (and checkpointed); a pipelined exchange changes no bit."""
    kw = dict(fmt="fp4_e3m0", error_feedback=True, min_numel=0, sync_every=4, num_fragments=2)
    runs = {}
    for name, extra in (("two_stage", {}), ("pipelined", dict(pipeline_numel=300)),
                        ("one_stage", dict(owner_error_feedback=False))):
        model, opt, dl = _build(0, **kw, **extra)
        for step in range(12):
            _inner_step(model, opt, task, rank, step)
            dl.step()
        runs[name] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]), dl.state_dict(), dl)
    out = {"pipelined_same": not _differences({k: v for k, v in runs["two_stage"][1].items() if k != "stats"},
                                              {k: v for k, v in runs["pipelined"][1].items() if k != "stats"}),
           "owner_nonzero": [bool(o.abs().sum() > 0) for o in runs["two_stage"][1]["owner_errors"]],
           "one_stage_owner": runs["one_stage"][1]["owner_errors"],
           "one_stage_differs": not torch.equal(runs["one_stage"][0], runs["two_stage"][0])}
    state, dl = runs["two_stage"][1], runs["two_stage"][2]
    dl.load_state_dict({k: v for k, v in state.items() if k != "owner_errors"})  # older state dicts
    out["old_state_owner"] = dl.state_dict()["owner_errors"]
    try:
        dl.load_state_dict({**state, "owner_errors": [o[:-1] for o in state["owner_errors"]]})
        out["bad_owner"] = "loaded"
    except ValueError as e:
        out["bad_owner"] = str(e)
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, 2, backend="gloo", timeout_s=300.0)


def test_fp4_within_2_percent_of_fp32(results):
    for r in results:
        assert r["fp4"]["loss"] <= 1.02 * r["fp32"]["loss"]
        assert r["fp4"]["loss"] < 1.0  # it learned (chance level is ln 10 = 2.3)
        assert r["fp32"]["bytes_sent"] > 7 * r["fp4"]["bytes_sent"]
    assert results[0]["fp4"]["loss"] == results[1]["fp4"]["loss"]  # identical global model


def test_streaming_schedule(results):
    r = results[0]
    assert r["offsets"] == [5, 0]
    # Fragment 0 is sent at steps 5, 15 and merged tau = 3 steps later; fragment 1 at 10, 20.
    assert r["equal_at"] == {0: [8, 18], 1: [13, 23]}
    assert r["in_flight_at"] == [5, 6, 7, 10, 11, 12, 15, 16, 17, 20, 21, 22]
    # strided over the four Linear layers (Sequential indices 0, 2, 4, 6)
    assert r["unit_split"] == [["0.weight", "0.bias", "4.weight", "4.bias"], ["2.weight", "2.bias", "6.weight", "6.bias"]]


def test_alpha_mixing(results):
    for r in results:
        assert r["alpha_ok"] and r["alpha_globals_equal"]


def test_checkpoint_round_trip_continues_identically(results):
    for r in results:
        assert r["resume_identical"]


def test_resume_from_every_step_with_syncs_in_flight_is_bit_for_bit(results):
    for r in results:
        got = r["resume_every_step"]
        # the saves cover: nothing in flight (step 1), one fragment, the other, both at once
        assert got["in_flight"] == [[], [0], [0], [0, 1], [1], [0, 1], [0], [0, 1], [1], [0, 1], [0], [0, 1], [1],
                                    [0, 1]]
        assert not got["differ"], got["differ"]
        assert "local_params do not match" in r["bad_local_params"]


def test_two_stage_error_feedback_per_fragment_and_pipelined(results):
    for r in results:
        got = r["two_stage"]
        assert got["owner_nonzero"] == [True, True]
        assert got["one_stage_owner"] == [None, None] and got["one_stage_differs"]
        assert got["pipelined_same"]
        assert got["old_state_owner"] == [None, None]
        assert "owner_errors[0]" in got["bad_owner"]


# --- argument checks (before any collective) ---------------------------------------------------

def _args(**kw):
    model = demo.make_model(0)
    return dict(model=model, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)


@pytest.mark.parametrize("kw, exc, word", [
    (dict(model="m"), TypeError, "model"),
    (dict(inner_optimizer=object()), TypeError, "inner_optimizer"),
    (dict(sync_every=0), ValueError, "sync_every"),
    (dict(sync_every=10, num_fragments=3), ValueError, "divisible"),
    (dict(num_fragments=5, sync_every=10), ValueError, "num_fragments"),
    (dict(sync_every=10, overlap_steps=10), ValueError, "overlap_steps"),
    (dict(fragment_alpha=1.5), ValueError, "fragment_alpha"),
    (dict(outer_lr=0.0), ValueError, "outer_lr"),
    (dict(outer_momentum=0.0), ValueError, "nesterov"),
    (dict(fmt="fp3"), ValueError, "fmt"),
    (dict(block_size=48), ValueError, "block_size"),
    (dict(sync_every=2.5), TypeError, "sync_every"),
    (dict(owner_error_feedback=1), TypeError, "owner_error_feedback"),
    (dict(pipeline_numel=0), ValueError, "pipeline_numel"),
])
def test_bad_arguments(kw, exc, word):
    args = _args()
    args.update(kw)
    with pytest.raises(exc, match=word):
        DiLoCo(**args)


def test_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        DiLoCo(**_args())
