"""The official COCO (mmdet 2.11) and ADE20k (mmseg 0.11) checkpoints: synthetic files in exactly the layouts
of ``reference/layouts/*.json`` load with every key accounted for, and the conventions where torchvision
differs from mmdet (class order, aligned RoIAlign, level mapping, anchors, box decoding, mask pasting)
are checked against independent computations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from xcit.detect.mmdet_compat import (
    COCO_CLASSES, MMDetAnchorGenerator, MMDetBoxCoder, background_first, mmdet_to_torchvision,
    paste_masks_mmdet,
)
from xcit.detect.recipe import MMDetRoIAlign, map_roi_levels
from xcit.detect.model import build_detector, load_detector, load_mmdet_detector, set_test_size
from xcit.models.weights import CheckpointError
from xcit.segment.heads import Segmenter
from xcit.segment.mmseg_compat import load_mmseg_segmenter, mmseg_to_segmenter
from xcit.segment.model import load_segmenter

LAYOUTS = Path(__file__).resolve().parents[1] / "reference" / "layouts"
MMDET = json.loads((LAYOUTS / "mmdet_coco_mask_rcnn.json").read_text())["configs"]
MMSEG = json.loads((LAYOUTS / "mmseg_ade20k.json").read_text())["configs"]


def synthetic(layout: list, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the listed shapes (BatchNorm variances positive, counters integers)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout:
        if device == "meta":
            out[key] = torch.empty(shape, device="meta", dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
    return out


def _backbone(cfg: dict) -> dict:
    return {k: cfg["backbone"][k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}


# ----------------------------------------------------------------------------- COCO Mask R-CNN


@pytest.mark.parametrize("name", sorted(MMDET))
def test_every_coco_config_maps_key_for_key(name):
    """All eight official COCO layouts: each key renamed, none left, shapes equal to the detector's."""
    cfg = MMDET[name]
    with torch.device("meta"):
        model = build_detector(80, arch=_backbone(cfg), out_indices=cfg["backbone"]["out_indices"], conventions="mmdet")
    converted, unknown = mmdet_to_torchvision(synthetic(cfg["state_dict"], "meta"))
    own = model.state_dict()
    assert unknown == [] and sorted(converted) == sorted(own)
    assert all(converted[k].shape == v.shape for k, v in own.items())


@pytest.fixture(scope="module")
def coco_tiny(tmp_path_factory):
    state = synthetic(MMDET["xcit_tiny_12_p16"]["state_dict"])
    # mmdet's class 3 ("motorcycle") wins every box: its classifier bias dominates, background (last) loses.
    state["roi_head.bbox_head.fc_cls.bias"][:] = -10.0
    state["roi_head.bbox_head.fc_cls.bias"][3] = 10.0
    state["roi_head.mask_head.conv_logits.bias"][:] = -5.0
    state["roi_head.mask_head.conv_logits.bias"][3] = 5.0  # its mask: all foreground
    path = tmp_path_factory.mktemp("coco") / "maskrcnn_xcit_tiny_12_p16.pth"
    torch.save({"meta": {"mmdet_version": "2.11.0", "CLASSES": COCO_CLASSES, "epoch": 36}, "state_dict": state}, path)
    return path, state


