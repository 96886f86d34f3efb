"""MoRA as a PEFT method (trainops.integrations.peft): get_peft_model / save_pretrained /
PeftModel.from_pretrained round trips bit for bit, composition with PEFT LoRA on other layers
(both trainable, saved and loaded side by side), apply_mora on a PEFT model, clear refusals,
and that importing trainops does not import peft."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")  # in the `peft` and `test` extras
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

from trainops.integrations.peft import MoRAConfig, MoRALayer, add_mora_adapter, load_mora_adapter  # noqa: E402
from trainops.nn import add_task, apply_mora  # noqa: E402
from trainops.nn.mora import MoRAExperts, MoRALinear  # noqa: E402

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def randomize_mora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoRAExperts):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


def trainable(model):
    return sorted(n.split("layers.", 1)[-1] for n, p in model.named_parameters() if p.requires_grad)


def test_get_peft_model_save_and_from_pretrained_bit_for_bit(tmp_path):
    cfg = MoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, top_k=2, temperature=0.1, threshold=0.05)
    model = get_peft_model(tiny_llama(), cfg)
    assert trainable(model) == sorted(f"{i}.self_attn.{p}_proj.mora_experts.default.lora_{ab}"
                                      for i in (0, 1) for p in "qv" for ab in "AB")
    assert sum(isinstance(m, MoRALayer) for m in model.modules()) == 4
    randomize_mora(model)
    add_task(model, rank=3)  # trainops' helpers reach the MoRA adapters inside PEFT layers
    randomize_mora(model, 2)
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TRAINOPS_MORA"
    assert (saved["rank"], saved["top_k"], saved["temperature"], saved["threshold"]) == (4, 2, 0.1, 0.05)

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # same base weights (seed), fresh adapters
    assert isinstance(loaded.peft_config["default"], MoRAConfig) and trainable(loaded) == []
    assert torch.equal(loaded(IDS).logits, logits)
    want, got = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any(k.endswith("task_ranks") and v.tolist() == [4, 3] for k, v in got.items())
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable(resumed) == trainable(model)


def test_composes_with_lora_both_trainable_and_round_trip(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["v_proj"], r=2, init_lora_weights=False))
    add_mora_adapter(model, MoRAConfig(target_modules=["q_proj"], rank=4, top_k=2))
    names = trainable(model)
    assert {n.split(".", 2)[2].split(".")[0] for n in names} == {"q_proj", "v_proj"}
    assert len([n for n in names if ".mora_experts.mora." in n]) == 4
    assert len([n for n in names if ".lora_A.default." in n or ".lora_B.default." in n]) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # B starts at 0: A gets no gradient on the first step, B does, for LoRA and MoRA alike
    assert {n.split("layers.", 1)[1] for n in moved} == {
        f"{i}.self_attn.{x}" for i in (0, 1)
        for x in ("q_proj.mora_experts.mora.lora_B", "v_proj.lora_A.default.weight", "v_proj.lora_B.default.weight")}
    model.eval()
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    lora_file = peft.utils.load_peft_weights(str(tmp_path), device="cpu")
    mora_file = peft.utils.load_peft_weights(str(tmp_path / "mora"), device="cpu")
    assert lora_file and all("v_proj.lora_" in k for k in lora_file)
    assert mora_file and all("q_proj.mora_experts." in k for k in mora_file)

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    load_mora_adapter(loaded, tmp_path / "mora", is_trainable=True)
    loaded.eval()
    assert torch.equal(loaded(IDS).logits, logits)
    assert trainable(loaded) == names
    frozen = load_mora_adapter(PeftModel.from_pretrained(tiny_llama(), tmp_path), tmp_path / "mora")
    assert trainable(frozen) == []
    with pytest.raises(ValueError, match="already an adapter"):
        load_mora_adapter(frozen, tmp_path / "mora")


def test_apply_mora_on_a_peft_model_keeps_lora_trainable_and_refuses_wrapped_layers():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["v_proj"], r=2))
    lora = trainable(model)
    apply_mora(model, ["q_proj"], rank=2, top_k=2)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, MoRALinear)
    assert trainable(model) == sorted(lora + [f"{i}.self_attn.q_proj.lora_{ab}" for i in (0, 1) for ab in "AB"])
    for targets in (["v_proj"], r".*v_proj\.base_layer"):
        with pytest.raises(ValueError, match="PEFT has wrapped"):
            apply_mora(model, targets, rank=2)
    with pytest.raises(ValueError, match="already is a MoRA layer"):
        apply_mora(model, ["q_proj"], rank=2)
    assert trainable(model) == sorted(lora + [f"{i}.self_attn.q_proj.lora_{ab}" for i in (0, 1) for ab in "AB"])


def test_refusals_are_clear():
    with pytest.raises(ValueError, match="top_k"):
        MoRAConfig(target_modules=["q_proj"], top_k=0)
    with pytest.raises(TypeError, match="rank"):
        MoRAConfig(target_modules=["q_proj"], rank=2.5)
    with pytest.raises(ValueError, match="already is a trainops MoRALinear"):
        get_peft_model(apply_mora(tiny_llama(), ["q_proj"], rank=2), MoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="nn.Linear only"):
        get_peft_model(tiny_llama(), MoRAConfig(target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="MoRAConfig"):
        add_mora_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model = get_peft_model(tiny_llama(), MoRAConfig(target_modules=["q_proj"], rank=2))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear


def test_importing_trainops_does_not_import_peft():
    code = "import sys, trainops, trainops.nn, trainops.integrations; assert 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_bf16_model_adapters_upcast_with_their_frozen_bank(tmp_path):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), MoRAConfig(target_modules=["q_proj"], rank=2, top_k=2))
    randomize_mora(model)
    add_task(model)  # the trainable ranks (upcast to fp32 by PEFT) move into the frozen bank
    experts = [m for m in model.modules() if isinstance(m, MoRAExperts)]
    assert {(e.lora_A.dtype, e.frozen_A.dtype, e.frozen_B.dtype) for e in experts} == {(torch.float32,) * 3}
    logits = model(IDS).logits
    assert logits.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path)
    assert torch.equal(loaded(IDS).logits, logits)
