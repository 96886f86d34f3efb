"""MoRA save and load that carry the settings: mora_state_dict/load_mora_state_dict and
save_mora/load_mora round trips bit for bit, a mismatching model refused by setting name, a
fresh base model built from the saved config, files without config, and Hugging Face
save_pretrained/from_pretrained keeping the base weights of a model with MoRA applied."""
import json

import pytest
import torch
from torch import nn

from trainops.nn import add_task, apply_mora, load_mora_state_dict, mora_modules, mora_state_dict
from trainops.nn.mora import CONFIG_KEY, MoRALinear, load_mora, mora_config, save_mora

KW = dict(rank=3, top_k=2, temperature=0.1, threshold=0.05, scaling=1.5)


def base_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).eval()


def trained(seed=0, **kw):
    """A model with MoRA on both Linears, two tasks, random adapter values (B nonzero)."""
    model = apply_mora(base_model(seed), ["0", "2"], **{**KW, **kw})
    for _, m in mora_modules(model):
        nn.init.normal_(m.lora_B)
    add_task(model, rank=2)
    for _, m in mora_modules(model):
        nn.init.normal_(m.lora_B)
        nn.init.normal_(m.lora_A)
    return model


def test_state_dict_round_trip_onto_fresh_base_without_arguments():
    src = trained()
    x = torch.randn(7, 6)
    sd = mora_state_dict(src)
    cfg = json.loads(bytes(sd[CONFIG_KEY].tolist()))
    assert cfg["layers"]["0"]["top_k"] == 2 and cfg["layers"]["2"]["task_ranks"] == [3, 2]
    fresh = base_model(0)  # same base weights, no MoRA: the saved config builds the layers
    load_mora_state_dict(fresh, sd)
    assert [type(m) for m in (fresh[0], fresh[2])] == [MoRALinear, MoRALinear]
    assert mora_config(fresh) == mora_config(src)
    assert torch.equal(fresh(x), src(x))
    for (_, a), (_, b) in zip(mora_modules(fresh), mora_modules(src)):
        for k, v in b.adapter_state_dict().items():
            assert torch.equal(a.adapter_state_dict()[k], v), k
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
        ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


def test_torch_save_weights_only_keeps_the_config(tmp_path):
    src = trained()
    torch.save(mora_state_dict(src), tmp_path / "a.pt")
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    fresh = load_mora_state_dict(base_model(0), sd)
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), src(x))


@pytest.mark.parametrize("setting,value", [("top_k", 3), ("temperature", 0.2), ("threshold", 0.0),
                                           ("scaling", 1.0), ("dropout", 0.1), ("rank", 4)])
def test_mismatching_setting_is_refused_by_name(setting, value):
    sd = mora_state_dict(trained())
    target = apply_mora(base_model(1), ["0", "2"], **{**KW, setting: value})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"MoRA layer '0': {setting} is .* in the model but .* in the saved"):
        load_mora_state_dict(target, sd)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_save_mora_safetensors_round_trip_and_metadata(tmp_path):
    from safetensors import safe_open

    src = trained()
    save_mora(src, tmp_path / "adapter.safetensors")
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert CONFIG_KEY not in f.keys()
    assert json.loads(meta["mora_config"]) == mora_config(src)
    x = torch.randn(5, 6)
    fresh = load_mora(base_model(0), tmp_path / "adapter.safetensors")
    assert torch.equal(fresh(x), src(x))
    same = load_mora(apply_mora(base_model(0), ["0", "2"], **KW), tmp_path / "adapter.safetensors")
    assert torch.equal(same(x), src(x))
    with pytest.raises(ValueError, match="top_k"):
        load_mora(apply_mora(base_model(0), ["0", "2"], **{**KW, "top_k": 5}), tmp_path / "adapter.safetensors")


