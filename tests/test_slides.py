"""Whole-slide I/O (xcit.data.slides): lazy region reads of pyramidal TIFF / OME-TIFF / SVS / GeoTIFF levels that
decode only the tiles they touch, level choice by index or pixel size, damage named at open or at read, and label
maps written band by band as pyramidal TIFFs that leave nothing behind when anything fails."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess

import numpy as np
import pytest
import tifffile
from PIL import Image

from xcit.data.large_images import read_large_image
from xcit.data.slides import (
    GeoReference,
    class_areas,
    open_slide,
    parse_aperio_mpp,
    pixel_to_map,
    read_overview,
    write_json_atomically,
    write_label_tiff,
    write_overlay,
)

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (600, 900, 3), dtype=np.uint8)


def write_pyramid(path, levels, tile=64, **options) -> None:
    """A generic pyramidal TIFF: ``levels[0]`` with the others as SubIFDs (zlib, tiled)."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(tile, tile), compression="zlib", subifds=len(levels) - 1, **options)
        for level in levels[1:]:
            tif.write(level, tile=(tile, tile), compression="zlib", subfiletype=1)


def count_reads(monkeypatch) -> list[int]:
    """The sizes of every read from a TIFF file from now on (tifffile's FileHandle, which the slide reads through)."""
    sizes: list[int] = []
    read = tifffile.FileHandle.read

    def counted(self, size=-1):
        data = read(self, size)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(tifffile.FileHandle, "read", counted)
    return sizes


def test_levels_and_regions_equal_the_source(tmp_path):
    path = tmp_path / "slide.tif"
    write_pyramid(path, [IMAGE, IMAGE[::2, ::2], IMAGE[::4, ::4]], resolution=(1e4 / 0.5, 1e4 / 0.5),
                  resolutionunit="CENTIMETER")
    for level, factor in enumerate((1, 2, 4)):
        source = IMAGE[::factor, ::factor]
        with open_slide(path, level=level) as slide:
            assert slide.shape == source.shape and slide.dtype == np.uint8 and slide.ndim == 3
            assert slide.level == level and slide.levels == [(600, 900), (300, 450), (150, 225)]
            assert slide.mpp == pytest.approx((0.5 * factor, 0.5 * factor)) and slide.georef is None
            rng = np.random.default_rng(level)
            for _ in range(25):  # random regions, some reaching past an edge or given from the end
                r0, c0 = (int(v) for v in rng.integers(-50, [source.shape[0], source.shape[1]]))
                r1, c1 = r0 + int(rng.integers(0, 200)), c0 + int(rng.integers(0, 200))
                got = slide[r0:r1, c0:c1]
                assert got.flags.c_contiguous and got.dtype == np.uint8
                np.testing.assert_array_equal(got, source[r0:r1, c0:c1])
            np.testing.assert_array_equal(slide[-7:], source[-7:])
            np.testing.assert_array_equal(slide[10:20, -3:, :], source[10:20, -3:])
            assert slide[5:5, 0:10].shape == (0, 10, 3) and slide[5:1].shape == (0, source.shape[1], 3)
            with pytest.raises(ValueError, match="step of 1"):
                slide[::2]
            with pytest.raises(TypeError, match="row slice"):
                slide[3]
    with pytest.raises(ValueError, match="closed"):
        slide[0:1]


