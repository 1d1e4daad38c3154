"""Every official architecture: key names, shapes, parameter counts, forward and backward."""
import pytest
import torch

import xcit
from xcit.models import MODELS


def test_fourteen_official_architectures():
    assert len(xcit.list_models()) == 14
    assert set(xcit.list_models("*_p16")) | set(xcit.list_models("*_p8")) == set(xcit.list_models())


@pytest.mark.parametrize("name", xcit.list_models())
def test_keys_shapes_and_parameter_count_match_official(name, official_layout):
    with torch.device("meta"):
        model = xcit.create_model(name)
    expected = official_layout[name]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s in expected["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"] == MODELS[name].num_params


@pytest.mark.parametrize("name", xcit.list_models())
def test_forward_backward_reaches_every_parameter(name):
    """Real numbers up to 50M parameters; medium/large run the same graph on the meta device.

    (The autograd graph is the same at every size; on meta it costs nothing, while a real
    backward of 189M parameters takes most of this suite's budget on a 2-core machine.)
    """
    torch.manual_seed(0)
    device = "meta" if MODELS[name].num_params > 50e6 else "cpu"
    with torch.device(device):
        model = xcit.create_model(name, num_classes=7).train()
        x = torch.randn(2, 3, 48, 40)  # small input keeps the big models cheap
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.shape != p.shape]
    assert missing == []
    if device == "cpu":
        assert torch.isfinite(out).all()
        dead = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
        assert dead == []


@pytest.mark.parametrize("name,eta,tokens_norm", [("xcit_nano_12_p16", 1.0, False), ("xcit_tiny_24_p8", 1e-5, True)])
def test_eta_and_tokens_norm_follow_the_official_family(name, eta, tokens_norm):
    model = xcit.create_model(name)
    for block in model.blocks:
        for gamma in (block.gamma1, block.gamma2, block.gamma3):
            assert torch.equal(gamma, torch.full_like(gamma, eta))
    for block in model.cls_attn_blocks:
        assert block.tokens_norm == tokens_norm
        assert torch.equal(block.gamma1, torch.full_like(block.gamma1, eta))


def test_drop_path_is_constant_across_blocks():
    model = xcit.create_model("xcit_nano_12_p16", drop_path_rate=0.1)
    assert {b.drop_path.rate for b in model.blocks} == {0.1}


@pytest.mark.parametrize("patch", [2, 4, 8, 16])
def test_any_power_of_two_patch_size(patch):
    model = xcit.create_model("xcit_nano_12_p16", patch_size=patch, depth=1, num_classes=3).eval()
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == patch.bit_length() - 1
    assert [c.out_channels for c in convs] == [128 // 2 ** i for i in reversed(range(len(convs)))]
    x = torch.randn(1, 3, 30, 17)
    tokens = model.forward_features(x)
    assert tokens.shape == (1, 1 + -(-30 // patch) * -(-17 // patch), 128)


@pytest.mark.parametrize("bad", [3, 6, 32, 1, 0])
def test_unsupported_patch_size_is_rejected(bad):
    with pytest.raises(ValueError, match="patch_size"):
        xcit.create_model("xcit_nano_12_p16", patch_size=bad)