def test_fresh_model_refusals_leave_it_unchanged():
    sd = mora_state_dict(trained())
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Conv1d(8, 5, 1))  # "2" is not a Linear
    with pytest.raises(TypeError, match="'2' is a Conv1d"):
        load_mora_state_dict(model, sd)
    assert isinstance(model[0], nn.Linear) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(KeyError, match="'2' is not a module"):
        load_mora_state_dict(nn.Sequential(nn.Linear(6, 8)), sd)
    bad = dict(sd)
    bad["2.lora_A"] = bad["2.lora_A"][:1]  # layer "0" would load before "2" fails
    model = base_model(0)
    with pytest.raises(ValueError, match="2.lora_A must be"):
        load_mora_state_dict(model, bad)
    assert isinstance(model[0], nn.Linear) and all(p.requires_grad for p in model.parameters())


def test_bad_config_entries_are_clear_errors():
    sd = mora_state_dict(trained())
    for value, pattern in [(torch.zeros(3), "uint8"), (torch.tensor(list(b"{nope"), dtype=torch.uint8), "JSON"),
                           (torch.tensor(list(b'{"format": "x"}'), dtype=torch.uint8), "config")]:
        with pytest.raises(ValueError, match=pattern):
            load_mora_state_dict(base_model(0), {**sd, CONFIG_KEY: value})
    def with_config(cfg):
        return {**sd, CONFIG_KEY: torch.tensor(list(json.dumps(cfg).encode()), dtype=torch.uint8)}

    cfg = json.loads(bytes(sd[CONFIG_KEY].tolist()))
    cfg["layers"]["0"]["top_k"] = 0  # a hostile value goes through the constructor's checks
    with pytest.raises(ValueError, match="top_k"):
        load_mora_state_dict(base_model(0), with_config(cfg))
    cfg = json.loads(bytes(sd[CONFIG_KEY].tolist()))
    cfg["layers"][""] = cfg["layers"]["0"]  # the root module is no layer to wrap
    with pytest.raises(KeyError, match="not a submodule name"):
        load_mora_state_dict(base_model(0), with_config(cfg))
    cfg["version"] = 2
    with pytest.raises(ValueError, match="version 2"):
        load_mora_state_dict(base_model(0), with_config(cfg))


def test_state_without_config_loads_as_before_with_a_warning():
    src = trained()
    sd = mora_state_dict(src, config=False)
    assert CONFIG_KEY not in sd
    target = apply_mora(base_model(0), ["0", "2"], **KW)
    with pytest.warns(UserWarning, match="no config"):
        load_mora_state_dict(target, sd)
    x = torch.randn(3, 6)
    assert torch.equal(target(x), src(x))


def test_module_state_dict_keeps_base_names_and_reads_old_ones():
    m = MoRALinear(nn.Linear(4, 3), rank=2)
    sd = m.state_dict()
    assert "weight" in sd and "bias" in sd and not any(k.startswith("base.") for k in sd)
    old = {("base." + k if k in ("weight", "bias") else k): v for k, v in sd.items()}  # earlier trainops
    other = MoRALinear(nn.Linear(4, 3), rank=2)
    other.load_state_dict(old)
    assert torch.equal(other.base.weight, m.base.weight) and torch.equal(other.base.bias, m.base.bias)
    plain = nn.Linear(4, 3)
    plain.load_state_dict({k: v for k, v in sd.items() if k in ("weight", "bias")})  # the model without MoRA
    assert torch.equal(plain.weight, m.base.weight)


def tiny_llama():
    transformers = pytest.importorskip("transformers")  # in the `test` extra
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_save_pretrained_keeps_base_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = apply_mora(tiny_llama(), ["q_proj", "v_proj"], rank=4, top_k=2)
    for _, m in mora_modules(model):
        nn.init.normal_(m.lora_B)
    ids = torch.randint(0, 64, (2, 7))
    logits = model(ids).logits
    model.save_pretrained(tmp_path / "full")
    save_mora(model, tmp_path / "adapter.safetensors")
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.rsplit(".", 1)[-1] in ("frozen_A", "frozen_B", "lora_A", "lora_B", "task_ranks")
               for k in info["unexpected_keys"])
    want = {n: p for n, p in model.named_parameters()}
    for name, p in loaded.named_parameters():  # every base weight, the MoRA-wrapped ones included
        src = want.get(name) if name in want else want[name.replace("_proj.", "_proj.base.")]
        assert torch.equal(p, src), name
    load_mora(loaded.eval(), tmp_path / "adapter.safetensors")
    assert torch.equal(loaded(ids).logits, logits)
