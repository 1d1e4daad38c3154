"""Detection of any size (xcit.detect.tiled): one tile is ``model([image])``, the tiled neck is the whole image's,
seams report an object once, proposal budgets scale with the tile, outputs (COCO RLE, GeoJSON, overlay), bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xcit.data.slides import GeoReference, pixel_to_map
from xcit.data.trees import read_voc
from xcit.detect.model import build_detector, set_test_size
from xcit.detect.tiled import (
    Tile,
    detect_large,
    merge_detections,
    patch_rle,
    plan_tiles,
    predict_large_file,
    reference_area,
    tile_budgets,
    tile_features,
    tile_starts,
)
from xcit.detect.transform import paste_masks
from xcit.inference.dense import stream_pyramid

TINY = dict(embed_dim=32, depth=2, num_heads=2)
HEADS = dict(fpn_channels=32, box_head_dim=64, mask_head_channels=16, rpn_pre_nms_test=200, rpn_post_nms_test=100,
             anchor_sizes=[8, 16, 32, 64, 128], min_size=[96], max_size=256)


def tiny_detector(kind: str = "faster_rcnn", patch: int = 16, seed: int = 0, **arch):
    torch.manual_seed(seed)
    return build_detector(1, arch=dict(patch_size=patch, **TINY, **arch), kind=kind, **HEADS).eval()


@pytest.fixture(scope="module")
def aerial() -> np.ndarray:
    """deepforest's OSBS_029 (400 x 400 RGB aerial image, NEON): real texture for the detectors."""
    return read_voc("OSBS_029")[0]