def test_official_coco_file_loads_and_predicts_in_coco_order(coco_tiny):
    path, state = coco_tiny
    model, meta = load_detector(path)
    assert meta["classes"] == list(COCO_CLASSES) and meta["category_ids"][:3] == [1, 2, 3] and meta["category_ids"][-1] == 90
    assert model.detector_config["conventions"] == "mmdet" and model.transform.test_size == 800
    assert model.transform.max_size == 1333 and model.roi_heads.box_roi_pool.aligned
    from xcit.detect.model import detector_from_config

    rebuilt = detector_from_config(model.detector_config)  # what `xcit detect` checkpoints store: conventions kept
    assert type(rebuilt.transform).__name__ == "MMDetTransform" and type(rebuilt.rpn.box_coder).__name__ == "MMDetBoxCoder"
    # every tensor of the file is in the model (renamed, permuted or padded), none invented
    own = model.state_dict()
    assert torch.equal(own["backbone.body.blocks.11.attn.qkv.weight"], state["backbone.blocks.11.attn.qkv.weight"])
    assert torch.equal(own["rpn.head.conv.0.0.weight"], state["rpn_head.rpn_conv.weight"])
    assert torch.equal(own["roi_heads.box_predictor.bbox_pred.weight"][4:], state["roi_head.bbox_head.fc_reg.weight"])
    set_test_size(model, 160, 224)  # small for a quick test
    image = torch.rand(3, 150, 200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model([image])[0]
    assert len(out["labels"]) > 0
    assert (out["labels"] == 4).all()  # torchvision label 4 = mmdet class 3 (background moved to 0)
    assert meta["classes"][out["labels"][0] - 1] == "motorcycle"
    assert out["masks"].shape[-2:] == (150, 200) and out["boxes"][:, 2].max() <= 200


def test_a_checkpoint_of_another_config_is_refused_with_the_difference(coco_tiny, tmp_path):
    _, state = coco_tiny
    agnostic = dict(state)
    agnostic["roi_head.bbox_head.fc_reg.weight"] = state["roi_head.bbox_head.fc_reg.weight"][:4]  # class-agnostic regression
    agnostic["roi_head.bbox_head.fc_reg.bias"] = state["roi_head.bbox_head.fc_reg.bias"][:4]
    del agnostic["roi_head.mask_head.upsample.weight"]
    agnostic["roi_head.bbox_head.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": agnostic}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as err:
        load_mmdet_detector(tmp_path / "other.pth")
    text = str(err.value)
    assert "official XCiT Mask R-CNN configs" in text and "xcit_tiny_12_p16" in text
    assert "roi_heads.mask_predictor.conv5_mask.weight" in text  # missing
    assert "roi_head.bbox_head.extra.weight" in text  # unexpected
    assert "bbox_pred.weight: file (8, 1024)" in text  # mismatched
    torch.save({"state_dict": synthetic(MMSEG["upernet_xcit_tiny_12_p16"]["state_dict"][-8:])}, tmp_path / "seg.pth")
    with pytest.raises(CheckpointError, match="not a detection checkpoint"):
        load_detector(tmp_path / "seg.pth")


def test_class_order_background_last_to_first():
    """mmdet's softmax over [80 classes, background] equals torchvision's over [background, 80 classes], permuted."""
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(81, 16, generator=g), torch.randn(81, generator=g), torch.randn(5, 16, generator=g)
    mm = torch.softmax(x @ w.T + b, dim=1)
    tv = torch.softmax(x @ background_first(w).T + background_first(b), dim=1)
    assert torch.allclose(tv[:, 0], mm[:, 80]) and torch.allclose(tv[:, 1:], mm[:, :80])


def _bilinear(img: np.ndarray, y: float, x: float) -> float:
    """detectron2 / mmcv RoIAlign's bilinear sample: 0 outside [-1, H] x [-1, W], borders clamped."""
    h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    y = float(y0) if y0 >= h - 1 else y
    x = float(x0) if x0 >= w - 1 else x
    ly, lx = y - y0, x - x0
    return (1 - ly) * (1 - lx) * img[y0, x0] + (1 - ly) * lx * img[y0, x1] + ly * (1 - lx) * img[y1, x0] + ly * lx * img[y1, x1]


def _roi_align_reference(img: np.ndarray, box, scale: float, out: int) -> np.ndarray:
    """mmcv RoIAlign(aligned=True, sampling_ratio=0) written out: shift by half a pixel, ceil(bin) samples per bin."""
    x1, y1, x2, y2 = (c * scale - 0.5 for c in box)
    bw, bh = (x2 - x1) / out, (y2 - y1) / out
    ny, nx = math.ceil((y2 - y1) / out), math.ceil((x2 - x1) / out)
    res = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            s = 0.0
            for a in range(ny):
                for b in range(nx):
                    s += _bilinear(img, y1 + i * bh + (a + 0.5) * bh / ny, x1 + j * bw + (b + 0.5) * bw / nx)
            res[i, j] = s / (ny * nx)
    return res


def test_aligned_roi_align_with_adaptive_sampling_matches_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(1, 2, 64 >> i, 80 >> i, generator=g) for i in range(4)}
    boxes = torch.tensor([[3.3, 5.1, 40.7, 30.2], [10.0, 12.0, 150.0, 120.0], [0.0, 0.0, 300.0, 250.0], [100.5, 60.25, 230.0, 200.0]])
    pooled = MMDetRoIAlign(7)(feats, [boxes], [(256, 320)])
    levels = map_roi_levels(boxes).tolist()
    assert levels == [0, 1, 2, 1]  # sqrt(area) 35 / 123 / 274 / 136 against 56 * 2^k
    for n, (box, level) in enumerate(zip(boxes.tolist(), levels)):
        for c in range(2):
            ref = _roi_align_reference(feats[str(level)][0, c].numpy().astype(np.float64), box, 1 / 2 ** (level + 2), 7)
            assert np.allclose(pooled[n, c].numpy(), ref, atol=1e-5)


