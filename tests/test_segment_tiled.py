"""Whole-image dense prediction tile by tile: the windowed pyramid and the tiled heads equal the whole-image forward."""
from __future__ import annotations

import glob
import tempfile

import numpy as np
import pytest
import torch

from xcit.inference.dense import stream_pyramid
from xcit.models import create_pyramid
from xcit.segment.model import build_segmenter
from xcit.segment.tiled import TiledSegmenter, Window, resize, segment_large

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics away from the identity, so a wrong window shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _normalised(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth image with edges (not noise), so the classes vary over it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(yy / 17.0 + c) * np.cos(xx / 23.0 - c) for c in range(3)], -1) * 100 + 128
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["xcit_nano_12_p16", "xcit_nano_12_p8"])
@pytest.mark.parametrize("resident", [None, 0])
def test_pyramid_windows_equal_the_whole_pyramid(name, resident):
    torch.manual_seed(0)
    pyramid = _randomise_norms(create_pyramid(name))
    img = _image(150, 230)
    with torch.no_grad():
        ref = pyramid(torch.nn.functional.pad(_normalised(img), (0, 26, 0, 10)))  # pad_to (160, 256)
    before = set(glob.glob(f"{tempfile.gettempdir()}/xcit-pyramid-*"))
    stream = stream_pyramid(pyramid, MEAN, STD, tokens_per_chunk=37, max_resident_bytes=resident)
    with stream.maps(img, pad_to=(160, 256)) as maps:
        assert maps.sizes == [tuple(r.shape[-2:]) for r in ref.values()]
        spilled = set(glob.glob(f"{tempfile.gettempdir()}/xcit-pyramid-*")) - before
        assert bool(spilled) == (resident == 0)  # a zero bound sends the kept block outputs to a temporary file
        for level, full in enumerate(ref.values()):
            h, w = maps.sizes[level]
            torch.testing.assert_close(maps.window(level, 0, h, 0, w), full, rtol=0, atol=2e-5)
            y0, y1, x0, x1 = 1, max(h - 2, 2), 3, w - 1  # odd offsets: inside a transposed convolution's 2x2 output
            torch.testing.assert_close(maps.window(level, y0, y1, x0, x1), full[:, :, y0:y1, x0:x1], rtol=0, atol=2e-5)
    assert not (set(glob.glob(f"{tempfile.gettempdir()}/xcit-pyramid-*")) - before)  # removed on close


def test_the_temporary_file_is_removed_on_error():
    pyramid = create_pyramid("xcit_nano_12_p16").eval()
    before = set(glob.glob(f"{tempfile.gettempdir()}/xcit-pyramid-*"))
    stream = stream_pyramid(pyramid, MEAN, STD, max_resident_bytes=0)
    with pytest.raises(ZeroDivisionError), stream.maps(_image(64, 64)):
        raise ZeroDivisionError
    assert not (set(glob.glob(f"{tempfile.gettempdir()}/xcit-pyramid-*")) - before)


CASES = [  # backbone, head, head options, image size, tile
    ("xcit_nano_12_p16", "fpn", {}, (200, 328), 96),
    ("xcit_nano_12_p16", "upernet", {}, (301, 157), 128),
    ("xcit_nano_12_p8", "fpn", {"fpn_upsample": "x2"}, (145, 203), 64),
    ("xcit_nano_12_p8", "upernet", {}, (96, 160), 64),
]


@pytest.mark.parametrize("name,head,options,size,tile", CASES)
def test_tiled_segmentation_equals_the_whole_image_forward(name, head, options, size, tile):
    torch.manual_seed(0)
    model = _randomise_norms(build_segmenter(5, name, head=head, channels=32, **options))
    img = _image(*size)
    with torch.no_grad():
        ref = model(_normalised(img))[0]
    labels, logits = segment_large(model, img, MEAN, STD, tile=tile, logits=True, tokens_per_chunk=200)
    assert labels.shape == size
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
    assert torch.equal(labels, ref.argmax(0))
    assert len(labels.unique()) > 1  # the check means something


def test_tiles_come_in_row_major_order_and_cover_the_image():
    model = build_segmenter(3, "xcit_nano_12_p16", head="fpn", channels=16).eval()
    tiler = TiledSegmenter(model, MEAN, STD, tile=64)
    seen = [(t.y0, t.y1, t.x0, t.x1) for t in tiler.tiles(_image(100, 150))]
    assert seen == [(y, min(y + 64, 100), x, min(x + 64, 150)) for y in (0, 64) for x in (0, 64, 128)]


def test_resize_windows_match_interpolate_for_odd_sizes():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 2, 13, 17, generator=g)
    for mode in ("bilinear", "nearest"):
        for size in [(29, 40), (26, 34), (13, 17), (50, 51)]:
            kwargs = {"align_corners": False} if mode == "bilinear" else {}
            ref = torch.nn.functional.interpolate(full, size=size, mode=mode, **kwargs)
            win = Window(full[:, :, 3:11, 2:15], 3, 2, 13, 17)
            out = resize(win, size, mode)
            (r0, r1), (c0, c1) = out.rows, out.cols
            assert r1 - r0 > 0 and c1 - c0 > 0
            torch.testing.assert_close(out.t, ref[:, :, r0:r1, c0:c1], rtol=0, atol=1e-5)


