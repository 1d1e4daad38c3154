"""Attention maps: exact logits, distributions over patches, any input size, figures from the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xcit.cli import main
from xcit.models import XCiT
from xcit.models.weights import save_checkpoint
from xcit.viz import AttentionMaps, forward_with_attention
from xcit.viz.plot import class_attention_figure, save_png


def _tiny(seed: int = 0, in_chans: int = 3, **kw) -> XCiT:
    torch.manual_seed(seed)
    model = XCiT(patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10, in_chans=in_chans, **kw).eval()
    with torch.no_grad():  # move every weight off its init so attention is not near-uniform
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "temperature" not in name else 0.0))
    return model


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (30, 19)])
def test_maps_are_distributions_over_patches_at_any_size(size):
    model = _tiny()
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        maps = forward_with_attention(model, x, xca_blocks=[0, -1])
    hp, wp = -(-size[0] // 4), -(-size[1] // 4)
    assert maps.cls_attn.shape == (3, 2, hp, wp) and maps.grid == (hp, wp)
    sums = maps.cls_attn.sum(dim=(-2, -1))
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert (maps.cls_attn >= 0).all()
    # the raw softmax shares its mass between the patches and the cls token itself
    raw = maps.raw_cls_attn().sum(dim=(-2, -1)) + maps.cls_self
    torch.testing.assert_close(raw, torch.ones_like(raw), atol=1e-5, rtol=0)
    assert set(maps.xca) == {0, 1}
    for attn in maps.xca.values():
        assert attn.shape == (3, 2, 16, 16)
        torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 16), atol=1e-5, rtol=0)


def test_logits_are_the_models_and_no_hook_is_left():
    model = _tiny()
    x = torch.randn(2, 3, 28, 36)
    with torch.no_grad():
        before = model(x)
        maps = forward_with_attention(model, x, cls_layer=0, xca_blocks=[1])
        after = model(x)
    assert torch.equal(maps.logits, before) and torch.equal(after, before)
    assert _hooks(model) == 0
    with pytest.raises(ValueError, match="cls_layer"):
        forward_with_attention(model, x, cls_layer=2)
    assert _hooks(model) == 0


@pytest.mark.parametrize("layer", [0, 1])
def test_raw_maps_match_an_independent_computation(layer):
    """Recompute the class attention by hand from the model's weights and compare."""
    model = _tiny(seed=1)
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        maps = forward_with_attention(model, x, cls_layer=layer, renormalise=False)
        tokens, hp, wp = model.embed(x)
        for block in model.blocks:
            tokens = block(tokens, hp, wp)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1)
        for i, block in enumerate(model.cls_attn_blocks):
            if i == layer:
                t = block.norm1(tokens)
                q, k, _ = block.attn.qkv(t).chunk(3, dim=-1)
                q = q[:, :1].reshape(2, 1, 2, 16).transpose(1, 2)  # (B, h, 1, d)
                k = k.reshape(2, -1, 2, 16).transpose(1, 2)  # (B, h, N+1, d)
                expected = ((q @ k.transpose(-2, -1)) * 16 ** -0.5).softmax(-1)[:, :, 0]
            tokens = block(tokens)
        legacy = model.class_attention_maps(x, layer=layer)
    torch.testing.assert_close(maps.cls_self, expected[:, :, 0])
    torch.testing.assert_close(maps.cls_attn, expected[:, :, 1:].reshape(2, 2, hp, wp))
    torch.testing.assert_close(maps.cls_attn, legacy)


def test_xca_maps_match_the_blocks_attention():
    model = _tiny(seed=2)
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        maps = forward_with_attention(model, x, xca_blocks=[1])
        tokens, hp, wp = model.embed(x)
        tokens = model.blocks[0](tokens, hp, wp)
        expected, _ = model.blocks[1].attn.attention(model.blocks[1].norm1(tokens))
    torch.testing.assert_close(maps.xca[1], expected)


def test_batch_members_do_not_affect_each_other():
    model = _tiny(seed=3)
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        together = forward_with_attention(model, x).cls_attn
        alone = forward_with_attention(model, x[1:2]).cls_attn
    torch.testing.assert_close(together[1:2], alone, atol=1e-6, rtol=1e-5)


def test_upsampling_puts_each_patch_on_its_pixels():
    hp, wp, p = 3, 4, 4
    cls = torch.zeros(1, 1, hp, wp)
    cls[0, 0, 1, 2] = 1.0
    maps = AttentionMaps(
        logits=torch.zeros(1, 2), cls_attn=cls, cls_self=torch.zeros(1, 1), cls_layer=1, renormalised=True, patch_size=p
    )
    up = maps.upsampled((10, 15), mode="nearest")  # 10 x 15 pixels: last patch row/column are partial
    assert up.shape == (1, 1, 10, 15)
    assert up[0, 0, 4:8, 8:12].eq(1).all() and up.sum() == 16
    with pytest.raises(ValueError, match="grid"):
        maps.upsampled((20, 15))


def test_non_xcit_models_are_refused():
    with pytest.raises(ValueError, match="expected an XCiT classifier"):
        forward_with_attention(torch.nn.Linear(2, 2), torch.randn(1, 2))


def test_figure_has_one_panel_per_head_plus_input_and_mean(tmp_path):
    fig = class_attention_figure(np.zeros((20, 30, 3)), np.random.rand(4, 20, 30), title="t")
    assert len(fig.axes) == 6
    path = save_png(fig, tmp_path / "f.png", dpi=50, palette=True)
    with Image.open(path) as img:
        assert img.mode == "P" and img.width > 100


def test_cli_writes_figures_for_any_size_and_skips_unreadable(tmp_path, capsys):
    model = _tiny(in_chans=1)
    ckpt = save_checkpoint(model, tmp_path / "m.pth", extra={
        "classes": [f"item{i}" for i in range(10)],
        "data": {"img_size": 28, "in_chans": 1, "mean": [0.3], "std": [0.35], "crop_pct": 1.0, "dataset": "toy"},
    })
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53), dtype="uint8")).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "maps"
    code = main(["attention", str(tmp_path / "a.png"), str(tmp_path / "bad.png"), "--checkpoint", str(ckpt),
                 "-o", str(out), "--img-size", "0", "--xca-block", "-1", "--dpi", "40"])
    assert code == 1  # the readable image is drawn; the status says one input failed
    captured = capsys.readouterr()
    assert "14x10 patches" in captured.out and "top-1 item" in captured.out
    assert "skipped" in captured.err and "bad.png" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["a_attention.png", "a_xca1.png"]
    with Image.open(out / "a_attention.png") as img:
        assert img.width > img.height > 50