def test_a_region_reads_only_the_tiles_it_touches(tmp_path, monkeypatch):
    path = tmp_path / "big.tif"
    big = RNG.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    write_pyramid(path, [big], tile=64)  # 16 x 16 tiles
    with tifffile.TiffFile(path) as tif:
        counts = tif.pages[0].databytecounts
    sizes = count_reads(monkeypatch)
    with open_slide(path) as slide:
        sizes.clear()
        np.testing.assert_array_equal(slide[100:140, 200:230], big[100:140, 200:230])
        # rows 100..139 are in tile rows 1 and 2, columns 200..229 in tile column 3: two tiles of 256 decoded
        assert sorted(sizes) == sorted([counts[1 * 16 + 3], counts[2 * 16 + 3]]) and slide.segments_read == 2
        np.testing.assert_array_equal(slide[130:150, 200:256], big[130:150, 200:256])
        assert len(sizes) == 2  # tile (2, 3) again: decoded once, kept for the overlapping window
    strip = tmp_path / "strip.tif"  # uncompressed: one strip of the whole image (tifffile's default)
    tifffile.imwrite(strip, big)
    with open_slide(strip) as slide:
        sizes.clear()
        np.testing.assert_array_equal(slide[500:510, 7:9], big[500:510, 7:9])
        assert sizes == [10 * 1024 * 3]  # the ten rows alone, not the 3 MB strip


