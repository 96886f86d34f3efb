"""ReplayBuffer checkpoints under bad input: every corrupted state or file is refused with a
ValueError/TypeError before anything is written (the buffer stays bitwise as it was), and
files are safetensors only (no pickle)."""
import json

import pytest
import torch

import trainops
from trainops.replay import ReplayBuffer

pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="trainops._C not built")

L = 6
CAP = 40
RAGGED_SPEC = {"tokens": ((L,), torch.int32), "length": ((), torch.int32), "task": ((), torch.int64)}


def spec():
    return {"obs": ((L,), torch.float32), "id": ((), torch.int64), "task": ((), torch.int64)}


def items(start, n, task=0):
    ids = torch.arange(start, start + n)
    return {"obs": ids[:, None].float().repeat(1, L), "id": ids, "task": torch.full((n,), task, dtype=torch.int64)}


def ragged_items(start, n):
    tokens = torch.arange(start, start + n * L, dtype=torch.int32).view(n, L)
    return {"tokens": tokens, "length": torch.arange(n, dtype=torch.int32) % (L + 1),
            "task": torch.zeros(n, dtype=torch.int64)}


KINDS = {  # name -> (constructor kwargs, items of one add call)
    "per_reservoir": (dict(spec=spec(), sampler="prioritized", eviction="reservoir", max_tasks=4), items),
    "power_law_fifo": (dict(spec=spec(), sampler="power_law", eviction="fifo", max_tasks=4), items),
    "ragged_recency": (dict(spec=RAGGED_SPEC, sampler="recency", ragged={"tokens": "length"}), ragged_items),
}


def make(kind, adds, seed=3, start=0):
    """A buffer of ``kind`` after ``adds`` add calls of 15 items (some sampling in between)."""
    kw, make_items = KINDS[kind]
    buf = ReplayBuffer(CAP, seed=seed, **kw)
    for a in range(adds):
        batch = make_items(start + 100 * a, 15)
        if "task" in batch and kind != "ragged_recency":
            batch["task"] = torch.full((15,), a % 4, dtype=torch.int64)
        buf.add(batch, priority=torch.rand(15, generator=torch.Generator().manual_seed(a)) + 0.1)
        buf.sample(4)
    return buf


def snapshot(buf):
    state = buf.state_dict()
    cfg = json.loads(json.dumps(state.pop("config")))
    return {k: v.clone() for k, v in state.items()}, cfg, (buf.size, buf.cursor, buf.step, buf.rng_offset)


