"""xcit.streaming: the tiled / chunked forward equals the plain model forward, at borders and any size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize

import xcit
from xcit.inference.streaming import normalise
from xcit.models import XCiT, XCiTPyramid

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOL = dict(atol=1e-4, rtol=0)


def _model(patch: int, seed: int = 0, **kw) -> XCiT:
    torch.manual_seed(seed)
    kwargs = dict(patch_size=patch, embed_dim=64, depth=3, num_heads=4, num_classes=10, tokens_norm=True)
    return randomize(XCiT(**{**kwargs, **kw}), seed).eval()


def _reference(model: XCiT, x: torch.Tensor):
    with torch.no_grad():
        tokens, hp, wp = model.embed(x)
        return model(x), model.forward_features(x), model.forward_blocks(tokens, hp, wp)


@pytest.mark.parametrize(
    "patch, size, chunk",
    [
        (16, (224, 224), 14 * 7),  # divides: whole row tiles, 2 chunks
        (16, (224, 224), 37),  # divides neither the tokens nor the rows
        (16, (1000, 750), 47 * 9),  # 63 x 47 grid: 9 rows a tile, 7 tiles
        (16, (1000, 750), 1000),  # 21 rows a tile, last tile short
        (8, (224, 224), 28 * 4),
        (8, (1000, 750), 4099),
    ],
)
def test_matches_plain_forward(patch, size, chunk):
    model = _model(patch)
    x = torch.randn(1, 3, *size)
    logits, feats, tokens = _reference(model, x)
    stream = xcit.streaming(model, tokens_per_chunk=chunk)
    out = stream.run(x, features=True)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.features, feats, **TOL)
    torch.testing.assert_close(out.cls, feats[:, 0], **TOL)
    torch.testing.assert_close(out.mean_patch, feats[:, 1:].mean(1), **TOL)
    got, hp, wp = stream.forward_tokens(x)
    assert (hp, wp) == (-(-size[0] // patch), -(-size[1] // patch)) == out.grid
    torch.testing.assert_close(got, tokens, **TOL)
    torch.testing.assert_close(stream(x), logits, **TOL)


@pytest.mark.parametrize("size", [(1, 1), (16, 16), (3, 40), (17, 33), (33, 17), (48, 5), (70, 70)])
@pytest.mark.parametrize("chunk", [1, 2, 5, 100_000])
def test_borders_and_images_smaller_than_a_tile(size, chunk):
    """One-row tiles (every LPI / stem halo crosses tiles), odd grids, one tile for the whole image,
    partial patches at the right and bottom borders, a 1-token image; batch of two; nano's tokens_norm=False."""
    model = _model(16, seed=1, tokens_norm=False)
    x = torch.randn(2, 3, *size)
    logits, feats, tokens = _reference(model, x)
    stream = xcit.streaming(model, tokens_per_chunk=chunk)
    out = stream.run(x, features=True)
    torch.testing.assert_close(out.features, feats, **TOL)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(stream.forward_tokens(x)[0], tokens, **TOL)


def test_one_token_image():
    model = _model(8)
    x = torch.randn(1, 3, 8, 8)
    out = xcit.streaming(model, tokens_per_chunk=3).run(x, features=True, attention_layer=-1)
    assert out.grid == (1, 1) and out.features.shape == (1, 2, 64)
    torch.testing.assert_close(out.logits, model(x).detach(), **TOL)
    # cls attends to itself and the one patch
    torch.testing.assert_close(out.attention.sum((-2, -1)) + out.cls_self, torch.ones(1, 4), **TOL)


def test_uint8_tensor_numpy_and_memmap_inputs(tmp_path):
    model = _model(16)
    img = torch.randint(0, 256, (1, 3, 70, 90), dtype=torch.uint8)
    reference = model(normalise(img, MEAN, STD)).detach()
    stream = xcit.streaming(model, MEAN, STD, tokens_per_chunk=7)
    torch.testing.assert_close(stream(img), reference, **TOL)
    torch.testing.assert_close(stream(img.numpy()), reference, **TOL)
    hwc = np.lib.format.open_memmap(tmp_path / "img.npy", mode="w+", dtype=np.uint8, shape=(70, 90, 3))
    hwc[:] = img[0].permute(1, 2, 0).numpy()
    hwc.flush()
    torch.testing.assert_close(stream(np.load(tmp_path / "img.npy", mmap_mode="r")), reference, **TOL)
    # the reference normalisation is the usual one
    expected = (img.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalise(img, MEAN, STD), expected, atol=1e-6, rtol=0)


def test_class_attention_maps_match_the_model():
    model = _model(16)
    x = torch.randn(2, 3, 80, 112)
    for layer in (0, 1, -1):
        expected = model.class_attention_maps(x, layer=layer)
        out = xcit.streaming(model, tokens_per_chunk=6).run(x, attention_layer=layer)
        torch.testing.assert_close(out.attention, expected, atol=1e-6, rtol=1e-4)
        total = out.attention.sum((-2, -1)) + out.cls_self
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_bf16_autocast_runs_close_to_fp32():
    model = _model(16)
    x = torch.randn(1, 3, 96, 128)
    stream = xcit.streaming(model, tokens_per_chunk=10)
    fp32 = stream.run(x, features=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = stream.run(x, features=True)
        plain = model(x)
    assert bf16.logits.dtype == plain.dtype and torch.isfinite(bf16.features).all()
    scale = fp32.logits.abs().max()
    assert (bf16.logits.float() - fp32.logits).abs().max() < 0.05 * scale
    assert (bf16.logits.float() - plain.float()).abs().max() < 0.05 * scale


def test_train_mode_is_refused():
    model = _model(16).train()
    with pytest.raises(RuntimeError, match="eval"):
        xcit.streaming(model)
    stream = xcit.streaming(model.eval())
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        stream(torch.randn(1, 3, 32, 32))


def test_bad_inputs_are_named():
    stream = xcit.streaming(_model(16))
    with pytest.raises(ValueError, match="mean and std"):
        stream(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        stream(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="4-d|3-d"):
        stream(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="dtype"):
        stream(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens_per_chunk"):
        xcit.streaming(_model(16), tokens_per_chunk=0)
    with pytest.raises(ValueError, match="3 mean"):
        xcit.streaming(_model(16), mean=(0.5,), std=(0.5,))


def test_pyramid_trunk_tokens():
    torch.manual_seed(0)
    pyramid = randomize(XCiTPyramid(patch_size=8, embed_dim=64, depth=4, num_heads=4)).eval()
    x = torch.randn(1, 3, 72, 56)
    with torch.no_grad():
        expected = pyramid.get_intermediate_layers(x, [-1])[0]
    tokens, hp, wp = xcit.streaming(pyramid, tokens_per_chunk=13).forward_tokens(x)
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(1, 64, hp, wp), expected, **TOL)
    with pytest.raises(ValueError, match="classifier"):
        xcit.streaming(pyramid)(x)
