"""Semantic segmentation: heads, metrics, datasets and their errors, training, the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xcit.models import create_pyramid
from xcit.segment.data import SegmentationFolder, TrainTransform, infer
from xcit.segment.heads import Segmenter
from xcit.segment.metrics import ConfusionMatrix, metrics_from_confusion
from xcit.segment.model import build_segmenter, load_segmenter, save_segmenter

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def tiny_segmenter(patch: int, head: str, num_classes: int = 3, **kw) -> Segmenter:
    return build_segmenter(num_classes, arch=dict(patch_size=patch, **TINY), head=head, channels=16, fpn_channels=16, **kw)


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_head_output_shapes_at_rectangular_sizes(patch, head):
    torch.manual_seed(0)
    model = tiny_segmenter(patch, head, num_classes=5, aux=True)
    model.train()
    logits, aux = model(torch.randn(2, 3, 96, 160))
    assert logits.shape == aux.shape == (2, 5, 96, 160)
    model.eval()
    with torch.no_grad():
        for h, w in [(64, 112), (75, 41), (130, 66)]:  # sizes that are not multiples of the patch
            assert model(torch.randn(1, 3, h, w)).shape == (1, 5, h, w)


def test_too_small_input_is_a_clear_error():
    model = tiny_segmenter(8, "upernet").eval()
    assert model(torch.randn(1, 3, 25, 40)).shape == (1, 3, 25, 40)
    with pytest.raises(ValueError, match="at least 25x25 pixels for patch 8"):
        model(torch.randn(1, 3, 24, 40))


def test_head_structure_follows_the_paper_defaults():
    model = build_segmenter(150, arch=dict(patch_size=16, **TINY), head="upernet")
    head = model.decode_head
    assert [b[0].output_size for b in head.ppm.branches] == [1, 2, 3, 6]
    assert head.classifier.in_channels == 512 and model.aux_head is not None and model.aux_level == 2
    assert model.aux_head.classifier.in_channels == 256
    fpn = build_segmenter(150, arch=dict(patch_size=16, **TINY), head="fpn")
    assert fpn.aux_head is None and fpn.decode_head.neck.out_channels == TINY["embed_dim"]  # the backbone width
    # level i has max(1, i) conv blocks in the panoptic-FPN semantic branch
    assert [len(blocks) for blocks in fpn.decode_head.scale_heads] == [1, 1, 2, 3]


def test_backbone_from_classification_checkpoint(tmp_path):
    from xcit import create_model, save_checkpoint

    clf = create_model("xcit_nano_12_p16", num_classes=7, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    path = save_checkpoint(clf, tmp_path / "clf.pth")
    backbone = create_pyramid(checkpoint=path)
    assert backbone.patch_size == 8 and backbone.depth == 4
    assert torch.equal(backbone.blocks[3].attn.qkv.weight, clf.blocks[3].attn.qkv.weight)
    # a DINO training checkpoint: teacher weights under "backbone."
    dino = {"teacher": {f"backbone.{k}": v for k, v in clf.state_dict().items()}, "epoch": 3}
    torch.save(dino, tmp_path / "dino.pth")
    assert torch.equal(create_pyramid(checkpoint=tmp_path / "dino.pth").blocks[0].mlp.fc1.weight, clf.blocks[0].mlp.fc1.weight)
    with pytest.raises(ValueError, match="does not hold xcit_small_12_p16"):
        create_pyramid("xcit_small_12_p16", checkpoint=path)


# ----------------------------------------------------------------------------- metrics


def test_miou_of_a_mask_against_itself_is_one():
    mask = torch.randint(0, 4, (2, 33, 47))
    cm = ConfusionMatrix(4)
    cm.update(mask, mask)
    m = cm.compute()
    assert m["miou"] == 1.0 and m["pixel_acc"] == 1.0 and m["iou"] == [1.0] * 4


def test_miou_against_a_known_confusion_matrix():
    # rows = truth, columns = prediction
    matrix = [[50, 10, 0], [5, 30, 5], [0, 0, 0]]
    m = metrics_from_confusion(matrix)
    iou0 = 50 / (50 + 10 + 5)  # TP / (TP + FN + FP): FN 10 in its row, FP 5 in its column
    iou1 = 30 / (30 + 10 + 10)  # FN: 5 + 5 in its row, FP: 10 in its column
    iou2 = 0 / (0 + 0 + 5)  # never true, predicted 5 times
    assert m["iou"] == pytest.approx([iou0, iou1, iou2])
    assert m["miou"] == pytest.approx((iou0 + iou1 + iou2) / 3)
    assert m["pixel_acc"] == pytest.approx(80 / 100)
    assert m["mean_acc"] == pytest.approx((50 / 60 + 30 / 40) / 2)  # class 2 has no ground truth
    absent = metrics_from_confusion([[4, 0, 0], [1, 5, 0], [0, 0, 0]])  # class 2 neither true nor predicted
    assert math.isnan(absent["iou"][2]) and absent["miou"] == pytest.approx((4 / 5 + 5 / 6) / 2)


def test_confusion_matrix_accumulates_and_skips_ignored_pixels():
    pred = torch.tensor([[0, 1, 1, 0]])
    target = torch.tensor([[0, 1, 255, 1]])
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[2, 0], [2, 2]]
    with pytest.raises(ValueError, match="same shape"):
        cm.update(pred, target[:, :3])


# ----------------------------------------------------------------------------- datasets


def write_pair(root: Path, split: str, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.jpg" if image.ndim == 3 else root / "images" / split / f"{name}.png")
    Image.fromarray(mask).save(root / "annotations" / split / f"{name}.png")


def squares_dataset(root: Path, n_train: int = 4, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Bright squares (class 1) on a dark noisy background (class 0): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", 1)):
        for i in range(n):
            h, w = size
            mask = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y:y + h // 2, x:x + w // 2] = 1
            image = (rng.normal(40, 10, (h, w, 3)) + mask[..., None] * 160).clip(0, 255).astype(np.uint8)
            write_pair(root, split, f"img{i}", image, mask)
    (root / "dataset.yaml").write_text("classes: [background, square]\nignore_index: 255\n")
    return root


def test_folder_dataset_reads_pairs_and_reduces_zero_label(tmp_path):
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    write_pair(tmp_path, "s", "a", np.zeros((2, 2), np.uint8), mask)
    ds = SegmentationFolder(tmp_path / "images" / "s", tmp_path / "annotations" / "s", 3)
    image, m = ds[0]
    assert image.shape == (3, 2, 2) and image.dtype == torch.uint8 and m.tolist() == [[0, 1], [2, 255]]
    ds = SegmentationFolder(tmp_path / "images" / "s", tmp_path / "annotations" / "s", 2, reduce_zero_label=True)
    assert ds[0][1].tolist() == [[255, 0], [1, 255]]


def test_mask_values_outside_the_class_range_are_a_clear_error(tmp_path):
    write_pair(tmp_path, "s", "a", np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 7, np.uint8))
    ds = SegmentationFolder(tmp_path / "images" / "s", tmp_path / "annotations" / "s", 3)
    with pytest.raises(ValueError, match=r"a\.png holds values \[7\] outside the class range 0\.\.2"):
        ds[0]


def test_size_mismatch_between_image_and_mask_is_a_clear_error(tmp_path):
    write_pair(tmp_path, "s", "a", np.zeros((4, 6, 3), np.uint8), np.zeros((4, 5), np.uint8))
    ds = SegmentationFolder(tmp_path / "images" / "s", tmp_path / "annotations" / "s", 3)
    with pytest.raises(ValueError, match=r"is 6x4 \(WxH\) but its mask .* is 5x4"):
        ds.check()


def test_empty_and_unmatched_folders_are_clear_errors(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    with pytest.raises(ValueError, match="no images found in"):
        SegmentationFolder(tmp_path / "img", tmp_path / "ann", 2)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    with pytest.raises(ValueError, match="no masks found in"):
        SegmentationFolder(tmp_path / "img", tmp_path / "ann", 2)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ann" / "b.png")
    with pytest.raises(ValueError, match="1 of 1 images .* have no mask"):
        SegmentationFolder(tmp_path / "img", tmp_path / "ann", 2)
    with pytest.raises(FileNotFoundError, match="expected a mask folder"):
        SegmentationFolder(tmp_path / "img", tmp_path / "missing", 2)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ann" / "a.png")
    with pytest.raises(ValueError, match="mode RGB; expected a single-channel"):
        SegmentationFolder(tmp_path / "img", tmp_path / "ann", 2)[0]


def test_train_transform_crops_pads_and_keeps_labels_aligned():
    image = torch.zeros(3, 40, 30, dtype=torch.uint8)
    image[:, :, 15:] = 255
    mask = torch.zeros(40, 30, dtype=torch.long)
    mask[:, 15:] = 1
    t = TrainTransform(crop_size=(48, 48), scale=None, ratio_range=(1.0, 1.0), photometric=False, seed=0)
    for _ in range(5):
        x, m = t(image, mask)
        assert x.shape == (3, 48, 48) and m.shape == (48, 48)
        assert (m[40:] == 255).all() and (m[:, 30:] == 255).all()  # padding is ignored
        bright = x[0, :40, :30] > 0
        assert torch.equal(bright, m[:40, :30] == 1)  # flips move image and mask together


def test_sliding_window_matches_whole_image_for_a_pointwise_model():
    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    model = Pointwise().eval()
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    whole = infer(model, image, mode="whole")
    slide = infer(model, image, mode="slide", crop_size=(32, 48), stride=(20, 30))
    assert whole.shape == (4, 70, 90) and torch.allclose(whole, slide, atol=1e-5)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_a_training_step_lowers_the_loss(head):
    torch.manual_seed(0)
    model = tiny_segmenter(8, head, num_classes=2, aux=True)
    model.train()
    x = torch.randn(4, 3, 32, 48)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn():
        logits, aux = model(x)
        return F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)

    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    for _ in range(2):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn().item() < before.item()


def test_train_eval_predict_from_the_command_line(tmp_path, capsys):
    from xcit.cli import main

    data = squares_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"data: {data}\noutput: {out}\npatch-size: 8\nembed-dim: 32\ndepth: 2\nnum-heads: 2\nhead: fpn\nchannels: 16\n"
        "fpn-channels: 16\niters: 4\nbatch-size: 2\ncrop-size: [32, 32]\nscale: none\nlr: 0.001\nwarmup-iters: 1\n"
        "eval-every: 2\nlog-every: 1\nworkers: 0\ndevice: cpu\nckpt-every: 2\namp: none\n"
    )
    assert main(["segment", "train", "--config", str(cfg)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    assert {"last.pt", "best.pt", "curves.png", "result.json", "config.yaml"} <= {p.name for p in out.iterdir()}
    from xcit.data import IMAGENET_MEAN, IMAGENET_STD
    from xcit.segment.model import load_segmenter, normalization

    _, meta = load_segmenter(out / "model.pth")  # the checkpoint says how its images are normalised
    assert meta["data"] == {"in_chans": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert normalization(meta) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)) == normalization({})
    assert normalization({"data": {"mean": [0.5] * 3, "std": [0.25] * 3}}) == ((0.5,) * 3, (0.25,) * 3)
    # resume continues from the saved step
    assert main(["segment", "train", "--config", str(cfg), "--iters", "5", "--resume", "auto"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["steps"] == 5

    assert main(["segment", "eval", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--mode", "slide",
                 "--crop-size", "32", "--stride", "16", "--output", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "square" in printed and "slide" in printed
    assert 0.0 <= json.loads((tmp_path / "m.json").read_text())["miou"] <= 1.0

    assert main(["segment", "predict", str(data / "images" / "validation"), "--checkpoint", str(out / "best.pt"),
                 "--output", str(tmp_path / "pred")]) == 0
    mask = Image.open(tmp_path / "pred" / "img0_mask.png")
    assert mask.mode == "P" and mask.size == (64, 48) and set(np.unique(np.array(mask))) <= {0, 1}
    assert Image.open(tmp_path / "pred" / "img0_overlay.png").mode == "RGB"


def test_cli_errors_are_clear(tmp_path, capsys):
    from xcit.cli import main

    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    rc = main(["segment", "train", "--data", str(tmp_path), "--num-classes", "2", "--patch-size", "8",
               "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--out", str(tmp_path / "run")])
    assert rc == 2 and "no images found in" in capsys.readouterr().err
    assert main(["segment", "eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tmp_path)]) == 2
    assert "not a file" in capsys.readouterr().err


def test_segmenter_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_segmenter(16, "upernet").eval()
    save_segmenter(model, tmp_path / "m.pt", {"classes": ["a", "b", "c"]})
    loaded, meta = load_segmenter(tmp_path / "m.pt")
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["classes"] == ["a", "b", "c"]


def test_quadrant_split_is_shared_and_covers_the_image():
    from xcit.data.split import HELD_OUT_QUADRANT, QUADRANTS, quadrant_slices

    h, w = 7, 10
    cover = np.zeros((h, w), int)
    for q in QUADRANTS:
        cover[quadrant_slices(h, w, q)] += 1
    assert (cover == 1).all()
    assert quadrant_slices(512, 512, HELD_OUT_QUADRANT) == (slice(256, 512), slice(256, 512))


# ----------------------------------------------------------------------------- real-data preparation


def _fake_wheels(tmp_path: Path) -> tuple[Path, Path]:
    """Zip files laid out like the stardist and deepforest wheels, with small synthetic data."""
    import io
    import zipfile

    rng = np.random.default_rng(0)
    labels = np.zeros((64, 64), np.uint16)
    labels[5:15, 5:15], labels[40:50, 40:60] = 1, 2  # the second nucleus lies in the held-out quadrant
    image = (rng.integers(0, 30, (64, 64)) + (labels > 0) * 180).astype(np.uint16)
    star = tmp_path / "stardist-0.0-py3-none-any.whl"
    with zipfile.ZipFile(star, "w") as zf:
        for name, arr in (("img2d.tif", image), ("mask2d.tif", labels)):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="TIFF")
            zf.writestr(f"stardist/data/images/{name}", buf.getvalue())
    forest = tmp_path / "deepforest-0.0-py3-none-any.whl"
    with zipfile.ZipFile(forest, "w") as zf:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(buf, format="PNG")
        zf.writestr("deepforest/data/OSBS_029.png", buf.getvalue())
        box = "<object><name>Tree</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>12</xmax><ymax>10</ymax></bndbox></object>"
        zf.writestr("deepforest/data/OSBS_029.xml", f"<annotation>{box}</annotation>")
    return star, forest


def test_prepare_writes_the_quadrant_split_from_a_wheel(tmp_path, capsys):
    from xcit.cli import main

    star, forest = _fake_wheels(tmp_path)
    assert main(["segment", "prepare", "nuclei", "--out", str(tmp_path / "nuclei"), "--source", str(star)]) == 0
    root = tmp_path / "nuclei"
    train = SegmentationFolder(root / "images" / "training", root / "annotations" / "training", 2)
    val = SegmentationFolder(root / "images" / "validation", root / "annotations" / "validation", 2)
    assert len(train) == 3 and len(val) == 1 and val.samples[0][0].name == "nuclei_bottom-right.png"
    image, mask = val[0]
    assert image.shape == (3, 32, 32) and mask.sum() == 10 * 20  # nucleus 2, shifted by the quadrant offset
    assert int(mask[8:18, 8:28].sum()) == 200
    assert "nucleus" in (root / "dataset.yaml").read_text() and "BSD-3-Clause" in (root / "SOURCE.txt").read_text()

    assert main(["segment", "prepare", "trees", "--out", str(tmp_path / "trees"), "--source", str(forest)]) == 0
    _, tree_mask = SegmentationFolder(tmp_path / "trees" / "images" / "training",
                                      tmp_path / "trees" / "annotations" / "training", 2)[1]  # sorted: bottom-left, top-left
    assert int(tree_mask.sum()) == 10 * 7 and int(tree_mask[3:10, 2:12].sum()) == 70

    assert main(["segment", "prepare", "nuclei", "--out", str(tmp_path / "x"), "--source", str(forest)]) == 2
    assert "stardist/data/images/img2d.tif" in capsys.readouterr().err


def test_the_real_stardist_image_when_installed():
    from xcit.data.packaged import package_file

    package_file("stardist", "data/images/img2d.tif")  # FileNotFoundError naming the wheel (setup.sh installs it)
    from xcit.data.nuclei import load_nuclei

    image, labels = load_nuclei()
    assert image.shape == labels.shape == (512, 512) and len(np.unique(labels)) - 1 == 125


@pytest.mark.parametrize("command, folder", [(["segment", "train"], "segment"), (["detect", "train"], "detect"),
                                             (["dino"], "dino")])
def test_bundled_task_configs_load_through_their_commands(command, folder):
    from xcit.cli import build_parser
    from xcit.cli.config import _chosen_subparser, load_config

    parser = build_parser()
    sub = _chosen_subparser(parser, command)
    files = sorted((Path(__file__).parents[1] / "configs" / folder).glob("*.yaml"))
    assert files
    for path in files:
        values = load_config(path, sub)  # SystemExit on a key or value the command does not take
        assert values, path
    if folder == "segment":  # the ADE20k files once said `amp: off`, which YAML reads as False
        from xcit.train.run import resolve_amp

        assert all(resolve_amp(load_config(p, sub).get("amp", "none"), torch.device("cpu")) is None for p in files)


def test_yaml_boolean_for_a_choice_option_is_explained(tmp_path):
    from xcit.cli import build_parser
    from xcit.cli.config import _chosen_subparser, load_config

    path = tmp_path / "bad.yaml"
    path.write_text("amp: off\n")
    with pytest.raises(SystemExit, match="YAML reads unquoted off/on/no/yes as a boolean"):
        load_config(path, _chosen_subparser(build_parser(), ["segment", "train"]))