def assert_unchanged(buf, snap):
    tensors, cfg, counters = snapshot(buf)
    assert cfg == snap[1] and counters == snap[2]
    assert set(tensors) == set(snap[0])
    for k, v in snap[0].items():
        assert torch.equal(tensors[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def source_state(kind):
    """A valid state different from the target's (more items, other values), to corrupt."""
    state = make(kind, adds=2, seed=3, start=7000).state_dict()  # 30 items in 40 slots: empty slots exist
    return {k: (v.clone() if isinstance(v, torch.Tensor) else json.loads(json.dumps(v))) for k, v in state.items()}


def counters(s, i, value):
    s["counters"][i] = value


def setitem(name, index, value):
    def f(s):
        s[name][index] = value
    return f


def add_to(name, index, delta):
    def f(s):
        s[name][index] += delta
    return f


def config(key, value):
    def f(s):
        s["config"][key] = value
    return f


def replace(name, fn):
    def f(s):
        s[name] = fn(s[name])
    return f


NAN, INF = float("nan"), float("inf")
# (kinds it applies to, id, corruption, message pattern); slot 0 is stored, slot 35 is empty (size 30)
ALL = tuple(KINDS)
CORRUPTIONS = [
    (ALL, "size_1e6", lambda s: counters(s, 0, 10**6), "size must be min"),
    (ALL, "size_negative", lambda s: counters(s, 0, -1), "counter size"),
    (ALL, "size_not_min_cursor", lambda s: counters(s, 0, 29), "size must be min"),
    (ALL, "cursor_2_62", lambda s: counters(s, 1, 2**62), "counter cursor"),
    (ALL, "cursor_below_size", lambda s: counters(s, 1, 10), "size must be min"),
    (ALL, "step_above_cursor", lambda s: counters(s, 2, 31), "step"),
    (ALL, "step_zero", lambda s: counters(s, 2, 0), "step"),
    (ALL, "rng_offset_negative", lambda s: counters(s, 3, -5), "rng_offset"),
    (ALL, "counters_short", replace("counters", lambda t: t[:3]), "'counters' must be"),
    (ALL, "counters_float", replace("counters", lambda t: t.double()), "'counters' must be"),
    (ALL, "unknown_entry", lambda s: s.update(extra=torch.zeros(1)), "unknown entries"),
    (ALL, "entry_not_tensor", replace("priorities", lambda t: t.tolist()), "'priorities' must be"),
    (ALL, "priorities_wrong_dtype", replace("priorities", lambda t: t.double()), "'priorities' must be"),
    (ALL, "groups_wrong_shape", replace("groups", lambda t: t[:-1]), "'groups' must be"),
    (ALL, "task_last_wrong_shape", replace("task_last", lambda t: torch.cat([t, t])), "'task_last' must be"),
    (ALL, "block_stats_wrong_shape", replace("block_stats", lambda t: t[:1]), "'block_stats' must be"),
    (ALL, "priority_nan", setitem("priorities", 0, NAN), "priorities must be finite"),
    (ALL, "priority_inf", setitem("priorities", 0, INF), "priorities must be finite"),
    (ALL, "priority_negative", setitem("priorities", 0, -1.0), "priorities must be finite and >= 0"),
    (ALL, "priority_of_empty_slot", setitem("priorities", 35, 1.0), "priorities of empty slots"),
    (ALL, "weight_nan", setitem("weights", 0, NAN), "weights must be finite"),
    (ALL, "weight_of_empty_slot", setitem("weights", 35, 1.0), "weights of empty slots"),
    (ALL, "max_priority_inf", setitem("max_priority", 0, INF), "max_priority"),
    (ALL, "max_priority_nan", setitem("max_priority", 0, NAN), "max_priority"),
    (ALL, "block_sum_off", add_to("block_stats", (0, 0), 0.5), "block_stats"),
    (ALL, "block_min_nan", setitem("block_stats", (1, 0), NAN), "block_stats"),
    (ALL, "generation_beyond_cursor", setitem("generations", 0, 10**6), "generations"),
    (ALL, "generation_negative", setitem("generations", 0, -1), "generations"),
    (ALL, "generation_of_empty_slot", setitem("generations", 35, 3), "generations of empty slots"),
    (ALL, "stamp_at_step", lambda s: s["stamps"].__setitem__(0, int(s["counters"][2])), "stamps"),
    (ALL, "stamp_negative", setitem("stamps", 0, -1), "stamps"),
    (ALL, "stamp_of_empty_slot", setitem("stamps", 35, 1), "stamps"),
    (ALL, "task_last_at_step", lambda s: s["task_last"].__setitem__(0, int(s["counters"][2])), "task_last"),
    (ALL, "task_last_below_minus_1", setitem("task_last", 0, -2), "task_last"),
    (ALL, "key_of_fifo_or_empty_slot", setitem("keys", 35, 0.5), "keys"),
    (ALL, "config_beta_inf", config("beta", INF), "beta"),
    (ALL, "config_beta_nan", config("beta", NAN), "beta"),
    (ALL, "config_beta_negative", config("beta", -0.5), "beta"),
    (ALL, "config_capacity", config("capacity", 10**6), "configuration in .*capacity"),
    (ALL, "config_max_tasks", config("max_tasks", 2), "configuration in .*max_tasks"),
    (ALL, "config_extra_key", config("surprise", 1), "configuration in .*surprise"),
    (("per_reservoir",), "key_nan", setitem("keys", 0, NAN), "keys"),
    (("per_reservoir",), "key_above_1", setitem("keys", 0, 2.0), "keys"),
    (("per_reservoir",), "generation_duplicate", lambda s: s["generations"].__setitem__(0, int(s["generations"][1])),
     "distinct"),
    (("power_law_fifo",), "fifo_generation_moved", add_to("generations", 0, 1), "FIFO generations"),
    (("power_law_fifo",), "fifo_generations_swapped",
     lambda s: s["generations"][:2].copy_(s["generations"][:2].flip(0)), "FIFO generations"),
    (("power_law_fifo",), "task_id_at_max_tasks", setitem("storage.task", 0, 4), "task ids"),
    (("power_law_fifo",), "task_id_negative", setitem("storage.task", 0, -1), "task ids"),
    (("power_law_fifo",), "storage_wrong_shape", replace("storage.obs", lambda t: torch.zeros(CAP, L + 1)),
     "'storage.obs' must be"),
    (("power_law_fifo",), "storage_wrong_dtype", replace("storage.id", lambda t: t.double()), "'storage.id' must be"),
    (("ragged_recency",), "length_above_L", setitem("storage.length", 0, L + 1), "lengths"),
    (("ragged_recency",), "length_negative", setitem("storage.length", 0, -1), "lengths"),
]
CASES = [pytest.param(kind, fn, pattern, id=f"{kind}-{name}")
         for kinds, name, fn, pattern in CORRUPTIONS for kind in kinds]
MISSING = [pytest.param(kind, key, id=f"{kind}-{key}") for kind in KINDS for key in source_state(kind)]


def write(path, state):
    from safetensors.torch import save_file

    state = dict(state)
    cfg = state.pop("config")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"trainops.replay": json.dumps(cfg)})


