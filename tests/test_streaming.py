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
        (16, (2048, 2048), 128 * 12),  # 128 x 128 grid: 12 rows a tile, last tile short
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


# ----- large images from the command line ---------------------------------------------------------
CLASSES = [f"item{i}" for i in range(10)]


def _checkpoint(tmp_path, model: XCiT):
    from xcit.models.weights import save_checkpoint

    return save_checkpoint(model, tmp_path / "m.pth", extra={
        "classes": CLASSES, "data": {"img_size": 64, "in_chans": 3, "mean": list(MEAN), "std": list(STD)},
    })


def _tiff(tmp_path, pixels: np.ndarray, name: str = "slide.tif", **kw):
    import tifffile

    path = tmp_path / name
    tifffile.imwrite(path, pixels, **kw)
    return path


def _native(model: XCiT, pixels: np.ndarray) -> torch.Tensor:
    """The plain forward on the whole image at native resolution."""
    return normalise(torch.from_numpy(pixels).permute(2, 0, 1)[None], MEAN, STD)


def test_reader_memory_maps_tiffs_and_ignores_the_pil_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image

    from xcit.data.large_images import image_size, read_large_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    flat = read_large_image(_tiff(tmp_path, rgb, "flat.tif"))
    assert isinstance(flat, np.memmap) and np.array_equal(flat, rgb)
    tiled = read_large_image(_tiff(tmp_path, rgb, "tiled.tif", compression="zlib", tile=(32, 32)))
    assert isinstance(tiled, np.memmap) and np.array_equal(tiled, rgb)  # decoded into a temporary memmap
    grey = read_large_image(_tiff(tmp_path, rgb[..., 0], "grey.tif"))
    assert grey.shape == (90, 130, 3) and np.array_equal(grey[..., 2], rgb[..., 0])
    assert image_size(tmp_path / "tiled.tif") == (90, 130)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the file is now a "decompression bomb" to PIL
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png").close()
    assert np.array_equal(read_large_image(tmp_path / "big.png"), rgb) and image_size(tmp_path / "big.png") == (90, 130)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ValueError, match="8-bit"):
        read_large_image(_tiff(tmp_path, rgb.astype(np.uint16), "deep.tif"))
    with pytest.raises(ValueError, match="cannot read"):
        read_large_image(tmp_path / "missing.tif")


def test_cli_predict_attention_and_embed_stream_a_large_tiff(tmp_path, capsys):
    from xcit.cli import main

    model = _model(16, seed=3)
    ckpt = _checkpoint(tmp_path, model)
    pixels = np.random.default_rng(1).integers(0, 256, (200, 330, 3), dtype=np.uint8)
    tif = _tiff(tmp_path, pixels, compression="zlib", tile=(64, 64))
    x = _native(model, pixels)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
        feats = model.forward_features(x)[0]
    expected = model.class_attention_maps(x)[0]
    expected = expected / expected.sum((-2, -1), keepdim=True)

    # above the (lowered) threshold: classified whole at native resolution, not resized to 64 px
    csv = tmp_path / "p.csv"
    assert main(["predict", str(tif), "--checkpoint", str(ckpt), "--large-pixels", "50000", "--tokens-per-chunk", "50",
                 "--no-progress", "--top-k", "3", "-o", str(csv)]) == 0
    row = csv.read_text().splitlines()[1].split(",")
    top = probs.topk(3)
    assert row[1::2][:3] == [CLASSES[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([float(v) for v in row[2::2][:3]], top.values.numpy(), atol=1e-5)

    out = tmp_path / "maps"
    assert main(["attention", str(tif), "--checkpoint", str(ckpt), "--streaming", "always", "-o", str(out),
                 "--thumbnail", "100", "--dpi", "30"]) == 0
    assert "330x200 px, 21x13 patches (W x H), streamed" in capsys.readouterr().out
    stored = np.load(out / "slide_attention.npy", mmap_mode="r")
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-6, rtol=1e-4)
    from PIL import Image

    with Image.open(out / "slide_attention_map.png") as img:
        assert img.size == (83, 50)  # every 4th pixel: the long side within --thumbnail
    assert (out / "slide_attention.png").is_file()

    emb = tmp_path / "e.npz"
    assert main(["embed", str(tif), str(tmp_path / "missing.tif"), "--checkpoint", str(ckpt), "-o", str(emb)]) == 1
    data = np.load(emb)
    assert list(data["paths"]) == [str(tif)] and data["grid"].tolist() == [[13, 21]]
    np.testing.assert_allclose(data["cls"][0], feats[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(data["mean_patch"][0], feats[1:].mean(0).numpy(), atol=1e-4)
    assert "missing.tif" in capsys.readouterr().err


def test_cli_small_images_keep_the_batched_path(tmp_path, capsys):
    from PIL import Image

    from xcit.cli import main

    model = _model(16, seed=3)
    ckpt = _checkpoint(tmp_path, model)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    csv = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "--no-progress", "-o", str(csv)]) == 0
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "--no-progress", "--streaming",
                 "always", "-o", str(tmp_path / "s.csv")]) == 0
    # the batched path resizes to the eval size (64 px); the streamed one sees the 40 x 50 original
    assert csv.read_text() != (tmp_path / "s.csv").read_text()


def test_an_optimised_copy_is_refused_with_a_message():
    model = xcit.create_model("xcit_nano_12_p16").eval()
    with pytest.raises(ValueError, match="optimised copy"):
        xcit.streaming(xcit.optimize(model))


def test_deep_greyscale_images_stream_scaled_by_their_bit_depth_as_every_reader_scales_them(tmp_path, capsys):
    """A 16-bit greyscale PNG or TIFF, and a float TIFF, give the streaming reader (embed, large predict / attention)
    the 8-bit pixels load_image gives every other command (it refused them, or clipped a PNG to white)."""
    from PIL import Image
    from skimage import data

    from xcit.cli import main
    from xcit.data.images import load_image
    from xcit.data.large_images import read_large_image

    camera = data.camera()[::4, ::4]  # 128 x 128, uint8
    deep = camera.astype(np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    _tiff(tmp_path, deep, "deep.tif")
    _tiff(tmp_path, camera.astype(np.float32) / 255, "float.tif")
    for name in ("deep.png", "deep.tif", "float.tif"):
        grey = read_large_image(tmp_path / name, in_chans=1)
        assert grey.dtype == np.uint8 and grey.shape == (128, 128, 1), name
        assert np.abs(grey[..., 0].astype(int) - camera).max() == 0, name
        assert np.array_equal(grey[..., 0], np.asarray(load_image(tmp_path / name, 1))), name
    ckpt = _checkpoint(tmp_path, _model(16, seed=3))
    code = main(["embed", str(tmp_path / "deep.png"), str(tmp_path / "deep.tif"), "--checkpoint", str(ckpt),
                 "-o", str(tmp_path / "e.npz")])
    assert code == 0, capsys.readouterr().err
    saved = np.load(tmp_path / "e.npz")
    np.testing.assert_allclose(saved["cls"][0], saved["cls"][1], atol=1e-6)  # the same pixels, whatever the format