LAYOUTS = {  # how TIFF writers store pixels: planes, strips or tiles, byte order, predictor, codec, alpha
    "planar-tiles": {"planarconfig": "separate", "photometric": "rgb", "tile": (32, 48), "compression": "zlib"},
    "planar-raw-strips": {"planarconfig": "separate", "photometric": "rgb", "rowsperstrip": 7},
    "big-endian-strips-predictor": {"byteorder": ">", "rowsperstrip": 16, "compression": "zlib", "predictor": True},
    "raw-strips": {"rowsperstrip": 5},
    "big-endian-raw-tiles": {"tile": (16, 16), "byteorder": ">"},
    "lzma-tiles": {"tile": (32, 32), "compression": "lzma"},
    "rgba-tiles": {"photometric": "rgb", "extrasamples": ["unassalpha"], "tile": (32, 32), "compression": "zlib"},
    "float-grey-tiles": {"tile": (32, 32), "compression": "zlib"},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_storage_layout_reads_as_the_whole_image_reader_reads_it(tmp_path, layout):
    image = IMAGE[:150, :170]
    data = {"planar-tiles": np.moveaxis(image, 2, 0), "planar-raw-strips": np.moveaxis(image, 2, 0),
            "rgba-tiles": np.dstack([image, image[:, :, :1]]),
            "float-grey-tiles": image[:, :, 0].astype(np.float32) * 0.01}.get(layout, image)
    path = tmp_path / f"{layout}.tif"
    tifffile.imwrite(path, np.ascontiguousarray(data), **LAYOUTS[layout])
    whole = read_large_image(path)  # the float image: scaled by its peak over the whole image, region or not
    with open_slide(path) as slide:
        for r0, r1, c0, c1 in [(0, 150, 0, 170), (3, 77, 5, 160), (149, 150, 169, 170), (10, 11, 0, 170)]:
            np.testing.assert_array_equal(slide[r0:r1, c0:c1], whole[r0:r1, c0:c1])
    if layout != "float-grey-tiles":
        np.testing.assert_array_equal(whole, image)


def test_levels_by_pixel_size_and_the_missing_level_message(tmp_path):
    ome = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(ome) as tif:
        tif.write(IMAGE, tile=(64, 64), compression="zlib", subifds=2, photometric="rgb",
                  metadata={"PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.25})
        tif.write(IMAGE[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")
        tif.write(IMAGE[::4, ::4], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")
    picks = {0.25: 0, 0.3: 0, 0.45: 1, 0.5: 1, 0.9: 2, 100.0: 2, 0.01: 0}
    for mpp, level in picks.items():
        with open_slide(ome, mpp=mpp) as slide:
            assert slide.level == level and slide.mpp == pytest.approx((0.25 * 2 ** level,) * 2)
            np.testing.assert_array_equal(slide[3:50, 8:40], IMAGE[::2 ** level, ::2 ** level][3:50, 8:40])
    with pytest.raises(ValueError) as caught:
        open_slide(ome, level=5)
    assert str(caught.value) == (f"level 5 does not exist in {str(ome)!r}: it has 3 levels (width x height): "
                                 "0 (900 x 600), 1 (450 x 300), 2 (225 x 150)")
    with pytest.raises(ValueError, match="not both"):
        open_slide(ome, level=0, mpp=0.5)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, IMAGE)  # no resolution in a unit of length
    with pytest.raises(ValueError, match="states none") as caught:
        open_slide(plain, mpp=0.5)
    assert "\n" not in str(caught.value) and "plain.tif" in str(caught.value)
    with open_slide(plain) as slide:
        assert slide.levels == [(600, 900)] and slide.mpp is None


def test_an_aperio_svs_file_gives_its_levels_and_mpp(tmp_path):
    path = tmp_path / "slide.svs"
    head = "Aperio Image Library v12.0.5\r\n900x600 [0,0 900x600] (64x64) RGB"
    with tifffile.TiffWriter(path) as tif:  # baseline, thumbnail, then the reduced levels, as Aperio writes them
        tif.write(IMAGE, tile=(64, 64), compression="zlib", photometric="rgb", metadata=None,
                  description=head + "|AppMag = 40|MPP = 0.2500|Filename = x")
        tif.write(IMAGE[::8, ::8], photometric="rgb", metadata=None, description=head + " thumbnail")
        tif.write(IMAGE[::4, ::4], tile=(64, 64), compression="zlib", photometric="rgb", metadata=None,
                  description=head)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs
    with open_slide(path, mpp=1.0) as slide:
        assert slide.level == 1 and slide.levels == [(600, 900), (150, 225)] and slide.mpp == (1.0, 1.0)
        np.testing.assert_array_equal(slide[0:150, 100:225], IMAGE[::4, ::4][:, 100:])
    assert parse_aperio_mpp("Aperio Image Library|AppMag = 20|MPP = 0.4990|Date = 1") == 0.499
    assert parse_aperio_mpp("Aperio Image Library|AppMag = 20") is None
    assert parse_aperio_mpp("Aperio|MPP = 0|") is None


def test_a_truncated_file_is_refused_at_open_naming_the_file(tmp_path):
    path = tmp_path / "slide.tif"
    write_pyramid(path, [IMAGE, IMAGE[::2, ::2]])
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    for size in (len(data) // 2, len(data) - 100):
        cut.write_bytes(data[:size])
        name = re.escape(str(cut))
        with pytest.raises(ValueError, match=rf"cannot read '{name}': truncated: tile \(\d+, \d+\) of level \d "
                                             rf"ends at byte \d+, the file has {size} bytes"):
            open_slide(cut)


def test_a_corrupt_tile_is_named_when_its_region_is_read(tmp_path):
    path = tmp_path / "slide.tif"
    write_pyramid(path, [IMAGE])
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset = page.dataoffsets[1 * 15 + 2]  # tile (1, 2): 15 tiles of 64 per row of 900
    data = bytearray(path.read_bytes())
    data[offset + 20:offset + 80] = bytes(60)
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide[0:64], IMAGE[0:64])  # the rest of the file reads
        name = re.escape(str(path))
        with pytest.raises(ValueError, match=rf"cannot read '{name}': tile \(1, 2\) of level 0 is corrupt"):
            slide[100:200, 0:900]


def test_jpeg_tiles_are_read(tmp_path):
    """JPEG is the compression of most SVS / NDPI slides: decoded through imagecodecs (the set-up installs it)."""
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, IMAGE, tile=(64, 64), compression="jpeg", photometric="rgb")
    with open_slide(path) as slide:
        region = slide[100:300, 50:700]
    np.testing.assert_array_equal(region, tifffile.imread(path)[100:300, 50:700])  # as tifffile decodes the whole


def test_a_compression_without_its_codec_is_refused_at_open(tmp_path, monkeypatch):
    path = tmp_path / "jpeg.svs"
    tifffile.imwrite(path, IMAGE, tile=(64, 64), compression="jpeg", photometric="rgb")

    class NoJpeg(dict):  # tifffile's decompressor table as it is without imagecodecs
        def __getitem__(self, key):
            if key == 7:
                raise KeyError("<COMPRESSION.JPEG: 7> requires the 'imagecodecs' package")
            return tifffile.TIFF.DECOMPRESSORS.__class__.__getitem__(tifffile.TIFF.DECOMPRESSORS, key)

    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", NoJpeg(), raising=False)
    with pytest.raises(ValueError, match=r"level 0 is JPEG-compressed .*imagecodecs") as caught:
        open_slide(path)
    assert str(path) in str(caught.value)


def test_other_formats_and_grey_images(tmp_path):
    png = tmp_path / "photo.png"
    Image.fromarray(IMAGE[:100, :120]).save(png)
    with open_slide(png) as slide:
        assert slide.levels == [(100, 120)] and slide.mpp is None and slide.georef is None
        np.testing.assert_array_equal(slide[10:60, 100:200], IMAGE[10:60, 100:120])
    with pytest.raises(ValueError, match=r"level 1 does not exist in .*photo.png.*: 0 \(120 x 100\)"):
        open_slide(png, level=1)
    with pytest.raises(ValueError, match="states none"):
        open_slide(png, mpp=0.5)
    grey = tmp_path / "grey.tif"  # 16-bit grey, tiled: RGB, scaled by bit depth as every reader scales it
    pixels = RNG.integers(0, 65536, (300, 200), dtype=np.uint16)
    tifffile.imwrite(grey, pixels, tile=(64, 64), compression="zlib")
    expected = read_large_image(grey)
    with open_slide(grey) as slide:
        assert slide.shape == (300, 200, 3)
        region = slide[70:190, 33:150]
        np.testing.assert_array_equal(region, expected[70:190, 33:150])
        assert (region[:, :, 0] == region[:, :, 2]).all() and region.max() > 200
    with open_slide(grey, in_chans=1) as slide:
        np.testing.assert_array_equal(slide[0:5, 0:5], expected[0:5, 0:5, :1])
    with pytest.raises(ValueError, match="1-channel model"):
        open_slide(tmp_path / "photo.png", in_chans=1)


def geotiff(path, keys, geo_tags, shape=(400, 600)) -> None:
    directory = (1, 1, 0, len(keys), *(v for key, value in keys.items() for v in (key, 0, 1, value)))
    tags = [*geo_tags, (34735, "H", len(directory), directory, True)]
    levels = [np.zeros(shape, np.uint8), np.zeros((shape[0] // 2, shape[1] // 2), np.uint8)]
    write_pyramid(path, levels, extratags=tags)


def test_georeference_from_geotiff_tags(tmp_path):
    path = tmp_path / "ortho.tif"  # UTM 33N, 0.5 m pixels, tiepoint pixel (10, 20) at (500000, 4000000)
    geotiff(path, {1024: 1, 1025: 1, 3072: 32633},
            [(33550, "d", 3, (0.5, 0.5, 0.0), True), (33922, "d", 6, (10, 20, 0, 500000.0, 4000000.0, 0), True)])
    with open_slide(path) as slide:
        georef = slide.georef
        assert georef.crs == "EPSG:32633" and georef.unit == "metre"
        assert georef.transform == pytest.approx((499995.0, 0.5, 0.0, 4000010.0, 0.0, -0.5))
        assert pixel_to_map(georef, 10, 20) == pytest.approx((500000.0, 4000000.0))
    with open_slide(path, level=1) as slide:  # pixels twice as large, the same corner
        assert slide.georef.transform == pytest.approx((499995.0, 1.0, 0.0, 4000010.0, 0.0, -1.0))
        assert pixel_to_map(slide.georef, 5, 10) == pytest.approx((500000.0, 4000000.0))
    rotated = tmp_path / "rotated.tif"  # ModelTransformationTag, geographic, pixel is point: shifted to the corner
    matrix = (0.001, 0.0002, 0, 10.0, 0.0003, -0.001, 0, 50.0, 0, 0, 0, 0, 0, 0, 0, 1)
    geotiff(rotated, {1024: 2, 1025: 2, 2048: 4326}, [(34264, "d", 16, matrix, True)])
    with open_slide(rotated) as slide:
        georef = slide.georef
        assert georef.crs == "EPSG:4326" and georef.unit == "degree"
        assert pixel_to_map(georef, 0.5, 0.5) == pytest.approx((10.0, 50.0))  # the first pixel's centre
        assert pixel_to_map(georef, np.array([2.5]), np.array([1.5]))[0] == pytest.approx([10.0 + 0.002 + 0.0002])
    areas = class_areas(np.array([30, 10]), ["field", "road"],
                        georef=GeoReference((0, 0.5, 0, 0, 0, -0.5), "EPSG:32633", "metre"))
    assert [c["area_m2"] for c in areas["classes"]] == [7.5, 2.5] and areas["pixel_area_m2"] == 0.25


def test_overview_comes_from_the_smallest_level_large_enough(tmp_path):
    path = tmp_path / "slide.tif"
    marks = [np.full((600, 900, 3), 10, np.uint8), np.full((300, 450, 3), 20, np.uint8),
             np.full((150, 225, 3), 30, np.uint8)]  # each level tells which one was read
    write_pyramid(path, marks, photometric="rgb")
    with open_slide(path) as slide:
        small = read_overview(slide, 200)
        assert small.shape == (133, 200, 3) and (small == 30).all()
        middle = read_overview(slide, 300)
        assert middle.shape == (200, 300, 3) and (middle == 20).all()
        assert read_overview(slide, 2000).shape == (600, 900, 3)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, IMAGE, tile=(64, 64), compression="zlib")
    with open_slide(plain) as slide:  # one level, read in bands: the area average of the whole image
        got = read_overview(slide, 225).astype(int)
    expected = IMAGE.reshape(150, 4, 225, 4, 3).mean(axis=(1, 3))
    assert got.shape == (150, 225, 3) and np.abs(got - expected).max() <= 1


def test_write_label_tiff_writes_a_pyramid_band_by_band(tmp_path):
    height, width, tile = 1000, 700, 128
    labels = RNG.integers(0, 6, (height, width), dtype=np.uint8)
    path = tmp_path / "labels.tif"
    written = []

    def bands():
        y = 0
        for rows in (37, 1, 0, 300, 200, 130, 332):
            temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".labels.")]
            written.append(temporary[0].stat().st_size if temporary else 0)
            band = labels[y:y + rows].copy()
            yield band
            band[:] = 99  # a caller reusing its buffer: what was given must be kept
            y += rows

    description = {"classes": ["a", "b", "c", "d", "e", "fé"], "model": "xcit"}
    assert write_label_tiff(path, height, width, bands(), tile=tile, description=description) == path
    assert 0 < written[4] < written[5] < written[6]  # tiles were written before the later bands were made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]
    np.testing.assert_array_equal(tifffile.imread(path), labels)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert json.loads(page.description) == description
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (tile, tile) and page.compression == 8
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(1000, 700), (500, 350), (250, 175), (125, 88)]
        for k, level in enumerate(levels):
            np.testing.assert_array_equal(level.asarray(), labels[::2 ** k, ::2 ** k])
            assert level.keyframe.is_tiled and level.keyframe.compression == 8
    many = RNG.integers(0, 300, (70, 50), dtype=np.uint16)  # more than 256 classes, one level
    small = write_label_tiff(tmp_path / "many.tif", 70, 50, [many[:33], many[33:]], tile=80, compression="lzma")
    with tifffile.TiffFile(small) as tif:
        assert len(tif.series[0].levels) == 1 and tif.pages[0].dtype == np.uint16
        np.testing.assert_array_equal(tif.asarray(), many)


def test_a_failed_label_write_leaves_nothing(tmp_path):
    labels = np.zeros((300, 200), np.uint8)

    def failing():
        yield labels[:150]
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed"):
        write_label_tiff(tmp_path / "out.tif", 300, 200, failing(), tile=64)
    with pytest.raises(ValueError, match=r"expected band 1 \(from row 100\) to be a uint8 array of shape "
                                         r"\(rows, 200\), got uint8 of shape \(200, 199\)"):
        write_label_tiff(tmp_path / "out.tif", 300, 200, [labels[:100], labels[100:, 1:]], tile=64)
    with pytest.raises(ValueError, match="end after 100 rows, the map has 300"):
        write_label_tiff(tmp_path / "out.tif", 300, 200, [labels[:100]], tile=64)
    with pytest.raises(ValueError, match="more than the 300 rows"):
        write_label_tiff(tmp_path / "out.tif", 300, 200, [labels, labels[:1]], tile=64)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        write_label_tiff(tmp_path / "out.tif", 300, 200, [labels.astype(np.int64)], tile=64)
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "out.tif"
    existing.write_bytes(b"earlier")
    with pytest.raises(FileExistsError, match="already exists"):
        write_label_tiff(existing, 300, 200, [labels], tile=64)
    assert existing.read_bytes() == b"earlier"
    write_label_tiff(existing, 300, 200, [labels], tile=64, overwrite=True)
    np.testing.assert_array_equal(tifffile.imread(existing), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    labels = RNG.integers(0, 65536, (1024, 1024), dtype=np.uint16)  # 2 MB that do not compress: more than 256 KB
    folder = tmp_path / "small"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]
    mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True, check=False).returncode == 0
    if not mounted:  # no right to mount: a write that fails as a full disk fails
        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(tifffile.FileHandle, "write", full)
    try:
        with pytest.raises(ValueError, match=r"^cannot write '.*out.tif': the disk is full \(") as caught:
            write_label_tiff(folder / "out.tif", 1024, 1024, [labels[:500], labels[500:]], tile=128)
        assert "\n" not in str(caught.value) and list(folder.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_class_areas_overlay_and_json(tmp_path):
    areas = class_areas(np.array([600, 300, 100]), ["tumour", "stroma", "background", "fat"], mpp=(0.5, 0.25))
    assert areas["pixels"] == 1000 and areas["pixel_area_um2"] == 0.125
    assert [c["fraction"] for c in areas["classes"]] == [0.6, 0.3, 0.1, 0.0]
    assert areas["classes"][0] == {"index": 0, "name": "tumour", "pixels": 600, "fraction": 0.6, "area_um2": 75.0,
                                   "area_mm2": pytest.approx(75e-6)}
    with pytest.raises(ValueError, match="at most 2 counts"):
        class_areas(np.array([1, 2, 3]), ["a", "b"])
    report = write_json_atomically(tmp_path / "areas.json", areas)
    assert json.loads(report.read_text()) == json.loads(json.dumps(areas))
    with pytest.raises(FileExistsError):
        write_json_atomically(report, {})
    image = np.full((4, 6, 3), 100, np.uint8)
    labels = np.array([[0, 1, 255, 0, 1, 2]] * 4, np.uint8)
    png = write_overlay(tmp_path / "overlay.png", image, labels, [(255, 0, 0), (0, 0, 255)], alpha=0.5)
    got = np.asarray(Image.open(png))
    assert tuple(got[0, 0]) == (178, 50, 50) and tuple(got[0, 1]) == (50, 50, 178)
    assert tuple(got[0, 2]) == (100, 100, 100) == tuple(got[0, 5])  # no colour for 255 or 2: the image shows
    with pytest.raises(FileExistsError):
        write_overlay(png, image, labels, [(255, 0, 0)])
    with pytest.raises(ValueError, match="overview's size"):
        write_overlay(tmp_path / "other.png", image, labels[:2], [(255, 0, 0)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["areas.json", "overlay.png"]
