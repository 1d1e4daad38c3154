"""Detection: the pyramid + FPN backbone, COCO reading / validation, COCO AP, a training step, checkpoints, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcit.detect.coco import CocoDetection, CocoFormatError, clean_coco, collate, read_json
from xcit.detect.evaluation import coco_eval, evaluate_results, to_coco_results
from xcit.detect.model import XCiTFPN, build_detector, detector_state, load_detector, set_test_size
from xcit.detect import DetectConfig, train
from xcit.models import create_pyramid
from xcit.models.weights import CheckpointError
from xcit.train.optim import StepSchedule

TINY = dict(embed_dim=32, depth=2, num_heads=2)
SMALL_HEADS = dict(fpn_channels=32, box_head_dim=64, mask_head_channels=16, rpn_batch_size=64, roi_batch_size=64,
                   rpn_pre_nms_train=200, rpn_post_nms_train=100, rpn_pre_nms_test=200, rpn_post_nms_test=100,
                   anchor_sizes=[8, 16, 32, 64, 128], min_size=[96], max_size=256)


def tiny_detector(patch: int = 8, kind: str = "mask_rcnn", num_classes: int = 2, **kw):
    return build_detector(num_classes, arch=dict(patch_size=patch, **TINY), kind=kind, **{**SMALL_HEADS, **kw})


def write_coco(root: Path, *, sizes=((96, 128), (80, 112)), broken: dict | None = None) -> Path:
    """Images with bright ellipses and rectangles, their polygons and boxes (two categories, ids 7 and 9)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes, start=1):
        img = (rng.random((h, w, 3)) * 40).astype(np.uint8)
        for k in range(3):
            x0, y0 = 8 + 30 * k, 10 + 15 * k
            bw, bh = 20, 18
            cat = 7 if k % 2 == 0 else 9
            img[y0:y0 + bh, x0:x0 + bw] = (200, 220, 90) if cat == 7 else (60, 90, 230)
            poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x0, y0, bw, bh],
                         "segmentation": [poly], "area": bw * bh, "iscrowd": 0})
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "height": h, "width": w})
    data = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "lime"}, {"id": 9, "name": "blue"}]}
    for key, value in (broken or {}).items():
        data[key] = value(data[key])
    path = root / "annotations" / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("patch", [16, 8])
