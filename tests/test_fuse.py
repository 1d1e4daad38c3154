"""``model.fuse()``: folded inference weights give the plain model's logits, refuse training, and
are undone by ``unfuse()`` or by reloading weights."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize, tiny_model
from xcit.models import create_model
from xcit.models import fastpath as fp
from xcit.models.fuse import is_fused


@pytest.fixture(scope="module")
def nano():
    return randomize(create_model("xcit_nano_12_p16"), seed=21).eval()


def _plain(model, x):
    with torch.no_grad(), fp.plain_path():
        return model(x)


@pytest.mark.parametrize("size", [(224, 224), (200, 173), (16, 64), (48, 16)])
def test_fused_logits_match_plain(nano, size):
    """Issue target: max |logit difference| <= 1e-4 (fp32), including 1-row / 1-column grids."""
    x = torch.randn(2, 3, *size)
    ref = _plain(nano, x)
    fused = copy.deepcopy(nano).fuse()
    with torch.no_grad():
        for fold in ("auto", "never", "always"):
            with fp.settings(fold=fold):
                assert (fused(x) - ref).abs().max().item() <= 1e-4, (size, fold)
        with fp.settings(onednn=False):
            assert (fused(x) - ref).abs().max().item() <= 1e-4


def test_fused_patch8_tokens_norm_model():
    m = randomize(create_model("xcit_tiny_12_p8"), seed=22).eval()
    x = torch.randn(2, 3, 72, 56)
    ref = _plain(m, x)
    with torch.no_grad():
        assert (m.fuse()(x) - ref).abs().max().item() <= 1e-4


def test_fuse_keeps_parameters_and_state_dict(nano):
    m = copy.deepcopy(nano)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.fuse()
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert is_fused(m) and not m.training


def test_fused_model_refuses_training(nano):
    m = copy.deepcopy(nano).fuse()
    m.train()
    with pytest.raises(RuntimeError, match="fused for inference"):
        m(torch.randn(2, 3, 32, 32))


def test_unfuse_and_reload_restore_the_plain_model(nano):
    x = torch.randn(2, 3, 32, 48)
    m = copy.deepcopy(nano).fuse()
    m.unfuse()
    assert not is_fused(m)
    m.train()
    m(x).sum().backward()  # trains again
    m2 = copy.deepcopy(nano).fuse()
    m2.load_state_dict(nano.state_dict())
    assert not is_fused(m2)
    m2.train()
    m2(x).sum().backward()
    # reloading other weights after fuse(): the model computes with the new weights
    other = randomize(create_model("xcit_nano_12_p16"), seed=23).eval()
    m3 = copy.deepcopy(nano).fuse()
    m3.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert (m3.eval()(x) - _plain(other, x)).abs().max().item() <= 1e-4


def test_fused_plain_path_is_the_plain_model(nano):
    x = torch.randn(1, 3, 32, 32)
    m = copy.deepcopy(nano).fuse()
    torch.testing.assert_close(_plain(m, x), _plain(nano, x), atol=0, rtol=0)


def test_fused_bf16_autocast_runs(nano):
    m = copy.deepcopy(nano).fuse()
    x = torch.randn(2, 3, 64, 64)
    ref = _plain(nano, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_compile_fullgraph_fused():
    """torch.compile(fullgraph=True) of a fused model (the unfused fast path: tests/test_compile.py)."""
    m = randomize(tiny_model(embed_dim=32, depth=1, num_heads=2), seed=24).eval()
    x = torch.randn(2, 3, 20, 24)
    ref = _plain(m, x)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m.fuse(), fullgraph=True, dynamic=False)(x)
    assert (out - ref).abs().max().item() <= 1e-4