def test_bad_settings_are_refused():
    model = build_segmenter(3, "xcit_nano_12_p16", head="fpn", channels=16).eval()
    with pytest.raises(ValueError, match="multiple of 32"):
        TiledSegmenter(model, MEAN, STD, tile=100)
    gn = build_segmenter(3, "xcit_nano_12_p16", head="fpn", channels=16, norm="gn").eval()
    with pytest.raises(ValueError, match="GroupNorm"):
        TiledSegmenter(gn, MEAN, STD)
    with pytest.raises(RuntimeError, match="eval"):
        TiledSegmenter(model.train(), MEAN, STD)
    with pytest.raises(ValueError, match="at least 17x17"):
        segment_large(model.eval(), _image(16, 400), MEAN, STD)


# ----- xcit segment predict on a whole-slide TIFF -----------------------------------------------------------------------
@pytest.fixture
def slide_and_checkpoint(tmp_path):
    """A 3-level pyramidal TIFF (level 1: 160 x 224 px, 0.5 um per pixel) and a small segmentation checkpoint."""
    import tifffile

    from xcit.segment.model import save_segmenter

    torch.manual_seed(0)
    model = _randomise_norms(build_segmenter(4, "xcit_nano_12_p16", head="fpn", channels=16))
    ckpt = save_segmenter(model, tmp_path / "seg.pt", meta={"classes": ["a", "b", "c", "d"]})
    base = _image(320, 448)
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, tile=(64, 64), compression="zlib", subifds=2, resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
        for k in (1, 2):
            tif.write(base[:: 2**k, :: 2**k], tile=(64, 64), compression="zlib", subfiletype=1)
    return model, ckpt, path, base[::2, ::2]


def test_segment_predict_streams_a_slide_level_to_a_pyramidal_label_tiff(slide_and_checkpoint, tmp_path, capsys):
    import json

    import tifffile
    from test_cli_errors import run

    model, ckpt, path, level1 = slide_and_checkpoint
    out = tmp_path / "out"
    argv = ["segment", "predict", str(path), "--checkpoint", str(ckpt), "--streaming", "always", "--mpp", "2",
            "--tile", "64", "--max-resident-gb", "0", "--device", "cpu", "-o", str(out)]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    with torch.no_grad():
        ref = model(_normalised(np.ascontiguousarray(level1)))[0].argmax(0).numpy()
    with tifffile.TiffFile(out / "slide_labels.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.compression != 1  # (sub-resolutions: tests/test_slides.py)
        labels = page.asarray()
        description = json.loads(page.description)
    np.testing.assert_array_equal(labels, ref)  # equal to the whole-image forward
    assert description["classes"] == ["a", "b", "c", "d"] and description["level"] == 1
    areas = json.loads((out / "slide_areas.json").read_text())
    assert areas["size"] == [160, 224] and areas["level"] == 1 and areas["mpp"] == [2.0, 2.0]
    assert [c["pixels"] for c in areas["classes"]] == np.bincount(ref.ravel(), minlength=4).tolist()
    assert abs(sum(c["area_um2"] for c in areas["classes"]) - 160 * 224 * 4.0) < 1e-6
    assert (out / "slide_overlay.png").stat().st_size > 0

    before = (out / "slide_labels.tif").read_bytes()
    code, _, err = run(argv, capsys)  # the outputs exist: refused, nothing changed
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "slide_labels.tif").read_bytes() == before

    argv = [a if a != "--mpp" else "--level" for a in argv[:-1]] + [str(tmp_path / "o2")]
    code, _, err = run([a if a != "2" else "7" for a in argv], capsys)  # --level 7: a level the file does not have
    assert code == 1 and "level 7 does not exist" in err and str(path) in err
    assert not list((tmp_path / "o2").glob("*.tif"))


def test_segment_predict_names_a_bad_slide_in_one_line_and_writes_nothing(slide_and_checkpoint, tmp_path, capsys):
    import tifffile
    from test_cli_errors import run

    _, ckpt, path, _ = slide_and_checkpoint
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, _image(12, 40), tile=(16, 16))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad, words in ((small, "at least 17x17"), (cut, "truncated")):
        out = tmp_path / f"out_{bad.stem}"
        code, _, err = run(["segment", "predict", str(bad), "--checkpoint", str(ckpt), "--streaming", "always",
                            "--device", "cpu", "-o", str(out)], capsys)
        lines = [line for line in err.strip().splitlines() if str(bad) in line]
        assert code == 1 and len(lines) == 1 and words in lines[0], err
        assert not list(out.glob("*"))