def test_level_mapping_follows_mmdet_not_torchvision():
    sides = torch.tensor([55.9, 56.0, 111.9, 112.0, 223.9, 224.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    expected = [min(max(math.floor(math.log2(s / 56 + 1e-6)), 0), 3) for s in sides.tolist()]
    assert map_roi_levels(boxes).tolist() == expected == [0, 0, 0, 1, 1, 2, 3, 3]


def test_box_decoding_matches_mmdet_delta2bbox():
    """mmdet 2.11 delta2bbox, means 0, stds (0.1, 0.1, 0.2, 0.2), wh_ratio_clip 16/1000, written out in numpy."""
    g = torch.Generator().manual_seed(0)
    props = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 300.0, 100.0], [5.5, 6.5, 7.5, 9.0]])
    deltas = torch.randn(3, 8, generator=g) * 3
    deltas[0, 2] = -80.0  # a log-width far below -log(1000/16): mmdet clamps it, torchvision would not
    decoded = MMDetBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, props)
    stds, clip = np.array([0.1, 0.1, 0.2, 0.2] * 2), abs(np.log(16 / 1000))
    d = deltas.numpy().astype(np.float64) * stds
    p = props.numpy().astype(np.float64)
    px, py = (p[:, 0:1] + p[:, 2:3]) / 2, (p[:, 1:2] + p[:, 3:4]) / 2
    pw, ph = p[:, 2:3] - p[:, 0:1], p[:, 3:4] - p[:, 1:2]
    dw, dh = np.clip(d[:, 2::4], -clip, clip), np.clip(d[:, 3::4], -clip, clip)
    gx, gy, gw, gh = px + pw * d[:, 0::4], py + ph * d[:, 1::4], pw * np.exp(dw), ph * np.exp(dh)
    ref = np.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], axis=2).reshape(3, 8)
    assert np.allclose(decoded.numpy(), ref, rtol=1e-5, atol=1e-4)
    assert decoded[0, 2] - decoded[0, 0] == pytest.approx(40 * 16 / 1000, rel=1e-4)


def test_anchors_are_mmdets_unrounded_ones():
    gen = MMDetAnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    base = gen.cell_anchors[0] if gen.cell_anchors else gen.generate_anchors((32,), (0.5, 1.0, 2.0))
    for row, ratio in zip(base.tolist(), (0.5, 1.0, 2.0)):  # mmdet: h = 32 sqrt(r), w = 32 / sqrt(r), centre 0
        w, h = 32 / math.sqrt(ratio), 32 * math.sqrt(ratio)
        assert row == pytest.approx([-w / 2, -h / 2, w / 2, h / 2], abs=1e-5)
    assert base[0, 0] != round(float(base[0, 0]))  # torchvision would round -22.63 to -23


def test_anchor_grid_uses_the_configured_strides():
    """An 800 x 1088 padded image: P6 is 13 x 17 cells; mmdet places them 64 px apart (torchvision: 800 // 13 = 61)."""
    from torchvision.models.detection.image_list import ImageList

    sizes, ratios = tuple((8 * s,) for s in (4, 8, 16, 32, 64)), ((0.5, 1.0, 2.0),) * 5
    grids = [(200, 272), (100, 136), (50, 68), (25, 34), (13, 17)]
    feats = [torch.zeros(1, 1, h, w) for h, w in grids]
    anchors = MMDetAnchorGenerator(sizes, ratios)(ImageList(torch.zeros(1, 3, 800, 1088), [(800, 1067)]), feats)[0]
    counts = [3 * h * w for h, w in grids]
    p6 = anchors[sum(counts[:4]):].view(13, 17, 3, 4)
    centres = (p6[..., :2] + p6[..., 2:]) / 2
    assert torch.allclose(centres[12, 16, 1], torch.tensor([16 * 64.0, 12 * 64.0]))
    assert torch.allclose(p6[0, 0, 1], torch.tensor([-256.0, -256.0, 256.0, 256.0]))  # scale 8 x stride 64, ratio 1