def test_pyramid_fpn_levels_and_strides_at_rectangular_sizes(patch):
    torch.manual_seed(0)
    body = create_pyramid(None, patch_size=patch, **TINY)
    fpn = XCiTFPN(body, out_channels=24).eval()
    for h, w in [(96, 160), (64, 224), (128, 96)]:
        with torch.no_grad():
            feats = body(torch.randn(1, 3, h, w))
            levels = fpn(torch.randn(1, 3, h, w))
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [(h // s, w // s) for s in (4, 8, 16, 32)]
        assert list(levels) == ["0", "1", "2", "3", "pool"]
        assert [tuple(f.shape[-2:]) for f in levels.values()] == [(h // s, w // s) for s in (4, 8, 16, 32)] + [(-(-h // 64), -(-w // 64))]
        assert all(f.shape[1] == 24 for f in levels.values())


def test_detector_runs_at_any_size_in_one_pass():
    torch.manual_seed(0)
    model = tiny_detector(16).eval()
    set_test_size(model, 0)  # native resolution: nothing is resized
    with torch.no_grad():
        for h, w in [(75, 130), (257, 66)]:
            out = model([torch.rand(3, h, w)])[0]
            assert set(out) == {"boxes", "labels", "scores", "masks"}
            assert out["masks"].shape[-2:] == (h, w)
            if len(out["boxes"]):
                assert out["boxes"][:, 2].max() <= w and out["boxes"][:, 3].max() <= h


def test_backbone_from_classification_checkpoint_and_drop_path(tmp_path):
    from xcit.models import create_model

    clf = create_model("xcit_nano_12_p16", num_classes=10)
    torch.save({"model": clf.state_dict()}, tmp_path / "clf.pth")
    det = build_detector(3, pretrained=tmp_path / "clf.pth", **SMALL_HEADS)
    body = det.backbone.body
    assert torch.equal(body.blocks[5].attn.qkv.weight, clf.blocks[5].attn.qkv.weight)
    assert det.detector_config["backbone"]["arch"]["embed_dim"] == 128
    named = build_detector(3, "xcit_small_12_p16", **SMALL_HEADS)
    assert named.detector_config["backbone"]["drop_path_rate"] == pytest.approx(0.05)  # the paper's per-model rate
    with pytest.raises(CheckpointError):
        build_detector(3, "xcit_tiny_12_p16", tmp_path / "clf.pth", **SMALL_HEADS)


# ----------------------------------------------------------------------------- training


def test_one_mask_rcnn_step_lowers_the_loss_on_a_tiny_coco_file(tmp_path):
    path = write_coco(tmp_path)
    data = CocoDetection(path, tmp_path / "images", masks=True)
    assert data.class_names == ["lime", "blue"] and data.cat_to_label == {7: 1, 9: 2}
    images, targets = collate([data[0], data[1]])
    assert targets[0]["masks"].shape == (3, 96, 128) and targets[0]["masks"][0].sum() == 20 * 18
    torch.manual_seed(0)
    model = tiny_detector(8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same anchor and RoI samples for both evaluations
        return sum(model(images, targets).values())

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert torch.isfinite(before) and after < before - 0.01, (before.item(), after.item())


def test_training_run_writes_checkpoints_metrics_and_resumes(tmp_path):
    path = write_coco(tmp_path)
    cfg = DetectConfig(train_json=str(path), val_json=str(path), output=str(tmp_path / "run"), patch_size=16, **TINY,
                       **{k: v for k, v in SMALL_HEADS.items()}, iters=2, batch_size=2, warmup_iters=1, workers=0,
                       log_every=1, ckpt_every=1, kind="faster_rcnn", amp="none")
    result = train(cfg)
    run = tmp_path / "run"
    assert {"last.pt", "best.pt", "model.pth", "metrics.jsonl", "result.json", "train.log", "config.yaml"} <= {
        p.name for p in run.iterdir()}
    metrics = result.metrics
    assert result.steps == 2 and 0.0 <= metrics["box_ap50"] <= 1.0 and "mask_ap" not in metrics
    assert result.primary == "box_ap" and json.loads((run / "result.json").read_text())["status"] == "completed"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} >= {"step", "eval"}
    for name in ("last.pt", "best.pt", "model.pth"):  # every file of the run loads as a detector
        _, meta = load_detector(run / name)
        assert meta["classes"] == ["lime", "blue"] and meta["category_ids"] == [7, 9]


def test_step_schedule_warms_up_and_decays():
    s = StepSchedule(1e-4, 100, [0.75, 0.9], 0.1, warmup=10, warmup_ratio=0.001)
    assert s.lr(0) == pytest.approx(1e-7) and s.lr(10) == pytest.approx(1e-4)
    assert s.lr(74) == pytest.approx(1e-4) and s.lr(75) == pytest.approx(1e-5) and s.lr(95) == pytest.approx(1e-6)


# ----------------------------------------------------------------------------- evaluation


def test_coco_evaluation_of_ground_truth_against_itself_is_perfect(tmp_path):
    data = CocoDetection(write_coco(tmp_path), tmp_path / "images", masks=True)
    results = []
    for i in range(len(data)):
        _, target = data.load(i)
        output = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["boxes"])),
                  "masks": target["masks"][:, None].float()}
        results += to_coco_results(output, data.images[i]["id"], data.label_to_cat)
    metrics = evaluate_results(data, results, masks=True)
    for kind in ("bbox", "segm"):
        assert metrics[kind]["AP"] == pytest.approx(1.0) and metrics[kind]["AP50"] == pytest.approx(1.0)
        assert metrics[kind]["AP75"] == pytest.approx(1.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + 10, *r["bbox"][1:]]} for r in results]  # IoU (20-10)/(20+10) = 1/3
    assert coco_eval(data.coco, shifted, "bbox")["AP50"] == pytest.approx(0.0)
    assert coco_eval(data.coco, [], "bbox")["AP"] == 0.0


# ----------------------------------------------------------------------------- validation