def normalised(model, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """The model's normalised, zero-padded batch of ``image`` (what its transform gives the backbone)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    x = model.transform.normalize(x)[None]
    return F.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]))


def test_one_tile_gives_the_boxes_of_whole_image_predict(aerial):
    model = tiny_detector()
    set_test_size(model, 0)  # `detect predict --test-size 0`: the image at its own resolution
    image = np.ascontiguousarray(aerial[:390, :301])  # padded to 416 x 320 by both paths
    with torch.no_grad():
        ref = model([torch.from_numpy(image).permute(2, 0, 1).float().div(255)])[0]
    assert ref["boxes"].shape[0] > 10
    for tile in (None, 1024):  # no tiling, and a tile larger than the image
        got = detect_large(model, image, tile=tile, overlap=0)
        assert len(got.tiles) == 1
        assert got.boxes.shape == ref["boxes"].shape
        # the same detections, up to the order of equal scores: each matches one of the other's within 1e-3
        diff = (got.boxes[:, None] - ref["boxes"][None]).abs().amax(-1) + (got.labels[:, None] != ref["labels"])
        assert (diff.amin(0) < 1e-3).all() and (diff.amin(1) < 1e-3).all()
        assert (got.scores - ref["scores"]).abs().max() < 1e-4


@pytest.mark.parametrize("in_chans", [3, 1])
def test_tiled_neck_equals_the_whole_image_neck_in_every_tile(aerial, in_chans):
    model = tiny_detector(patch=8, in_chans=in_chans)
    image = np.ascontiguousarray(aerial[:230, :270])
    tiles = plan_tiles(230, 270, 128, 64)  # padded to 256 x 288; tiles start at 0, 64, 128; the last column 160 wide
    assert [(t.y0, t.x0, t.height, t.width) for t in tiles][:3] == [(0, 0, 128, 128), (0, 64, 128, 128),
                                                                     (0, 128, 128, 160)] and len(tiles) == 3 * 3
    with torch.no_grad():
        whole = model.backbone(normalised(model, image, (256, 288)))  # XCiTFPN: grey trunks get the RGB mean
        from xcit.detect.tiled import _GreyView

        mean, std = model.transform.image_mean, model.transform.image_std
        source = _GreyView(image, mean, std) if in_chans == 1 else image
        stream = stream_pyramid(model.backbone.body, *((None, None) if in_chans == 1 else (mean, std)),
                                tokens_per_chunk=97)
        with stream.maps(source, pad_to=(256, 288)) as maps:
            for t in tiles:
                feats = tile_features(model.backbone.fpn, maps, t)
                for level, stride in enumerate((4, 8, 16, 32)):
                    ref = whole[str(level)][:, :, t.y0 // stride:(t.y0 + t.height) // stride,
                                            t.x0 // stride:(t.x0 + t.width) // stride]
                    assert feats[str(level)].shape == ref.shape
                    assert (feats[str(level)] - ref).abs().max() < 1e-5, (t, level)
                # P6 subsamples P5 from the tile's origin: tiles start on the stride-64 grid, so it is the image's
                ref = whole["pool"][:, :, t.y0 // 64:, t.x0 // 64:][..., :feats["pool"].shape[-2],
                                                                    :feats["pool"].shape[-1]]
                assert feats["pool"].shape == ref.shape and (feats["pool"] - ref).abs().max() < 1e-5


def test_tiles_cover_the_image_and_cores_partition_it():
    assert tile_starts(320, 1024, 256) == [0]
    assert tile_starts(2048, 1024, 256) == [0, 512, 1024]  # the fewest tiles with step <= 768, spread evenly
    starts = tile_starts(1000 // 32 * 32 + 32, 256, 64)
    assert starts[0] == 0 and starts[-1] + 256 == 1024 and all(s % 32 == 0 for s in starts)
    assert all(b - a <= 192 for a, b in zip(starts, starts[1:]))
    tiles = plan_tiles(1000, 700, 256, 64)
    ys, xs = np.meshgrid(np.arange(0, 1000, 7.5), np.arange(0, 700, 7.5), indexing="ij")
    owners = sum(((ys >= t.core[0]) & (ys < t.core[1]) & (xs >= t.core[2]) & (xs < t.core[3])).astype(int)
                 for t in tiles)
    assert (owners == 1).all()  # every point belongs to exactly one core
    for t in tiles:  # ... and lies at least overlap / 2 inside its tile, unless at the image's edge
        for lo, hi, start, size, end in ((t.core[0], t.core[1], t.y0, t.height, 1024),
                                         (t.core[2], t.core[3], t.x0, t.width, 704)):
            assert lo == -math.inf or lo >= start + 32
            assert hi == math.inf or hi <= start + size - 32


def test_an_object_on_a_seam_is_reported_once():
    tiles = plan_tiles(256, 448, 256, 64)  # two tiles side by side: x in [0, 256) and [192, 448), cut at x = 224
    assert [(t.x0, t.core[2], t.core[3]) for t in tiles] == [(0, -math.inf, 224.0), (192, 224.0, math.inf)]
    boxes = torch.tensor([
        [200.0, 40, 250, 90],   # tile 0: a crown across the seam, whole in tile 0, centre 225 -> tile 1's core
        [202.0, 41, 250, 91],   # tile 1: the same crown, centre 226: tile 1 owns it
        [200.0, 40, 255, 90],   # tile 0: truncated at tile 0's edge (x = 256), centre 227.5 -> not tile 0's
        [210.0, 120, 236, 150],  # tile 0: a crown centred at 223, inside tile 0's core ...
        [212.0, 120, 238, 150],  # tile 1: ... and its copy in tile 1, centre 225: kept by its core, removed by NMS
        [100.0, 100, 130, 130],  # tile 0: an ordinary crown
        [300.0, 100, 330, 130],  # tile 1: an ordinary crown
        [216.0, 200, 236, 220],  # tile 1: a small crown next to the seam, overlapping nothing: kept
        [196.0, 160, 222, 194],  # tile 0: a crown centred at x = 209 ...
        [192.0, 150, 259, 199],  # tile 1: ... seen larger by tile 1 (centre 225.5): IoU 0.27, but the smaller
                                 # box wholly inside it: the same crown, the lower score goes
        [100.0, 180, 140, 220],  # tile 0: two boxes of one tile, one inside the other: the model's NMS kept
        [105.0, 185, 125, 205],  # both, and the merge leaves them
    ])
    scores = torch.tensor([0.9, 0.85, 0.8, 0.7, 0.75, 0.6, 0.6, 0.5, 0.45, 0.4, 0.3, 0.2])
    labels = torch.ones(12, dtype=torch.int64)
    tile_ids = torch.tensor([0, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0])
    keep = merge_detections(boxes, scores, labels, tile_ids, tiles, iou_thresh=0.5).tolist()
    assert keep == [1, 4, 5, 6, 7, 8, 10, 11]  # each crown once; the higher-scoring copy of the boundary crowns
    other = labels.clone()
    other[4] = other[9] = 2
    assert merge_detections(boxes, scores, other, tile_ids, tiles, 0.5).tolist() == [1, 4, 3, 5, 6, 7, 8, 9, 10, 11]


def test_proposal_budgets_scale_with_the_tile_area(aerial):
    model = tiny_detector()
    assert reference_area(model) == 96 * 96  # the test size (from min_size [96]) squared
    assert tile_budgets(model, 96 * 96) == {"pre_nms": 200, "post_nms": 100, "detections": 100}
    assert tile_budgets(model, 4 * 96 * 96) == {"pre_nms": 800, "post_nms": 400, "detections": 400}
    assert tile_budgets(model, 1, reference=10**9) == {"pre_nms": 1, "post_nms": 1, "detections": 1}
    seen = []
    model.rpn.register_forward_pre_hook(lambda m, args: seen.append((m._pre_nms_top_n["testing"],
                                                                      m._post_nms_top_n["testing"])))
    detect_large(model, np.ascontiguousarray(aerial[:180, :220]), tile=128, overlap=32)  # 2 x 2 tiles
    assert seen[0] == (round(200 * 128 * 128 / 96**2), round(100 * 128 * 128 / 96**2)) and len(seen) == 2 * 2
    assert seen[-1] == (round(200 * 116 * 156 / 96**2), round(100 * 116 * 156 / 96**2))  # by the area in the image
    assert model.rpn._pre_nms_top_n["testing"] == 200 and model.roi_heads.detections_per_img == 100  # restored
    seen.clear()
    detect_large(model, np.ascontiguousarray(aerial[:180, :220]), tile=None, overlap=0)
    assert seen == [(200, 100)]  # one tile: the model's own settings, as model([image])


def test_masks_are_box_relative_and_written_as_rle():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for ya, xa, h, w, size in [(3, 5, 7, 4, (20, 30)), (0, 2, 20, 3, (20, 30)), (10, 29, 10, 1, (20, 30))]:
        patch = rng.random((h, w)) > 0.4
        patch[:, 0] = True  # a run through the bottom row into the next column (joined in the RLE)
        full = np.zeros(size, np.uint8)
        full[ya:ya + h, xa:xa + w] = patch
        assert patch_rle(patch, ya, xa, size)["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"].decode()
    model = tiny_detector("mask_rcnn")
    image = read_voc("OSBS_029")[0][:160, :192].copy()
    found = detect_large(model, image, tile=128, overlap=32)
    assert found.masks is not None and found.masks.shape[1:] == (1, 28, 28)
    from xcit.detect.tiled import coco_results

    results = coco_results(found, 1, {1: 1})
    pasted = paste_masks(found.masks, found.boxes, found.image_size, compact=True)
    for r, m in zip(results, pasted[:, 0].numpy().astype(np.uint8)):
        assert r["segmentation"]["counts"] == mask_utils.encode(np.asfortranarray(m))["counts"].decode()


def test_predict_large_file_writes_coco_geojson_overlay_atomically(tmp_path, aerial):
    from PIL import Image

    model = tiny_detector("mask_rcnn")
    path = tmp_path / "site.png"
    Image.fromarray(aerial[:200, :260]).save(path)
    georef = GeoReference((404211.9, 0.1, 0.0, 3285142.9, 0.0, -0.1), "EPSG:32617", "metre")
    out = tmp_path / "out"
    summary = predict_large_file(model, {"classes": ["tree"], "category_ids": [1]}, path, out, tile=128, overlap=32,
                                 score_thresh=0.0, georef=georef, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["site.geojson", "site_overlay.png", "site_predictions.json"]
    coco = json.loads((out / "site_predictions.json").read_text())
    assert coco["images"][0]["height"] == 200 and coco["tiling"]["tiles"] == summary["tiles"] == 2 * 3
    assert len(coco["annotations"]) == summary["detections"] > 0
    assert {"bbox", "score", "category_id", "segmentation"} <= set(coco["annotations"][0])
    geo = json.loads((out / "site.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coco["annotations"])
    x, y, w, h = coco["annotations"][0]["bbox"]
    assert np.allclose(geo["features"][0]["geometry"]["coordinates"][0][0], pixel_to_map(georef, x, y), atol=1e-3)
    assert geo["crs"]["properties"]["name"] == "EPSG:32617"
    assert Image.open(out / "site_overlay.png").size == (260, 200)
    with pytest.raises(FileExistsError, match="already holds"):
        predict_large_file(model, {}, path, out, tile=128, overlap=32, georef=georef, progress=False)


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    model = tiny_detector()
    for image, problem in [(np.zeros((10, 400, 3), np.uint8), "at least 16x16 pixels"),
                           (np.zeros((64, 64), np.uint8), r"uint8 \(H, W, 3\)"),
                           (np.zeros((64, 64, 3), np.float32), r"uint8 \(H, W, 3\)")]:
        with pytest.raises(ValueError, match=problem) as err:
            detect_large(model, image, tile=128, overlap=0, name="scene.tif")
        assert "scene.tif" in str(err.value) and "\n" not in str(err.value)
    for tile, overlap in [(100, 0), (64, 0), (256, 256), (256, 40)]:
        with pytest.raises(ValueError, match="multiple of 32"):
            detect_large(model, np.zeros((64, 64, 3), np.uint8), tile=tile, overlap=overlap)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png") as err:
        predict_large_file(model, {}, bad, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        detect_large(model, np.zeros((64, 64, 3), np.uint8))
    assert isinstance(Tile(0, 0, 32, 32, (32, 32), (0, 1, 0, 1)), Tile)


def test_detect_predict_streams_a_georeferenced_tiff(tmp_path, capsys):
    """`xcit detect predict --streaming always` on deepforest's GeoTIFF: COCO JSON, GeoJSON in its UTM zone, overlay."""
    from test_cli_errors import run

    from xcit.data.packaged import package_file
    from xcit.detect.model import detector_state

    model = tiny_detector()
    set_test_size(model, 0)
    ckpt = tmp_path / "det.pt"
    torch.save(detector_state(model, {"classes": ["tree"]}), ckpt)
    tif = tmp_path / "OSBS_029.tif"
    tif.write_bytes(package_file("deepforest", "data/OSBS_029.tif", None, ""))
    out = tmp_path / "out"
    argv = ["detect", "predict", str(tif), "--checkpoint", str(ckpt), "--streaming", "always", "--tile", "256",
            "--overlap", "64", "--score-thresh", "0", "--device", "cpu", "-o", str(out)]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    coco = json.loads((out / "OSBS_029_predictions.json").read_text())
    geo = json.loads((out / "OSBS_029.geojson").read_text())
    assert coco["tiling"]["tiles"] == 4 and len(geo["features"]) == len(coco["annotations"]) > 0
    x, y = geo["features"][0]["geometry"]["coordinates"][0][0]
    assert 404211 <= x <= 404252 and 3285102 <= y <= 3285143  # the image's 40 m x 40 m in EPSG:32617
    assert (out / "OSBS_029_overlay.png").stat().st_size > 0
    code, _, err = run(argv, capsys)
    assert code == 2 and "--overwrite" in err