def test_mask_pasting_matches_pixel_centre_sampling():
    mask = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[10.3, 5.7, 40.1, 33.9]])
    pasted = paste_masks_mmdet(mask, box, (50, 60))[0, 0]
    m = mask[0, 0].numpy().astype(np.float64)
    for y, x in [(6, 11), (20, 25), (33, 39), (2, 2), (5, 10), (34, 41)]:
        # pixel centre -> mask coordinates (align_corners=False), zero padding outside the mask
        u = ((x + 0.5 - 10.3) / (40.1 - 10.3)) * 28 - 0.5
        v = ((y + 0.5 - 5.7) / (33.9 - 5.7)) * 28 - 0.5
        x0, y0 = math.floor(u), math.floor(v)
        val = 0.0
        for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
            for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
                if 0 <= yy < 28 and 0 <= xx < 28:
                    val += wy * wx * m[yy, xx]
        assert float(pasted[y, x]) == pytest.approx(val, abs=1e-5)


# ----------------------------------------------------------------------------- ADE20k Semantic FPN / UperNet


@pytest.mark.parametrize("name", sorted(MMSEG))
def test_every_ade20k_config_maps_key_for_key(name):
    cfg = MMSEG[name]
    converted, unknown = mmseg_to_segmenter(synthetic(cfg["state_dict"], "meta"))
    m = cfg["model"]
    from xcit.models import XCiTPyramid

    with torch.device("meta"):
        pyramid = XCiTPyramid(out_indices=cfg["backbone"]["out_indices"], **_backbone(cfg))
        if "neck" in m:
            model = Segmenter(pyramid, 150, head="fpn", channels=128, fpn_channels=m["neck"]["out_channels"], aux=False)
        else:
            model = Segmenter(pyramid, 150, head="upernet", channels=512, aux=True, aux_channels=256, aux_level=2)
    own = model.state_dict()
    assert unknown == [] and sorted(converted) == sorted(own)
    assert all(converted[k].shape == v.shape for k, v in own.items())
    assert cfg["model"]["test_cfg"] == {"mode": "whole"} and cfg["test_pipeline"]["img_scale"] == [2048, 512]


@pytest.mark.parametrize("name", ["sem_fpn_xcit_tiny_12_p8", "upernet_xcit_tiny_12_p16"])
def test_official_ade20k_file_loads_with_its_test_pipeline(name, tmp_path):
    state = synthetic(MMSEG[name]["state_dict"])
    torch.save({"meta": {"mmseg_version": "0.11.0"}, "state_dict": state}, tmp_path / f"{name}.pth")
    model, meta = load_segmenter(tmp_path / f"{name}.pth")
    assert model.num_classes == 150 and meta["classes"][:3] == ["wall", "building", "sky"] and len(meta["classes"]) == 150
    assert meta["eval"] == {"mode": "whole", "scale": [2048, 512]} and meta["reduce_zero_label"]
    assert model.head_config["head"] == ("fpn" if name.startswith("sem_fpn") else "upernet")
    assert model.head_config["aux"] == name.startswith("upernet")
    own = model.state_dict()
    if name.startswith("sem_fpn"):  # scale_heads.3.4 (third conv after two Upsample modules) -> block 2
        assert torch.equal(own["decode_head.scale_heads.3.2.1.running_var"], state["decode_head.scale_heads.3.4.bn.running_var"])
        assert model.head_config["fpn_upsample"] == "x2"
        assert model.head_config["fpn_channels"] == 192  # the neck is as wide as the backbone in these configs
    else:
        assert torch.equal(own["aux_head.conv.0.weight"], state["auxiliary_head.convs.0.conv.weight"])
        assert torch.equal(own["decode_head.fuse.1.weight"], state["decode_head.fpn_bottleneck.bn.weight"])
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 80)).shape == (1, 150, 64, 80)


def test_ade20k_file_of_another_config_is_refused(tmp_path):
    state = synthetic(MMSEG["upernet_xcit_tiny_12_p16"]["state_dict"])
    state["decode_head.bottleneck.conv.weight"] = state["decode_head.bottleneck.conv.weight"][:, :100]
    state.pop("decode_head.fpn_convs.2.bn.weight")
    torch.save({"state_dict": state}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError) as err:
        load_mmseg_segmenter(tmp_path / "x.pth")
    assert "official XCiT ADE20k configs" in str(err.value) and "decode_head.fpn.2.1.weight" in str(err.value)
    assert "decode_head.bottleneck.0.weight: file (512, 100, 3, 3)" in str(err.value)


