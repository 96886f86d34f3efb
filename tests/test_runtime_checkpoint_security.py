"""Checkpoints are written and read without pickle (safetensors + JSON), round-trip exactly,
are confined to their folder and verified (sha256 per file) before any state is used."""
import collections
import hashlib
import json
import os
import pickle
import struct
import subprocess

import pytest
import torch

from trainops.runtime.checkpoint import (CheckpointError, flatten_state, load_checkpoint, rank_file, read_pointer,
                                         save_checkpoint, state_from_bytes, state_to_bytes, unflatten_state,
                                         verify_checkpoint)


def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_identical(a, b, path="state"):
    """Same structure, same Python types (int vs float, tuple vs list, dict key types and
    order), tensors equal bit for bit with the same dtype, shape and device type."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device.type) == (b.dtype, b.shape, b.device.type), path
        assert torch.equal(_bits(a), _bits(b)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        assert [type(k) for k in a] == [type(k) for k in b], path
        for k in a:
            assert_identical(a[k], b[k], f"{path}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path
        if isinstance(a, float):
            assert struct.pack("<d", a) == struct.pack("<d", b), path  # -0.0 stays -0.0


def _roundtrip(state):
    out = state_from_bytes(state_to_bytes(state))
    assert_identical(state, out)
    tensors, skeleton = flatten_state(state)
    json.dumps(skeleton, allow_nan=False)  # strict JSON
    assert_identical(state, unflatten_state(tensors, skeleton))
    return out


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
          torch.uint64, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_dtypes_shapes_bits(dtype):
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (3 * 5 * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw & 1  # a bool byte is 0 or 1
    x = raw.view(dtype).reshape(3, 5)  # random bit patterns, NaN payloads included
    state = {"x": x, "t": x.t(), "row": x[1], "scalar": x[0, 0].clone(), "empty": x[:0], "e3": x.new_empty(0, 2, 0)}
    _roundtrip(state)


def test_floats_ints_keys_tuples_and_order():
    state = {
        "ints": [0, -1, 2**70, True, False], "floats": [1.0, -0.0, 1e-310, 0.1, float("inf"), float("-inf"),
                                                    float("nan"), 2.0 ** 70],
        "int_keys": {3: "c", 1: "a", 2: {"b": None}}, "mixed": {1: 1, "1": 1.0, None: (), (1, 2): [(), []]},
        "tuples": (0.9, 0.999), "nested": [(1, (2.5, [3, {"k": (True,)}]))], "empty": [{}, [], ()],
        "__trainops__": "a user key that looks like the skeleton's tag", "text": "ünïcode \u0000 \n",
        "bytes": b"\x00\xff", "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "device": torch.device("cpu"),
        "z": 1, "a": 2,  # key order kept
    }
    out = _roundtrip(state)
    assert list(out["int_keys"]) == [3, 1, 2]
    assert isinstance(out["ints"][2], int) and isinstance(out["floats"][0], float)


def test_shared_and_aliased_tensors_are_stored_separately():
    base = torch.arange(12.0)
    state = {"a": base, "b": base, "view": base[2:5], "strided": base[::3]}
    out = _roundtrip(state)
    out["a"][0] = 100.0
    assert out["b"][0] == 0.0


def test_model_optimizer_rng_replay_state_dicts_round_trip_and_load():
    from trainops.replay import ReplayBuffer
    from trainops.runtime.config import TrainConfig
    from trainops.runtime.domains import VOCAB
    from trainops.runtime.model import MoETransformer, apply_adapter

    torch.manual_seed(0)
    cfg = TrainConfig(d_model=16, n_heads=2, n_layers=1, ffn_size=16, seq_len=12)
    model = MoETransformer(cfg, VOCAB)
    apply_adapter(model, cfg, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        logits, aux = model(torch.randint(0, VOCAB, (2, 12)))
        (logits.float().pow(2).mean() + aux).backward()
        opt.step()
        opt.zero_grad()
    buf = ReplayBuffer(16, {"tokens": ((12,), torch.int64), "task": ((), torch.int64)}, sampler="power_law",
                       eviction="fifo", seed=3, max_tasks=2)
    buf.add({"tokens": torch.randint(0, 9, (10, 12)), "task": torch.zeros(10, dtype=torch.int64)})
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
             "replay": buf.state_dict(), "world_size": 2, "phase": 1, "step": 3}
    out = _roundtrip(state)
    assert all(isinstance(k, int) for k in out["optimizer"]["state"])
    assert isinstance(out["optimizer"]["param_groups"][0]["betas"], tuple)
    assert type(out["model"]._metadata) is type(state["model"]._metadata)  # noqa: E721
    # the restored state dicts load into fresh objects and behave the same
    opt2 = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    opt2.load_state_dict(out["optimizer"])
    assert_identical(opt.state_dict(), opt2.state_dict())
    buf2 = ReplayBuffer(16, {"tokens": ((12,), torch.int64), "task": ((), torch.int64)}, sampler="power_law",
                        eviction="fifo", seed=3, max_tasks=2)
    buf2.load_state_dict(out["replay"])
    assert torch.equal(buf.sample(4).indices, buf2.sample(4).indices)
    torch.set_rng_state(out["rng"])
    a = torch.rand(3)
    torch.set_rng_state(state["rng"])
    assert torch.equal(a, torch.rand(3))


@pytest.mark.gpu
def test_cuda_tensors_come_back_on_cuda():
    x = torch.randn(5, 7, device="cuda").t()
    state = {"a": x, "opt": {0: {"step": torch.tensor(3.0, device="cuda")}}, "cpu": torch.arange(3)}
    out = state_from_bytes(state_to_bytes(state))
    assert out["a"].device.type == "cuda" and torch.equal(out["a"], x) and out["cpu"].device.type == "cpu"
    assert out["opt"][0]["step"].device.type == "cuda"
    assert state_from_bytes(state_to_bytes(state), device=None)["a"].device.type == "cpu"


@pytest.mark.parametrize("bad, where", [
    ({"x": {1, 2}}, "state/x"), ({"m": [object()]}, "state/m/0"), ({"f": lambda: 0}, "state/f"),
    ({"s": torch.zeros(2).to_sparse()}, "state/s"),
])
def test_unsupported_values_are_named(bad, where):
    with pytest.raises(TypeError, match=f"^{where}: cannot store"):
        flatten_state(bad)


# --------------------------------------------------------------------------------------------
# save / verify / load

def _state(world, rank, step):
    return {"world_size": world, "step": step, "rank": rank, "w": torch.full((64, 64), float(step + rank)),
            "opt": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"betas": (0.9, 0.99)}]}}


def _save(root, step, world=2, final=False):
    for rank in reversed(range(world)):  # rank 0 last: it writes the manifest after the barrier
        save_checkpoint(root, step, rank, _state(world, rank, step), lambda: None, final=final)


def _pointer(root):
    return json.load(open(os.path.join(root, "latest.json")))


def test_save_layout_manifest_and_load(tmp_path):
    root = str(tmp_path)
    _save(root, 3)
    _save(root, 5)
    assert sorted(os.listdir(root)) == ["latest.json", "step-5"]
    assert sorted(os.listdir(tmp_path / "step-5")) == ["manifest.json", "rank0.safetensors", "rank1.safetensors"]
    man = json.load(open(tmp_path / "step-5" / "manifest.json"))
    for r in range(2):
        data = open(tmp_path / "step-5" / rank_file(r), "rb").read()
        assert man["files"][rank_file(r)] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert verify_checkpoint(root, 2)["step"] == 5
    for r in range(2):
        assert_identical(load_checkpoint(root, r, 2), _state(2, r, 5))
    with pytest.raises(Exception, match="written by 2 workers, this run has 3"):
        load_checkpoint(root, 0, 3)


def test_flipped_bytes_are_detected_naming_the_file(tmp_path):
    root = str(tmp_path)
    _save(root, 4)
    path = tmp_path / "step-4" / "rank1.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(64):  # 64 flipped bytes in the tensor payload
        data[-1 - 97 * i] ^= 0xFF
    path.write_bytes(bytes(data))
    for fn in (lambda: verify_checkpoint(root), lambda: load_checkpoint(root, 1, 2)):
        with pytest.raises(CheckpointError, match=r"step-4/rank1.safetensors does not match its sha256") as e:
            fn()
        assert "\n" not in str(e.value)
    load_checkpoint(root, 0, 2)  # the intact file still loads


def test_truncated_missing_and_tampered_files(tmp_path):
    root = str(tmp_path)
    _save(root, 4)
    step = tmp_path / "step-4"
    good = (step / "rank0.safetensors").read_bytes()
    (step / "rank0.safetensors").write_bytes(good[:len(good) // 2])
    with pytest.raises(CheckpointError, match=r"rank0.safetensors has \d+ bytes, the manifest says \d+"):
        verify_checkpoint(root)
    (step / "rank0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rank0.safetensors is missing"):
        verify_checkpoint(root)
    (step / "rank0.safetensors").write_bytes(good)
    verify_checkpoint(root)
    man = (step / "manifest.json").read_text()
    (step / "manifest.json").write_text(man.replace('"bytes": ', '"bytes": 1'))
    with pytest.raises(CheckpointError, match="manifest.json does not match the digest in latest.json"):
        verify_checkpoint(root)
    (step / "manifest.json").write_text(man)
    (tmp_path / "latest.json").write_text('{"step": 4, "dir": "ste')
    with pytest.raises(CheckpointError, match="latest.json is not valid JSON"):
        verify_checkpoint(root)


def _rewrite_digests(root, name, rank):
    """What an attacker who can write the folder does: make manifest and pointer match a new file."""
    meta = _pointer(root)
    step = os.path.join(root, meta["dir"])
    man = json.load(open(os.path.join(step, "manifest.json")))
    data = open(os.path.join(step, name), "rb").read()
    man["files"][rank_file(rank)] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    text = json.dumps(man)
    open(os.path.join(step, "manifest.json"), "w").write(text)
    meta["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    json.dump(meta, open(os.path.join(root, "latest.json"), "w"))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fix_digests", [False, True])
def test_pickle_payload_is_never_unpickled(tmp_path, fix_digests):
    root, marker = str(tmp_path / "ckpt"), tmp_path / "pwned"
    _save(root, 2)
    payload = pickle.dumps({"model": _RunsCode(marker)})
    torch_payload = tmp_path / "evil.pt"
    torch.save({"x": _RunsCode(marker)}, torch_payload)
    for data in (payload, torch_payload.read_bytes()):
        with open(os.path.join(root, "step-2", "rank0.safetensors"), "wb") as fh:
            fh.write(data)
        if fix_digests:
            _rewrite_digests(root, "rank0.safetensors", 0)
        for fn in (lambda: verify_checkpoint(root), lambda: load_checkpoint(root, 0, 2)):
            with pytest.raises(CheckpointError, match="rank0.safetensors"):
                fn()
    assert not marker.exists()


def test_old_pickle_checkpoints_are_refused_without_loading(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "pwned"
    (root / "step-4").mkdir(parents=True)
    torch.save({"x": _RunsCode(marker)}, root / "step-4" / "rank0.pt")
    (root / "latest.json").write_text(json.dumps({"step": 4, "dir": "step-4", "final": False, "world_size": 1}))
    with pytest.raises(CheckpointError, match="older trainops as pickle"):
        load_checkpoint(str(root), 0, 1)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../elsewhere", "../outside-1", "/etc", "step-4/../../x", "step-4/", "step-x",
                                  "final-", "STEP-4", "step-4\n", 4, None])
def test_pointer_confined_to_checkpoint_folder(tmp_path, name):
    root = tmp_path / "run" / "checkpoint"
    _save(str(root), 4)
    meta = _pointer(str(root))
    meta["dir"] = name
    (root / "latest.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="only step-<N> or final-<N>"):
        load_checkpoint(str(root), 0, 2)


def test_symlinks_out_of_the_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    _save(str(outside), 4)
    root = tmp_path / "checkpoint"
    _save(str(root), 6)
    # the step directory a symlink to another folder (pointer, manifest and files all "valid")
    os.rename(root / "step-6", tmp_path / "moved")
    os.symlink(outside / "step-4", root / "step-4")
    meta = _pointer(str(outside))
    (root / "latest.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a real directory"):
        verify_checkpoint(str(root))
    # a rank file that is a symlink
    os.unlink(root / "step-4")
    os.rename(tmp_path / "moved", root / "step-6")
    (root / "latest.json").write_text(json.dumps(_pointer(str(outside)) | {"dir": "step-6", "step": 6}))
    _save(str(root), 6)
    os.rename(root / "step-6" / "rank1.safetensors", tmp_path / "r1")
    os.symlink(tmp_path / "r1", root / "step-6" / "rank1.safetensors")
    with pytest.raises(CheckpointError, match="rank1.safetensors is a symlink"):
        verify_checkpoint(str(root))
    # the pointer itself a symlink
    os.unlink(root / "step-6" / "rank1.safetensors")
    os.rename(tmp_path / "r1", root / "step-6" / "rank1.safetensors")
    verify_checkpoint(str(root))
    os.rename(root / "latest.json", tmp_path / "latest.json")
    os.symlink(tmp_path / "latest.json", root / "latest.json")
    with pytest.raises(CheckpointError, match="latest.json is a symlink"):
        read_pointer(str(root))


# --------------------------------------------------------------------------------------------
# disk full: a failed save leaves no temporary file and the previous checkpoint intact

@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (real ENOSPC), or None where it cannot be mounted (not root)."""
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _no_temporaries(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp" in f]


def test_disk_full_save_leaves_no_temporary_and_keeps_last_checkpoint(small_fs, tmp_path, monkeypatch):
    root = str(small_fs if small_fs is not None else tmp_path / "simulated")
    _save(root, 2)  # 2 x 16 KiB
    big = {"world_size": 1, "w": torch.zeros(512, 1024)}  # 2 MiB: does not fit in 1 MiB
    if small_fs is None:  # no tmpfs here: simulate the full disk at the write
        import builtins
        real_open = builtins.open

        class Full:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[:1000])
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(builtins, "open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k))
                            if "w" in m and ".tmp" in str(p) else real_open(p, m, *a, **k))
    with pytest.raises(OSError) as e:
        save_checkpoint(root, 4, 0, big, lambda: None)
    monkeypatch.undo()
    assert e.value.errno == 28
    assert _no_temporaries(root) == []
    assert verify_checkpoint(root)["step"] == 2
    assert_identical(load_checkpoint(root, 1, 2), _state(2, 1, 2))