def test_broken_json_and_structural_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [,]}')
    with pytest.raises(CocoFormatError, match=r"broken JSON at line 1 column"):
        read_json(bad)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(CocoFormatError, match="expected a list under 'categories'"):
        read_json(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    dup = {"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}] * 2, "categories": [{"id": 1}]}
    with pytest.raises(CocoFormatError, match="duplicate image id 1"):
        clean_coco(dup)
    path = write_coco(tmp_path / "d", broken={"images": lambda ims: ims + [{"id": 3, "file_name": "gone.png", "width": 9, "height": 9}]})
    with pytest.raises(CocoFormatError, match=r"1 image files missing .*gone.png"):
        CocoDetection(path, tmp_path / "d" / "images")


def test_invalid_annotations_are_skipped_with_counts_or_fail_in_strict_mode(tmp_path):
    def corrupt(anns):
        anns[0]["bbox"] = [-10, -5, 20, 20]  # partly outside: clipped to [0, 0, 10, 15]
        anns[1]["bbox"] = [500, 500, 10, 10]  # entirely outside: skipped
        anns[2]["category_id"] = 42  # unknown category: skipped
        anns[3]["bbox"] = [1, 2, 0, 5]  # no area: skipped
        anns[4]["image_id"] = 99  # unknown image: skipped
        del anns[5]["segmentation"]  # Mask R-CNN: the box becomes the mask
        return anns + [{"id": 50, "image_id": 1, "category_id": 7, "bbox": "1,2,3,4"}]

    path = write_coco(tmp_path, sizes=((96, 128), (80, 112), (96, 96)), broken={"annotations": corrupt})
    data = CocoDetection(path, tmp_path / "images", masks=True)
    r = data.report
    assert dict(r.skipped) == {"box outside its image": 1, "unknown category_id": 1, "box without area": 1,
                               "unknown image_id": 1, "malformed bbox": 1}
    assert dict(r.repaired) == {"boxes clipped to their image": 1, "boxes used as masks (no segmentation)": 1}
    assert r.kept == 10 - 5 and r.empty_images == 0 and "5 kept" in r.summary()
    clipped = next(a for a in data.coco["annotations"] if a["id"] == 1)
    assert clipped["bbox"] == [0.0, 0.0, 10.0, 15.0]
    _, target = data.load(1)
    assert target["masks"].shape[0] == len(target["boxes"])
    with pytest.raises(CocoFormatError, match="5 invalid annotations"):
        CocoDetection(path, tmp_path / "images", strict=True)
    # an image with no annotations is kept as a negative example and trains
    empty = write_coco(tmp_path / "e", broken={"annotations": lambda anns: [a for a in anns if a["image_id"] == 1]})
    data = CocoDetection(empty, tmp_path / "e" / "images", masks=True, train=True)
    assert data.report.empty_images == 1 and len(data) == 2
    images, targets = collate([data[0], data[1]])
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["masks"].shape == (0, 80, 112)
    losses = tiny_detector(8).train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_non_finite_boxes_are_invalid_not_clipped(tmp_path):
    """A NaN or infinite coordinate is an invalid annotation (counted; an error naming it with --strict), never kept."""
    def corrupt(anns):
        anns[0]["bbox"] = [float("nan"), 5, 20, 20]  # max(nan, 0) is nan: it used to be kept as "clipped"
        anns[1]["bbox"] = [4, 5, float("inf"), 20]
        anns[2]["bbox"] = [float("-inf"), 5, float("inf"), 20]
        return anns

    path = write_coco(tmp_path, broken={"annotations": corrupt})
    assert "NaN" in path.read_text()  # Python's json writes (and reads) the non-standard NaN / Infinity literals
    data = CocoDetection(path, tmp_path / "images", masks=True)
    assert dict(data.report.skipped) == {"non-finite bbox": 3} and not data.report.repaired
    assert data.report.kept == 3 and {a["id"] for a in data.coco["annotations"]} == {4, 5, 6}
    assert all(math.isfinite(v) for a in data.coco["annotations"] for v in a["bbox"])
    with pytest.raises(CocoFormatError, match=r"3 invalid annotations .*non-finite bbox, e\.g\. annotation 1: bbox \[nan"):
        CocoDetection(path, tmp_path / "images", strict=True)


@pytest.mark.parametrize("segmentation, problem", [
    ([[1, 2, 3, 4, 5, 6, 7]], "odd number of coordinates"),
    ([[1, 2, 30, 2]], "2 points (expected at least 3)"),
    ([[1, "2", 30, 2, 30, 20]], "not a list of numbers"),
    ([[1, 2, 30, float("nan"), 30, 20]], "non-finite coordinate"),
    ([7], "not a list of numbers"),
    ("1 2 3", "expected polygons (a list) or an RLE"),
    ({"size": [96, 128]}, "RLE without counts"),
    ({"counts": [0, 5], "size": [10, 10]}, "RLE of size [10, 10] in a 96x128"),
])
def test_malformed_segmentations_are_one_line_errors_naming_the_annotation(tmp_path, segmentation, problem):
    def corrupt(anns):
        anns[1]["segmentation"] = segmentation
        return anns

    path = write_coco(tmp_path, broken={"annotations": corrupt})
    data = CocoDetection(path, tmp_path / "images", masks=True)  # not strict: dropped and counted
    assert dict(data.report.skipped) == {"malformed segmentation": 1} and data.report.kept == 5
    assert 2 not in {a["id"] for a in data.coco["annotations"]}
    assert data.report.examples["malformed segmentation"].startswith("annotation 2: ") and problem in data.report.summary()
    _, target = data.load(0)  # the remaining masks decode
    assert target["masks"].shape[0] == len(target["boxes"]) == 2
    with pytest.raises(CocoFormatError) as err:
        CocoDetection(path, tmp_path / "images", masks=True, strict=True)
    message = str(err.value)
    assert "\n" not in message and "annotation 2: " in message and problem in message


def test_flips_and_turns_move_boxes_with_the_masks(tmp_path):
    data = CocoDetection(write_coco(tmp_path), tmp_path / "images", masks=True, train=True, hflip=1.0, vflip=1.0, rot90=True)
    for seed in range(4):
        data.rng.seed(seed)
        _, target = data[0]
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


# ----------------------------------------------------------------------------- checkpoints and CLI


def test_checkpoint_round_trip_and_wrong_file(tmp_path):
    from xcit.train.checkpoint import save_state

    torch.manual_seed(0)
    model = tiny_detector(16, kind="faster_rcnn").eval()
    save_state(tmp_path / "det.pt", detector_state(model, {"classes": ["a", "b"]}))
    loaded, meta = load_detector(tmp_path / "det.pt")
    x = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        a, b = model(x)[0], loaded(x)[0]
    assert meta["classes"] == ["a", "b"] and torch.equal(a["boxes"], b["boxes"]) and not loaded.roi_heads.has_mask()
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a detection checkpoint"):
        load_detector(tmp_path / "other.pt")


def test_cli_predict_writes_overlays_and_coco_json(tmp_path):
    from xcit.cli import main
    from xcit.train.checkpoint import save_state

    torch.manual_seed(0)
    save_state(tmp_path / "det.pt", detector_state(tiny_detector(8), {"classes": ["lime", "blue"], "category_ids": [7, 9]}))
    write_coco(tmp_path)
    out = tmp_path / "pred"
    assert main(["detect", "predict", str(tmp_path / "images"), "--checkpoint", str(tmp_path / "det.pt"), "--out", str(out),
                 "--score-thresh", "0", "--test-size", "0"]) == 0
    assert {p.name for p in out.iterdir()} == {"im1_overlay.png", "im2_overlay.png", "predictions.json"}
    with Image.open(out / "im2_overlay.png") as im:
        assert im.size == (112, 80)
    pred = json.loads((out / "predictions.json").read_text())
    assert [c["id"] for c in pred["categories"]] == [7, 9] and len(pred["images"]) == 2
    assert all(a["category_id"] in (7, 9) and "segmentation" in a for a in pred["annotations"])
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "det.pt"), "--json",
                 str(tmp_path / "annotations" / "train.json"), "--images", str(tmp_path / "images"),
                 "--output", str(tmp_path / "m.json")]) == 0
    assert {"box_ap", "box_ap50", "mask_ap", "mask_ap50"} <= set(json.loads((tmp_path / "m.json").read_text()))