@pytest.mark.parametrize("kind,corrupt,pattern", CASES)
def test_bad_state_is_refused_and_changes_nothing(kind, corrupt, pattern):
    state = source_state(kind)
    target = make(kind, adds=1)
    target.load_state_dict({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    target.load_state_dict(make(kind, adds=1).state_dict())  # the valid state loads (and back)
    corrupt(state)
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError), match=pattern):
        target.load_state_dict(state)
    assert_unchanged(target, before)


@pytest.mark.parametrize("kind,corrupt,pattern", [c for c in CASES if "entry_not_tensor" not in c.id])
def test_bad_file_is_refused_and_changes_nothing(tmp_path, kind, corrupt, pattern):
    state = source_state(kind)
    corrupt(state)
    path = tmp_path / "bad.safetensors"
    write(path, state)
    target = make(kind, adds=1)
    before = snapshot(target)
    for load_into in (target.load, target.load_state_file):  # load: the old name, either way
        with pytest.raises((ValueError, TypeError), match=pattern):
            load_into(path)
        assert_unchanged(target, before)
    for load_new in (ReplayBuffer.load, ReplayBuffer.from_file):
        with pytest.raises((ValueError, TypeError)):
            load_new(path)


@pytest.mark.parametrize("kind,key", MISSING)
def test_missing_entry_is_refused_and_changes_nothing(tmp_path, kind, key):
    state = source_state(kind)
    del state[key]
    target = make(kind, adds=1)
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError), match="missing|must be a dict"):
        target.load_state_dict(state)
    assert_unchanged(target, before)


def test_valid_round_trip_through_file_is_exact(tmp_path):
    for kind in KINDS:
        src = make(kind, adds=5, start=500)  # wrapped around (75 items in 40 slots)
        path = tmp_path / f"{kind}.safetensors"
        src.save(path)
        saved = snapshot(src)
        expected = src.sample(8)
        loads = (ReplayBuffer.from_file(path), make(kind, adds=1).load_state_file(path),
                 ReplayBuffer.load(path), make(kind, adds=1).load(path))
        for loaded in loads:
            assert_unchanged(loaded, saved)
            got = loaded.sample(8)
            assert torch.equal(got.indices, expected.indices) and torch.equal(got.weights, expected.weights)


