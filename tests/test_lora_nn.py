"""trainops.nn.LoRALinear (plain LoRA, the baseline of MoRA) and the Linear replacement walk
shared by apply_mora and the runtime's --adapter lora."""
import pytest
import torch
from torch import nn

from trainops.nn import LoRALinear
from trainops.nn._replace import module_matcher, replace_linears


def test_lora_linear_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, scaling=0.5)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + (x @ layer.lora_A.T) @ layer.lora_B.T * 0.5
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in base.parameters())
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)


def test_lora_linear_takes_the_base_dtype():
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.float64), rank=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64


@pytest.mark.parametrize("kw, error, word", [
    (dict(rank=0), ValueError, "rank"), (dict(rank=True), TypeError, "rank"), (dict(rank=2.0), TypeError, "rank"),
    (dict(rank=2, scaling=float("nan")), ValueError, "scaling"), (dict(rank=2, scaling="1"), TypeError, "scaling"),
])
def test_lora_linear_refuses_bad_arguments(kw, error, word):
    with pytest.raises(error, match=word):
        LoRALinear(nn.Linear(4, 4), **kw)
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=2)


def _net():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    net[2].eval()
    return net


def test_replace_linears_swaps_matches_freezes_the_rest_and_keeps_the_mode():
    net = _net()
    keep = {id(net[2][0].bias)}
    replace_linears(net, module_matcher(r"0|2\.1"), lambda lin: LoRALinear(lin, 2), no_match="none",
                    keep_trainable=keep)
    assert isinstance(net[0], LoRALinear) and isinstance(net[2][1], LoRALinear)
    assert type(net[2][0]) is nn.Linear  # a full match on the qualified name: "2.0" is not "0"
    assert not net[2][1].training and net[0].training
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.0.bias", "2.1.lora_A", "2.1.lora_B"}


def test_replace_linears_without_a_match_changes_nothing():
    net = _net()
    before = [(n, type(m)) for n, m in net.named_modules()]
    with pytest.raises(ValueError, match="^adapter_targets='x' matched no nn.Linear$"):
        replace_linears(net, module_matcher(r"(.*\.)?(x)"), lambda lin: LoRALinear(lin, 2),
                        no_match="adapter_targets='x' matched no nn.Linear")
    assert [(n, type(m)) for n, m in net.named_modules()] == before
    assert all(p.requires_grad for p in net.parameters())


def test_module_matcher():
    regex = module_matcher(r"(.*\.)?(q|v)")
    assert regex("q") and regex("blocks.0.attn.v") and not regex("blocks.0.attn.vq")
    names = module_matcher(["q_proj"])
    assert names("layers.1.q_proj") and names("q_proj") and not names("layers.1.k_proj")
    for bad in ([], [1], 3, None):
        with pytest.raises(TypeError, match="target_modules"):
            module_matcher(bad)