def test_prepare_nuclei_writes_a_valid_coco_dataset(tmp_path):
    from xcit.cli import main

    assert main(["detect", "prepare", "nuclei", "--out", str(tmp_path)]) == 0
    train_set = CocoDetection(tmp_path / "annotations" / "train.json", tmp_path / "images", masks=True, strict=True)
    val_set = CocoDetection(tmp_path / "annotations" / "val.json", tmp_path / "images", masks=True, strict=True)
    assert len(train_set) == 3 and len(val_set) == 1 and val_set.images[0]["file_name"] == "val/nuclei_bottom-right.png"
    _, target = val_set.load(0)
    assert len(target["boxes"]) > 20 and target["masks"].shape[-2:] == (256, 256)
    assert "BSD-3-Clause" in (tmp_path / "SOURCE.txt").read_text()


def test_paste_masks_matches_torchvision_and_compacts():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from xcit.detect.model import paste_masks

    torch.manual_seed(0)
    masks = torch.rand(5, 1, 28, 28)
    boxes = torch.tensor([[3.0, 4.0, 40.0, 30.0], [-5.0, 10.0, 20.0, 70.0], [50.0, 50.0, 90.0, 64.0],
                          [0.0, 0.0, 1.0, 1.0], [60.0, 2.0, 99.0, 63.0]])
    ours = paste_masks(masks, boxes, (64, 96))
    assert torch.allclose(ours, paste_masks_in_image(masks, boxes, (64, 96)))
    compact = paste_masks(masks, boxes, (64, 96), compact=True)
    assert compact.dtype == torch.bool and torch.equal(compact, ours > 0.5)