def test_files_are_safetensors_only(tmp_path):
    buf = make("per_reservoir", adds=2)
    before = snapshot(buf)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        buf.save(tmp_path / "buf.pt")
    assert not (tmp_path / "buf.pt").exists()
    torch.save({"tensors": {}, "config": "{}"}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        buf.load(tmp_path / "pickle.pt")
    # a pickle file renamed, a truncated file, no or bad metadata: refused, nothing unpickled
    torch.save({"tensors": {}, "config": "{}"}, tmp_path / "pickle.safetensors")
    good = tmp_path / "good.safetensors"
    buf.save(good)
    raw = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "nometa.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "badjson.safetensors"), metadata={"trainops.replay": "{nope"})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "otherformat.safetensors"),
              metadata={"trainops.replay": json.dumps({"format": "something/9"})})
    for name in ("pickle", "truncated", "nometa", "badjson", "otherformat"):
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(ValueError, match="not a (readable )?trainops replay buffer file"):
            buf.load(path)
        with pytest.raises(ValueError, match="not a (readable )?trainops replay buffer file"):
            ReplayBuffer.load(path)
    assert_unchanged(buf, before)


@pytest.mark.parametrize("key,value,pattern", [
    ("capacity", 2**31 - 1, "'storage.obs' must be"),  # the file's tensors are checked before allocating
    ("max_tasks", 2**31 - 1, "'task_last' must be"),
    ("capacity", "40", "capacity must be an int"),
    ("spec", {"obs": [["6"], "float32"]}, "saved spec"),
    ("spec", {"obs": [[6], "Tensor"]}, "unknown dtype"),
    ("spec", "obs", "saved spec"),
    ("alpha", None, "alpha must be a number"),
    ("ragged", ["tokens"], "ragged"),
    ("sampler", "lifo", "sampler"),
])
def test_bad_config_in_file_for_a_new_buffer(tmp_path, key, value, pattern):
    state = source_state("power_law_fifo")
    state["config"][key] = value
    path = tmp_path / "bad.safetensors"
    write(path, state)
    with pytest.raises((ValueError, TypeError), match=pattern):
        ReplayBuffer.load(path)
    state = source_state("power_law_fifo")
    del state["config"]["seed"]
    write(path, state)
    with pytest.raises(ValueError, match="missing"):
        ReplayBuffer.load(path)


def stored_only_state(kind):
    """A valid stored-only state (per-slot entries: the 30 stored rows of 40 slots) to corrupt."""
    state = make(kind, adds=2, seed=3, start=7000).state_dict(stored_only=True)
    return {k: (v.clone() if isinstance(v, torch.Tensor) else json.loads(json.dumps(v))) for k, v in state.items()}


@pytest.mark.parametrize("corrupt,pattern", [
    (replace("storage.obs", lambda t: t[:-1]), "'storage.obs' must be"),                 # fewer rows than size
    (replace("priorities", lambda t: torch.cat([t, torch.zeros(1)])), "'priorities' must be"),
    (lambda s: counters(s, 0, 29), "'storage.obs' must be"),                               # size no longer fits
    (add_to("block_stats", (0, 1), 0.5), "block_stats"),                                  # a block past the rows
    (setitem("block_stats", (1, 1), 1.0), "block_stats"),
    (setitem("generations", 0, -1), "generations"),
    (setitem("weights", 0, NAN), "weights must be finite"),
])
def test_bad_stored_only_file_is_refused_and_changes_nothing(tmp_path, corrupt, pattern):
    state = stored_only_state("power_law_fifo")
    assert state["generations"].shape == (30,)
    corrupt(state)
    path = tmp_path / "bad.safetensors"
    write(path, state)
    target = make("power_law_fifo", adds=1)
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError), match=pattern):
        target.load(path)
    assert_unchanged(target, before)
    with pytest.raises((ValueError, TypeError), match=pattern):
        ReplayBuffer.load(path)


def test_saved_files_hold_the_stored_rows_and_load_as_whole_capacity_states(tmp_path):
    from safetensors import safe_open

    for kind in KINDS:
        src = make(kind, adds=2, start=300)  # 30 items in 40 slots
        path = tmp_path / f"{kind}.safetensors"
        src.save(path)
        with safe_open(str(path), framework="pt") as f:
            assert f.get_slice("generations").get_shape() == [30] and f.get_slice("block_stats").get_shape()[0] == 2
        loaded = ReplayBuffer.load(path)
        assert_unchanged(loaded, snapshot(src))  # empty slots back at their empty values
        write(tmp_path / "full.safetensors", src.state_dict())  # whole-capacity files still load
        assert_unchanged(ReplayBuffer.load(tmp_path / "full.safetensors"), snapshot(src))