def test_release_names_fail_at_once_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("XCIT_WEIGHTS_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    torch.hub.set_dir(str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match=r"maskrcnn_xcit_tiny_12_p16\.pth.*checkpoint=PATH.*XCIT_WEIGHTS_URL"):
        load_detector("maskrcnn_xcit_tiny_12_p16")
    with pytest.raises(RuntimeError, match=r"upernet_xcit_small_12_p8\.pth"):
        load_segmenter("upernet_xcit_small_12_p8")


def test_cli_predicts_with_the_official_files(coco_tiny, tmp_path, capsys):
    """`xcit detect predict` / `xcit segment predict` take the release files as --checkpoint."""
    from PIL import Image

    from xcit.cli import main

    Image.fromarray((np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    rc = main(["detect", "predict", str(tmp_path / "a.png"), "--checkpoint", str(coco_tiny[0]), "--out", str(tmp_path / "det"),
               "--test-size", "128", "--max-size", "192", "--device", "cpu"])
    assert rc == 0
    found = json.loads((tmp_path / "det" / "predictions.json").read_text())
    assert found["annotations"] and {d["category_id"] for d in found["annotations"]} == {4}  # COCO id of "motorcycle"
    assert {"id": 4, "name": "motorcycle"} in found["categories"]
    state = synthetic(MMSEG["sem_fpn_xcit_tiny_12_p16"]["state_dict"])
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "sem_fpn.pth")
    rc = main(["segment", "predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "sem_fpn.pth"),
               "--out", str(tmp_path / "seg"), "--scale", "128", "64", "--device", "cpu"])
    assert rc == 0 and (tmp_path / "seg" / "a_mask.png").is_file()


def test_compact_mask_pasting_thresholds_at_one_half():
    mask = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[1.2, 2.5, 30.0, 20.0], [10.0, 10.0, 45.5, 38.0]])
    full, compact = paste_masks_mmdet(mask, boxes, (40, 50)), paste_masks_mmdet(mask, boxes, (40, 50), compact=True)
    assert compact.dtype == torch.bool and torch.equal(compact, full >= 0.5)


def test_semantic_fpn_upsamples_by_two_like_mmseg():
    """mmseg's FPNHead: x2 bilinear after each conv above level 0, each level resized to level 0 before the sum."""
    import torch.nn.functional as F

    from xcit.segment.heads import SemanticFPNHead

    torch.manual_seed(0)
    head = SemanticFPNHead([8] * 4, 3, fpn_channels=8, channels=4, upsample="x2").eval()
    size_mode = SemanticFPNHead([8] * 4, 3, fpn_channels=8, channels=4).eval()
    size_mode.load_state_dict(head.state_dict())
    feats = [torch.randn(1, 8, h, w) for h, w in [(20, 28), (10, 14), (5, 7), (2, 3)]]  # a 5 x 7 stride-16 grid
    with torch.no_grad():
        pyramid = head.neck(feats)
        expected = None
        for level, (blocks, x) in enumerate(zip(head.scale_heads, pyramid)):
            for block in blocks:
                x = block(x)
                if level:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.interpolate(x, size=(20, 28), mode="bilinear", align_corners=False) if x.shape[-2:] != (20, 28) else x
            expected = x if expected is None else expected + x
        assert torch.allclose(head(feats), head.classifier(expected), atol=1e-6)
        assert not torch.allclose(head(feats), size_mode(feats), atol=1e-4)  # level 3 (2 x 3) -> 16 x 24, not 20 x 28
        even = [torch.randn(1, 8, h, w) for h, w in [(16, 24), (8, 12), (4, 6), (2, 3)]]
        assert torch.allclose(head(even), size_mode(even), atol=1e-6)


def test_test_resize_follows_mmdet():
    """Keep-ratio into 1333 x 800 with mmdet's rounding, 8-bit values, normalised after resizing, padded to 32."""
    import torch.nn.functional as F

    from xcit.detect.mmdet_compat import MMDetTransform

    t = MMDetTransform([800], 800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    image = torch.randint(0, 256, (3, 427, 640), generator=torch.Generator().manual_seed(0)).float() / 255
    batch, _ = t([image])
    scale = min(1333 / 640, 800 / 427)
    size = (int(427 * scale + 0.5), int(640 * scale + 0.5))  # mmcv.rescale_size
    assert tuple(batch.image_sizes[0]) == size == (800, 1199)
    assert batch.tensors.shape[-2:] == (800, 1216)  # padded to a multiple of 32
    resized = (F.interpolate(image[None] * 255, size=size, mode="bilinear", align_corners=False)[0]).round()
    mean, std = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1), torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    diff = (batch.tensors[0, :, :800, :1199] - (resized - mean) / std).abs()
    assert diff.max() <= 1 / 57.12 + 1e-4  # at most one 8-bit level, where float error flips a rounding tie
    assert (diff > 1e-4).float().mean() < 1e-4
