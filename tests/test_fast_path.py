"""The fast path computes what the plain (reference) path computes: layers, blocks and whole models,
in eval and train mode, forward and backward, with and without XCA folding and oneDNN kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize, tiny_model
from xcit.models import create_model
from xcit.models import fastpath as fp
from xcit.models.layers import LPI, XCA, ClassAttention, ClassAttentionBlock, XCABlock

FOLDS = ["never", "always"]


def _run(module, inputs, plain: bool, fold: str = "auto", onednn: bool = True, seed: int = 0, backward: bool = False):
    """Output (and input/parameter gradients) of ``module`` on one path, from a fixed RNG state."""
    inputs = [t.detach().clone().requires_grad_(backward) if isinstance(t, torch.Tensor) else t for t in inputs]
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with fp.settings(enabled=not plain, fold=fold, onednn=onednn):
        out = module(*inputs)
        if backward:
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = {}
    if backward:
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        grads["input"] = inputs[0].grad.clone()
    return out.detach(), grads


def _assert_same(a, b, atol=2e-5, rtol=1e-4):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b, out_a, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].abs().max().item() + 1e-6
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol * scale * 10, rtol=rtol * 10, msg=name)


def _xca(dim=48, heads=4, attn_drop=0.0, seed=0):
    torch.manual_seed(seed)
    m = XCA(dim, heads, qkv_bias=True, attn_drop=attn_drop)
    with torch.no_grad():
        m.temperature.uniform_(0.5, 2.0)
        m.qkv.bias.normal_(0, 0.3)
        m.proj.bias.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 100, 48), (3, 33, 48)])  # N < C, N > C, odd sizes
@pytest.mark.parametrize("onednn", [True, False])
def test_xca_matches_plain_eval(fold, shape, onednn):
    m = _xca().eval()
    x = torch.randn(shape)
    _assert_same(_run(m, [x], plain=True), _run(m, [x], plain=False, fold=fold, onednn=onednn))


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("shape", [(2, 7, 48), (2, 60, 48)])
def test_xca_matches_plain_train_backward_with_attention_dropout(fold, shape):
    """Attention dropout hits the d x d attention on both paths (timm's fused path drops it)."""
    m = _xca(attn_drop=0.3).train()
    x = torch.randn(shape)
    plain = _run(m, [x], plain=True, backward=True, seed=5)
    fast = _run(m, [x], plain=False, fold=fold, backward=True, seed=5)
    _assert_same(plain, fast)
    no_drop = _run(m.eval(), [x], plain=True)
    assert (plain[0] - no_drop[0]).abs().max() > 1e-3  # the dropout was really applied


def test_xca_zero_queries_follow_normalize_clamp():
    """A channel whose query is zero over all tokens gets logits 0 (F.normalize's 1e-12 clamp)."""
    m = _xca().eval()
    with torch.no_grad():
        m.qkv.weight[:5].zero_()
        m.qkv.bias[:5].zero_()
    x = torch.randn(2, 9, 48)
    for fold in FOLDS:
        _assert_same(_run(m, [x], plain=True), _run(m, [x], plain=False, fold=fold))


def test_xca_without_qkv_bias():
    torch.manual_seed(1)
    m = XCA(32, 2, qkv_bias=False).eval()
    for n in (5, 50):
        x = torch.randn(2, n, 32)
        _assert_same(_run(m, [x], plain=True), _run(m, [x], plain=False))


def test_xca_attention_method_unchanged():
    """``attention()`` (used by attention-map visualisation) still returns (B, h, d, d) rows summing to 1."""
    m = _xca().eval()
    x = torch.randn(2, 11, 48)
    with torch.no_grad():
        attn, v = m.attention(x)
        q, k, _ = m.qkv(x).reshape(2, 11, 3, 4, 12).permute(2, 0, 3, 4, 1)
        ref = fp.channel_attention(q, k, m.temperature)
    assert attn.shape == (2, 4, 12, 12) and v.shape == (2, 4, 12, 11)
    torch.testing.assert_close(attn, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_class_attention_matches_plain(train):
    torch.manual_seed(2)
    m = ClassAttention(48, 4, attn_drop=0.2 if train else 0.0, proj_drop=0.1 if train else 0.0).train(train)
    with torch.no_grad():
        m.qkv.bias.normal_(0, 0.5)
    x = torch.randn(3, 13, 48)
    _assert_same(_run(m, [x], plain=True, backward=True, seed=3), _run(m, [x], plain=False, backward=True, seed=3))


def test_class_attention_maps_unchanged():
    torch.manual_seed(3)
    m = ClassAttention(48, 4).eval()
    x = torch.randn(2, 10, 48)
    attn, v = m.attention(x)
    assert attn.shape == (2, 4, 10) and v.shape == (2, 4, 10, 12)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grid", [(5, 7), (1, 6), (4, 1)])
def test_lpi_matches_plain(train, grid):
    torch.manual_seed(4)
    m = randomize(LPI(24), seed=4).train(train)
    x = torch.randn(3, grid[0] * grid[1], 24)
    _assert_same(_run(m, [x, *grid], plain=True, backward=True), _run(m, [x, *grid], plain=False, backward=True))


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("train", [False, True])
def test_xca_block_matches_plain(fold, train):
    m = randomize(XCABlock(32, 4, drop=0.1, attn_drop=0.1, drop_path_rate=0.2), seed=5).train(train)
    x = torch.randn(2, 20, 32)
    _assert_same(_run(m, [x, 4, 5], plain=True, backward=True, seed=9),
                 _run(m, [x, 4, 5], plain=False, fold=fold, backward=True, seed=9))


@pytest.mark.parametrize("tokens_norm", [False, True])
def test_class_attention_block_matches_plain(tokens_norm):
    m = randomize(ClassAttentionBlock(32, 4, tokens_norm=tokens_norm), seed=6).train()
    x = torch.randn(2, 9, 32)
    _assert_same(_run(m, [x], plain=True, backward=True), _run(m, [x], plain=False, backward=True))


@pytest.mark.parametrize("fold", ["auto", *FOLDS])
def test_model_training_step_matches_plain(fold):
    """Forward + backward of a whole model in training mode, all dropouts on (same RNG stream).

    ``pos_drop`` is off: dropout draws its mask in memory order, and the plain path's stem output is
    channel-major while the fast path's is token-major, so the same stream masks other elements.
    """
    m = randomize(tiny_model(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1), seed=7).train()
    m.pos_drop.p = 0.0
    x = torch.randn(4, 3, 24, 20)
    _assert_same(_run(m, [x], plain=True, backward=True, seed=1), _run(m, [x], plain=False, fold=fold, backward=True, seed=1))


def test_grad_checkpointing_on_fast_path():
    m = randomize(tiny_model(), seed=8).train()
    x = torch.randn(2, 3, 16, 16)
    ref = _run(m, [x], plain=True, backward=True)
    m.set_grad_checkpointing(True)
    _assert_same(ref, _run(m, [x], plain=False, backward=True))


@pytest.mark.parametrize("name", ["xcit_nano_12_p16", "xcit_tiny_12_p8"])
def test_official_architectures_logits_match_plain(name):
    """Issue target: max |logit difference| <= 1e-4 against the plain path, fp32 (224 and 200x173)."""
    m = randomize(create_model(name), seed=9).eval()
    for size, folds in (((224, 224), FOLDS), ((200, 173), ("auto",))):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            with fp.plain_path():
                ref = m(x)
            for fold in folds:
                with fp.settings(fold=fold):
                    assert (m(x) - ref).abs().max().item() <= 1e-4, (size, fold)


def test_matches_timm():
    """The fast path (default) still equals timm's XCiT to 1e-5 with the same weights."""
    timm = pytest.importorskip("timm")
    from timm.models.xcit import checkpoint_filter_fn

    for name in ("xcit_nano_12_p16", "xcit_tiny_12_p8"):
        m = randomize(create_model(name), seed=10).eval()
        ref = timm.create_model(name + "_224", pretrained=False).eval()
        ref.load_state_dict(checkpoint_filter_fn({"model": m.state_dict()}, ref))
        for size in ((224, 224), (200, 173)):
            x = torch.randn(1, 3, *size)
            with torch.no_grad():
                assert (m(x) - ref(x)).abs().max().item() <= 1e-5, (name, size)


def test_settings_restore_and_validate():
    before = (fp.config.enabled, fp.config.fold, fp.config.onednn)
    with fp.plain_path():
        assert not fp.config.enabled
        with fp.settings(enabled=True, fold="always"):
            assert fp.config.enabled and fp.config.fold == "always"
        assert not fp.config.enabled
    assert (fp.config.enabled, fp.config.fold, fp.config.onednn) == before
    with pytest.raises(ValueError, match="fold"):
        with fp.settings(fold="sometimes"):
            pass
    with pytest.raises(ValueError, match="unknown"):
        with fp.settings(speed=11):
            pass


def test_fold_choice_by_shape():
    with fp.settings(fold="auto"):
        assert fp.fold_choice(196, 384) is False and fp.fold_choice(4096, 384) is True
    with fp.settings(fold="always"):
        assert fp.fold_choice(1, 384)
    with fp.settings(fold="never"):
        assert not fp.fold_choice(10**6, 384)


def test_bf16_autocast_close_to_fp32_with_fp32_softmax():
    m = randomize(tiny_model(), seed=11).eval()
    x = torch.randn(2, 3, 32, 32)
    q = torch.randn(2, 2, 16, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            attn = fp.channel_attention(q, q, torch.ones(2, 1, 1))
    assert attn.dtype == torch.float32  # norms, scaling and softmax in fp32
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("grid", [(1, 1), (1, 5), (6, 1), (2, 2), (5, 7)])
def test_subtract_border_taps_equals_conv_of_constant(grid):
    """conv(pad(z + t)) = conv(pad(z)) + t * sum(w) - border taps, for every grid size."""
    torch.manual_seed(12)
    c = 5
    z = torch.randn(2, c, *grid)
    t = torch.randn(c)
    w = torch.randn(c, 1, 3, 3)
    ref = F.conv2d(z + t[:, None, None], w, padding=1, groups=c)
    y = F.conv2d(z, w, t * w.sum(dim=(1, 2, 3)), padding=1, groups=c)
    fp.subtract_border_taps(y, t[:, None, None] * w[:, 0], 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
