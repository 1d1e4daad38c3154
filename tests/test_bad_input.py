"""One suite for bad input (issue 26, "nothing lost, nothing hidden"): every subcommand that reads user files, and the
Python entry points behind them, against the same classes of bad input.

Classes: missing, empty, truncated, wrong format, huge (a decompression bomb), a file name that is not UTF-8, wrong
type, out of range, an output that exists, an unwritable output, a full disk. Each case asserts the documented exit
status (2: a usage error, one line ``xcit CMD: error: ...`` naming the file or option and what was expected; 1: a
prediction command that skipped unreadable inputs, one ``skipped PATH: REASON`` line each, after writing everything
else), that no traceback is printed, and that no file that existed before the command was changed.

The full disk is a real one: a 256 KiB tmpfs, filled, when this process may mount one (root); elsewhere every write
through the package's output helpers (:class:`xcit.data.outputs.atomic_write`,
:func:`xcit.models.weights.write_atomically`) is made to fail with ``ENOSPC``, and the ``prepare`` commands, whose
staged dataset folders are written file by file, are skipped.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from xcit.cli import main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results.json"
NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name: not valid UTF-8


# ------------------------------------------------------------------------------------------------ the files


def _bomb_png(path: Path, width: int = 100_000, height: int = 128_000) -> Path:
    """A 90-byte PNG whose header claims width x height grey pixels (12.8 G by default): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    return path


def _photo(size: tuple[int, int] = (48, 64)) -> np.ndarray:
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs shared by every case (never written by them): checkpoints, images good and bad, data files."""
    from xcit.detect.model import build_detector, detector_state
    from xcit.models.weights import save_checkpoint
    from xcit.segment.model import build_segmenter, save_segmenter
    from xcit.train.checkpoint import save_state

    w = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    save_checkpoint(tiny_model(), w / "cls.pth", extra={"classes": [f"c{i}" for i in range(10)],
                                                         "data": {"img_size": 16, "dataset": "digits"}})
    grey = tiny_model(in_chans=1, patch_size=2)
    save_checkpoint(grey, w / "grey.pth", extra={"data": {"img_size": 8, "in_chans": 1, "dataset": "digits"}})
    save_segmenter(build_segmenter(3, arch=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), head="fpn",
                                   channels=16, fpn_channels=16), w / "seg.pt")
    detector = build_detector(2, arch=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), kind="faster_rcnn",
                              fpn_channels=32, box_head_dim=64, rpn_pre_nms_test=50, rpn_post_nms_test=20,
                              anchor_sizes=[8, 16, 32, 64, 128], min_size=[64], max_size=128)
    save_state(w / "det.pt", detector_state(detector, {"classes": ["a", "b"]}))

    photo = _photo()
    Image.fromarray(photo).save(w / "good.png")
    good = (w / "good.png").read_bytes()
    (w / "empty.png").write_bytes(b"")
    (w / "truncated.png").write_bytes(good[:len(good) // 2])
    (w / "notimage.png").write_text("not an image, a note\n")
    _bomb_png(w / "bomb.png")
    Image.fromarray(photo[:1, :1]).save(w / "one.png")
    Image.fromarray((photo[..., 0].astype(np.uint16) * 257)).save(w / "grey16.png")  # 16-bit greyscale PNG
    (w / "empty.pth").write_bytes(b"")
    (w / "truncated.pth").write_bytes((w / "cls.pth").read_bytes()[:5000])
    (w / "notes.txt").write_text("some notes\n")
    (w / "empty.json").write_text("")
    (w / "broken.json").write_text('{"images": [1,')
    (w / "empty.yaml").write_text("")
    (w / "dup.yaml").write_text("top_k: 3\nbatch_size: 2\ntop_k: 5\n")
    (w / "latin.yaml").write_bytes(b"top_k: 3\n# caf\xe9\n")
    (w / "results.json").write_bytes(RESULTS.read_bytes())

    folder = w / "names"  # a non-UTF-8 name and two inputs with one stem
    folder.mkdir()
    for name in (NON_UTF8, "a.png", "a.jpg"):
        Image.fromarray(photo).save(folder / name, format="PNG" if name.endswith(".png") else "JPEG")

    coco = w / "coco"  # a COCO file per problem, beside the image they name
    coco.mkdir()
    Image.fromarray(photo).save(coco / "a.png")
    base = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20]}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    variants = {
        "good": {},
        "string_id": {"images": [{**base["images"][0], "id": "img1"}],
                      "annotations": [{**base["annotations"][0], "image_id": "img1"}]},
        "width_word": {"images": [{**base["images"][0], "width": "abc"}]},
        "rle_short": {"annotations": [{**base["annotations"][0],
                                       "segmentation": {"size": [48, 64], "counts": [10, 20]}}]},
        "rle_junk": {"annotations": [{**base["annotations"][0], "segmentation": {"size": [48, 64], "counts": "abc"}}]},
    }
    for name, change in variants.items():
        (coco / f"{name}.json").write_text(json.dumps({**base, **change}))

    seg = w / "segdata"  # an ADE20k-style folder for segment eval
    for split in ("validation",):
        (seg / "images" / split).mkdir(parents=True)
        (seg / "annotations" / split).mkdir(parents=True)
        Image.fromarray(_photo((64, 64))).save(seg / "images" / split / "x.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(seg / "annotations" / split / "x.png")

    bad_yaml = w / "bad_yaml"  # segmentation datasets whose dataset.yaml is broken or of the wrong types
    for name, text in (("broken", "classes: [a,\n"), ("typed", "classes: 5\n"), ("dup", "name: a\nname: b\n")):
        (bad_yaml / name / "images" / "training").mkdir(parents=True)
        (bad_yaml / name / "dataset.yaml").write_text(text)

    loop = w / "loop"  # class folders with a symbolic link back up the tree
    for cls in ("a", "b"):
        (loop / "train" / cls).mkdir(parents=True)
        Image.fromarray(photo).save(loop / "train" / cls / f"{cls}.png")
    shutil.copytree(loop / "train", loop / "val")
    (loop / "train" / "a" / "up").symlink_to("..")

    wheel = w / "deepforest-9.whl"  # an archive whose image is corrupt
    with zipfile.ZipFile(wheel, "w") as z:
        for stem in ("OSBS_029", "2019_YELL_2_541000_4977000_image_crop"):
            z.writestr(f"deepforest/data/{stem}.png", b"\x89PNG but not really")
            z.writestr(f"deepforest/data/{stem}.xml", "<annotation></annotation>")
    nan = tiny_model()
    with torch.no_grad():
        nan.blocks[1].mlp.fc1.weight[3, 4] = float("nan")
    save_checkpoint(nan, w / "nan.pth", extra={"data": {"img_size": 16}})
    grey_nan = tiny_model(in_chans=1, patch_size=2)
    with torch.no_grad():
        grey_nan.head.bias[0] = float("-inf")
    save_checkpoint(grey_nan, w / "nan_grey.pth", extra={"data": {"img_size": 8, "in_chans": 1, "dataset": "digits"}})
    (w / "file").write_text("a file where a folder is expected\n")
    return w


def _snapshot(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folders`` (symbolic links not followed)."""
    out = {}
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    out[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own exits
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    """``xcit ARGV`` (``W/`` a file of the shared world, ``T/`` of the case's own folder) and what it must do."""

    argv: str
    code: int  # 2: one error line; 1: skipped inputs, one line each
    words: tuple[str, ...]  # in the error line, or in the one 'skipped' line
    existing: tuple[str, ...] = ()  # files (T/...) made before the command: they must stay as they were
    extra: list[str] = field(default_factory=list)


CLS = "--checkpoint W/cls.pth"
SEG = "--checkpoint W/seg.pt --device cpu"
DET = "--checkpoint W/det.pt --device cpu"
# each prediction command with an input placeholder IN and its output in T/
PREDICTORS = {
    "predict": f"predict IN {CLS} --no-progress -o T/p.csv",
    "attention": f"attention IN {CLS} -o T/att",
    "embed": f"embed IN {CLS} -o T/e.npz",
    "segment predict": f"segment predict IN {SEG} -o T/sp",
    "detect predict": f"detect predict IN {DET} -o T/dp",
}
UNREADABLE = {  # class of bad input -> (file, words of the reason)
    "missing": ("W/nope.png", ("no such file",)),
    "empty": ("W/empty.png", ("cannot read image",)),
    "truncated": ("W/truncated.png", ("cannot read image",)),
    "wrong format": ("W/notimage.png", ("not an image",)),
    "huge": ("W/bomb.png", ("12,800,000,000 pixels", "decompression bomb")),
}

CASES: dict[str, Case] = {}
for command, template in PREDICTORS.items():
    for kind, (path, words) in UNREADABLE.items():
        CASES[f"{command}: {kind} image"] = Case(template.replace("IN", f"{path} W/good.png"), 1,
                                                 (path.replace("W/", ""), *words))

CASES.update({
    # missing / empty / truncated / wrong-format files that are not images
    "predict: missing list file": Case(f"predict --list W/nope.txt {CLS}", 2, ("nope.txt", "does not exist")),
    "predict: missing checkpoint": Case("predict W/good.png --checkpoint W/nope.pth", 2, ("nope.pth",)),
    "predict: empty checkpoint": Case("predict W/good.png --checkpoint W/empty.pth", 2, ("empty.pth", "expected")),
    "attention: truncated checkpoint": Case("attention W/good.png --checkpoint W/truncated.pth -o T/att", 2,
                                            ("truncated.pth", "expected")),
    "embed: a notes file as checkpoint": Case("embed W/good.png --checkpoint W/notes.txt -o T/e.npz", 2,
                                              ("notes.txt", "expected")),
    "eval: missing checkpoint": Case("eval W/nope.pth --data digits --device cpu", 2, ("nope.pth",)),
    "eval: an image as checkpoint": Case("eval W/good.png --data digits --device cpu", 2, ("good.png", "expected")),
    "export: empty checkpoint": Case("export --checkpoint W/empty.pth -o T/exp", 2, ("empty.pth", "expected")),
    "knn: truncated checkpoint": Case("knn W/truncated.pth --data digits --device cpu", 2, ("truncated.pth",)),
    "linear: missing checkpoint": Case("linear W/nope.pth --data digits --device cpu", 2, ("nope.pth",)),
    "bench: missing results": Case("bench --render W/nope.json --out T/R.md", 2, ("nope.json", "expected")),
    "bench: empty results": Case("bench --render W/empty.json --out T/R.md", 2, ("empty.json", "JSON")),
    "bench: an image as results": Case("bench --render W/good.png --out T/R.md", 2, ("good.png", "expected")),
    "detect eval: missing COCO file": Case(f"detect eval {DET} --json W/nope.json", 2, ("nope.json", "COCO")),
    "detect eval: empty COCO file": Case(f"detect eval {DET} --json W/empty.json", 2, ("empty.json", "JSON")),
    "detect eval: truncated COCO file": Case(f"detect eval {DET} --json W/broken.json", 2, ("broken.json", "JSON")),
    "detect eval: an image as COCO file": Case(f"detect eval {DET} --json W/good.png", 2, ("good.png", "UTF-8")),
    "detect predict: a classifier as detector": Case("detect predict W/good.png --checkpoint W/cls.pth -o T/dp", 2,
                                                     ("cls.pth", "detection checkpoint")),
    "segment eval: missing data": Case(f"segment eval {SEG} --data W/nope", 2, ("nope",)),
    "segment predict: a detector as segmenter": Case("segment predict W/good.png --checkpoint W/det.pt -o T/sp", 2,
                                                     ("det.pt", "segmentation checkpoint")),
    "detect prepare: missing source": Case("detect prepare trees -o T/ds --source W/nope.whl", 2, ("nope.whl",)),
    "detect prepare: corrupt image in the archive": Case("detect prepare trees -o T/ds --source W/deepforest-9.whl", 2,
                                                         ("deepforest-9.whl/deepforest/data/", ".png", "not an image")),
    "segment prepare: corrupt image in the archive": Case("segment prepare trees -o T/ds --source W/deepforest-9.whl",
                                                          2, ("deepforest-9.whl/deepforest/data/OSBS_029.png",)),
    "info: missing config": Case("info xcit_nano_12_p16 --config W/nope.yaml", 2, ("nope.yaml", "does not exist")),
    "models: an image as config": Case("models --config W/good.png", 2, ("good.png", "UTF-8")),
    "predict: a config that is not UTF-8": Case(f"predict W/good.png {CLS} --config W/latin.yaml", 2,
                                                ("latin.yaml", "not UTF-8", "line 2")),
    "predict: a config with a key twice": Case(f"predict W/good.png {CLS} --config W/dup.yaml", 2,
                                               ("dup.yaml", "'top_k'", "lines 1 and 3")),
    "segment train: broken dataset.yaml": Case("segment train --data W/bad_yaml/broken --model xcit_nano_12_p16", 2,
                                               ("dataset.yaml", "not valid YAML", "line")),
    "segment train: dataset.yaml of the wrong type": Case(
        "segment train --data W/bad_yaml/typed --model xcit_nano_12_p16", 2, ("dataset.yaml", "classes", "expected")),
    "segment train: dataset.yaml with a key twice": Case(
        "segment train --data W/bad_yaml/dup --model xcit_nano_12_p16", 2, ("dataset.yaml", "'name'", "twice")),
    # training commands: bad data paths and files, through the command line only
    "train: missing data": Case("train --data W/nope --threads 1", 2, ("nope",)),
    "train: a symbolic link loop in the class folders": Case("train --data W/loop --threads 1 --epochs 1", 2,
                                                             ("up", "symbolic link", "once")),
    "train: a config that is not UTF-8": Case("train --config W/latin.yaml --print-config", 2, ("latin.yaml", "UTF-8")),
    "dino: a config with a key twice": Case("dino --config W/dup.yaml --print-config", 2, ("dup.yaml", "twice")),
    "detect train: empty COCO file": Case("detect train --train-json W/empty.json --model xcit_nano_12_p16", 2,
                                          ("empty.json", "JSON")),
    # wrong type
    "eval: --img-size a word": Case("eval W/grey.pth --img-size big", 2, ("--img-size", "'big'")),
    "detect eval: string image ids": Case(f"detect eval {DET} --json W/coco/string_id.json", 2,
                                          ("string_id.json", "'img1'", "integer")),
    "detect eval: a width that is a word": Case(f"detect eval {DET} --json W/coco/width_word.json", 2,
                                                ("width_word.json", "image 1", "a.png", "width", "'abc'")),
    "detect eval: RLE counts that do not cover the image": Case(
        f"detect eval {DET} --json W/coco/rle_short.json --strict", 2,
        ("rle_short.json", "annotation 1", "30 pixels", "3072")),
    "detect eval: RLE counts that are not RLE": Case(f"detect eval {DET} --json W/coco/rle_junk.json --strict", 2,
                                                     ("rle_junk.json", "annotation 1", "'abc'")),
    # out of range
    "eval: --img-size -5": Case("eval W/grey.pth --img-size -5 --device cpu", 2,
                                ("--img-size", "integer >= 1", "'-5'")),
    "eval: --img-size 0": Case("eval W/grey.pth --img-size 0 --device cpu", 2, ("--img-size", "integer >= 1", "'0'")),
    "eval: --crop-pct 0": Case("eval W/grey.pth --crop-pct 0", 2, ("--crop-pct", "(0, 1]")),
    "predict: --top-k 0": Case(f"predict W/good.png {CLS} --top-k 0", 2, ("--top-k", ">= 1")),
    "predict: --batch-size 0 in a config": Case(f"predict W/good.png {CLS} --config T/c.yaml", 2,
                                                ("batch_size", ">= 1", "c.yaml"), extra=["batch_size: 0\n"]),
    "attention: --alpha 2": Case(f"attention W/good.png {CLS} --alpha 2 -o T/att", 2, ("--alpha", "[0, 1]")),
    "attention: --layer 7": Case(f"attention W/good.png {CLS} --layer 7 -o T/att", 2, ("--layer", "7")),
    "embed: --tokens-per-chunk 0": Case(f"embed W/good.png {CLS} --tokens-per-chunk 0 -o T/e.npz", 2,
                                        ("--tokens-per-chunk", ">= 1")),
    "detect predict: --score-thresh 2": Case(f"detect predict W/good.png {DET} --score-thresh 2 -o T/dp", 2,
                                             ("--score-thresh", "[0, 1]", "'2'")),
    "segment predict: --alpha 1.5": Case(f"segment predict W/good.png {SEG} --alpha 1.5 -o T/sp", 2, ("--alpha",)),
    "segment eval: --num-classes 0": Case(f"segment eval {SEG} --data W/segdata --num-classes 0", 2,
                                          ("--num-classes", ">= 1")),
    "knn: --k 0": Case("knn W/grey.pth --k 0", 2, ("--k", ">= 1")),
    "knn: --temperature 0": Case("knn W/grey.pth --temperature 0", 2, ("--temperature", "> 0")),
    "linear: --epochs 0": Case("linear W/grey.pth --epochs 0", 2, ("epochs", "> 0")),
    "bench: --batch 0": Case("bench --batch 0 --out T/R.md", 2, ("--batch", ">= 1")),
    "bench: --sizes 0": Case("bench --sizes 224 0 --out T/R.md", 2, ("--sizes", ">= 1")),
    "info: --img-size 0": Case("info xcit_nano_12_p16 --img-size 0", 2, ("--img-size", ">= 1")),
    "export: --atol -1": Case(f"export {CLS} --atol -1 -o T/exp", 2, ("--atol", ">= 0")),
    "train: --epochs 0": Case("train --data digits --epochs 0 --print-config", 2, ("epochs", "0")),
    "dino: --batch-size 0": Case("dino --data digits --batch-size 0 --print-config", 2, ("batch_size", "0")),
    "segment train: --iters 0": Case("segment train --data W/segdata --model xcit_nano_12_p16 --iters 0", 2,
                                     ("iters", "0")),
    "detect train: --batch-size 0": Case("detect train --train-json W/coco/good.json --model xcit_nano_12_p16 "
                                         "--batch-size 0", 2, ("batch_size", "0")),
    # weights that are not numbers
    "predict: NaN weights": Case("predict W/good.png --checkpoint W/nan.pth", 2,
                                 ("nan.pth", "'blocks.1.mlp.fc1.weight'", "NaN", "finite")),
    "eval: infinite weights": Case("eval W/nan_grey.pth --device cpu", 2,
                                   ("nan_grey.pth", "'head.bias'", "1 infinite")),
    "knn: infinite weights": Case("knn W/nan_grey.pth --device cpu", 2, ("nan_grey.pth", "'head.bias'")),
    "export: NaN weights": Case("export --checkpoint W/nan.pth -o T/exp", 2, ("nan.pth", "NaN")),
})

# an output that already exists: refused (and left as it was) without --overwrite
EXISTING = {
    "predict": (f"predict W/good.png {CLS} --no-progress -o T/p.csv", "T/p.csv"),
    "embed": (f"embed W/good.png {CLS} -o T/e.npz", "T/e.npz"),
    "attention": (f"attention W/good.png {CLS} -o T/att", "T/att/good_attention.png"),
    "segment predict": (f"segment predict W/good.png {SEG} -o T/sp", "T/sp/good_overlay.png"),
    "detect predict": (f"detect predict W/good.png {DET} -o T/dp", "T/dp/predictions.json"),
    "detect eval -o": (f"detect eval {DET} --json W/coco/good.json -o T/m.json", "T/m.json"),
    "detect eval --overlays": (f"detect eval {DET} --json W/coco/good.json --overlays T/ov", "T/ov/a_overlay.png"),
    "segment eval": (f"segment eval {SEG} --data W/segdata -o T/m.json", "T/m.json"),
    "linear": ("linear W/grey.pth --protocol precomputed --output T/probe --device cpu", "T/probe/model.pth"),
    "export": (f"export {CLS} -o T/exp --formats pt2", "T/exp/cls.json"),
    "bench": ("bench --render W/results.json --out T/R.md", "T/R.md"),
    "bench --plot": ("bench --render W/results.json --out T/R.md --plot T/s.png", "T/s.png"),
    "detect prepare": ("detect prepare trees -o T/ds", "T/ds/annotations/val.json"),
    "segment prepare": ("segment prepare nuclei -o T/ds", "T/ds/dataset.yaml"),
}
for command, (argv, existing) in EXISTING.items():
    CASES[f"{command}: existing output"] = Case(argv, 2, (Path(existing).name, "--overwrite"), existing=(existing,))

# an output that cannot be written: its folder is a file
UNWRITABLE = {
    "predict": f"predict W/good.png {CLS} -o W/file/p.csv",
    "embed": f"embed W/good.png {CLS} -o W/file/e.npz",
    "attention": f"attention W/good.png {CLS} -o W/file/att",
    "segment predict": f"segment predict W/good.png {SEG} -o W/file/sp",
    "detect predict": f"detect predict W/good.png {DET} -o W/file/dp",
    "detect eval": f"detect eval {DET} --json W/coco/good.json -o W/file/m.json",
    "segment eval": f"segment eval {SEG} --data W/segdata -o W/file/m.json",
    "linear": "linear W/grey.pth --output W/file/probe --device cpu",
    "export": f"export {CLS} -o W/file/exp",
    "bench": "bench --render W/results.json --out W/file/R.md",
    "detect prepare": "detect prepare trees -o W/file/ds",
    "segment prepare": "segment prepare nuclei -o W/file/ds",
}
for command, argv in UNWRITABLE.items():
    CASES[f"{command}: unwritable output"] = Case(argv, 2, ("file", "not a folder"))


def _expand(text: str, world: Path, tmp: Path) -> list[str]:
    return [t.replace("W/", f"{world}/", 1) if t.startswith("W/") else t.replace("T/", f"{tmp}/", 1)
            if t.startswith("T/") else t for t in text.split()]


def _check(case: Case, code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code == case.code, err
    lines = err.strip().splitlines()
    if case.code == 2:
        assert len(lines) == 1 and lines[0].startswith("xcit ") and ": error: " in lines[0], err
        line = lines[0]
    else:
        skipped = [x for x in lines if " skipped " in x]
        assert len(skipped) == 1, err
        line = skipped[0]
    assert all(word in line for word in case.words), line


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    case = CASES[name]
    for text in case.extra:
        (tmp_path / "c.yaml").write_text(text)
    for rel in case.existing:
        target = Path(rel.replace("T/", f"{tmp_path}/", 1))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("an earlier output\n")
    before = _snapshot(world, tmp_path)
    code, _, err = run(_expand(case.argv, world, tmp_path), capsys)
    _check(case, code, err)
    after = _snapshot(world, tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing that existed was changed
    leftovers = [p for p in after if ".tmp" in os.path.basename(p)]
    assert not leftovers, leftovers  # nor half-written files left behind


# ------------------------------------------------------------------------------------------------ full disk


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a full file system: a real 256 KiB tmpfs, filled, where one can be mounted (root); otherwise every
    write through :class:`xcit.data.outputs.atomic_write` and :func:`xcit.models.weights.write_atomically` fails with
    ENOSPC. Yields (folder, whether it is real)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if mounted:
        (folder / "earlier.csv").write_text("an earlier output\n")
        try:
            with open(folder / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    else:
        from xcit.data import outputs
        from xcit.models import weights

        def no_space(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))

        monkeypatch.setattr(outputs.atomic_write, "begin", no_space)
        monkeypatch.setattr(weights, "write_atomically", lambda path, write: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device", os.fspath(path))))
        (folder / "earlier.csv").write_text("an earlier output\n")
    try:
        yield folder, bool(mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


FULL = {
    "predict": f"predict W/good.png {CLS} --no-progress -o F/p.csv",
    "predict --overwrite": f"predict W/good.png {CLS} --no-progress -o F/earlier.csv --overwrite",
    "embed": f"embed W/good.png {CLS} -o F/e.npz",
    "attention": f"attention W/good.png {CLS} -o F/att",
    "segment predict": f"segment predict W/good.png {SEG} -o F/sp",
    "detect predict": f"detect predict W/good.png {DET} -o F/dp",
    "segment eval": f"segment eval {SEG} --data W/segdata -o F/m.json",
    "linear": "linear W/grey.pth --protocol precomputed --epochs 1 --output F/probe --device cpu",
    "bench": "bench --render W/results.json --out F/R.md",
    "segment prepare": "segment prepare nuclei -o F/ds",
}


@pytest.mark.parametrize("name", list(FULL))
def test_a_full_disk_is_one_line_naming_the_output_and_loses_nothing(name, full_disk, world, tmp_path, capsys):
    folder, real = full_disk
    if not real and "prepare" in name:
        pytest.skip("a dataset folder is staged with plain writes: only a real full disk (tmpfs, root) tests it")
    argv = [t.replace("F/", f"{folder}/", 1) for t in _expand(FULL[name], world, tmp_path)]
    before = _snapshot(world, folder)
    code, _, err = run(argv, capsys)
    assert "Traceback" not in err and code == 2, err
    line = err.strip().splitlines()
    assert len(line) == 1 and "No space left on device" in line[0] and str(folder) in line[0], err
    after = _snapshot(world, folder)
    assert {p: h for p, h in after.items() if p in before} == before
    assert not [p for p in after if p not in before], "a partial output was left"


# ------------------------------------------------------------------------------------------------ what must work


def test_inputs_with_one_stem_and_non_utf8_names_all_get_their_own_outputs(world, tmp_path, capsys):
    """a.png and a.jpg never write over each other's outputs; a name that is not UTF-8 is kept, in valid UTF-8."""
    names = world / "names"
    expected = {"a.png", "a.jpg", "caf\\xe9"}
    for command, argv, pattern in (
        ("attention", ["attention", *map(str, sorted(names.iterdir())), "--checkpoint", str(world / "cls.pth"),
                       "-o", str(tmp_path / "att")], "_attention.png"),
        ("segment predict", ["segment", "predict", str(names), *SEG.replace("W/", f"{world}/").split(), "-o",
                             str(tmp_path / "sp")], "_overlay.png"),
        ("detect predict", ["detect", "predict", str(names), *DET.replace("W/", f"{world}/").split(), "-o",
                            str(tmp_path / "dp")], "_overlay.png"),
    ):
        code, out, err = run(argv, capsys)
        assert code == 0 and "Traceback" not in err, err
        folder = Path(argv[argv.index("-o") + 1])
        stems = {os.fsdecode(p.name)[:-len(pattern)] for p in folder.iterdir() if p.name.endswith(pattern)}
        stems = {s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for s in stems}
        assert stems == expected, (command, stems)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"p.{fmt}"
        code, _, err = run(["predict", str(names), "--checkpoint", str(world / "cls.pth"), "--no-progress", "-o",
                            str(out)], capsys)
        assert code == 0, err
        text = out.read_bytes().decode("utf-8")  # valid UTF-8
        rows = text.splitlines()[1:] if fmt == "csv" else [json.loads(r)["path"] for r in text.splitlines()]
        assert len(rows) == 3 and any("caf\\xe9.png" in r for r in rows), rows


def test_embed_reads_a_16_bit_greyscale_png_by_its_bit_depth(world, tmp_path, capsys):
    from xcit.data.large_images import read_large_image

    code, _, err = run(["embed", str(world / "grey16.png"), "--checkpoint", str(world / "cls.pth"), "-o",
                        str(tmp_path / "e.npz")], capsys)
    assert code == 0, err
    pixels = read_large_image(world / "grey16.png", 1)
    assert pixels.dtype == np.uint8 and np.array_equal(pixels[..., 0], _photo()[..., 0])  # v * 257 / 257, exactly


def test_segment_predict_names_and_skips_an_image_too_small_for_the_model(world, tmp_path, capsys):
    code, _, err = run(["segment", "predict", str(world / "one.png"), str(world / "good.png"), *SEG.replace(
        "W/", f"{world}/").split(), "--scale", "none", "-o", str(tmp_path / "sp")], capsys)
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert code == 1 and len(skipped) == 1 and "one.png" in skipped[0] and "at least" in skipped[0], err
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["good_mask.png", "good_overlay.png"]


def test_a_run_never_writes_onto_or_deletes_its_own_input(world, tmp_path, capsys):
    """The checkpoint a run reads is never its --output, nor deleted with an earlier run's files by --overwrite
    (a DINO run's teacher.pth probed into the same folder)."""
    run_dir = tmp_path / "dino-run"
    run_dir.mkdir()
    ckpt = run_dir / "teacher.pth"
    shutil.copy(world / "grey.pth", ckpt)
    before = ckpt.read_bytes()
    for output, extra in ((ckpt, []), (ckpt, ["--overwrite"]), (run_dir, ["--overwrite"])):
        code, _, err = run(["linear", str(ckpt), "--protocol", "precomputed", "--output", str(output), "--device",
                            "cpu", *extra], capsys)
        assert code == 2 and "the command's input" in err and len(err.strip().splitlines()) == 1, err
    assert ckpt.read_bytes() == before and sorted(p.name for p in run_dir.iterdir()) == ["teacher.pth"]


def test_overwrite_replaces_an_earlier_output(world, tmp_path, capsys):
    out = tmp_path / "p.csv"
    out.write_text("an earlier output\n")
    code, _, err = run(["predict", str(world / "good.png"), "--checkpoint", str(world / "cls.pth"), "--no-progress",
                        "-o", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert out.read_text().startswith("path,label_1,prob_1")
    assert not [p for p in tmp_path.iterdir() if p.name != "p.csv"]


# ------------------------------------------------------------------------------------------------ Python entry points


def _entry_points(world: Path, tmp: Path):
    """(name, call, exception type, words in its message) for the library functions behind the commands."""
    from xcit.data.datasets import build_dataset
    from xcit.data.images import collect_images, load_image, read_image
    from xcit.data.large_images import read_large_image
    from xcit.data.outputs import claim_file
    from xcit.detect.coco import CocoDetection, CocoFormatError
    from xcit.inference import PredictionWriter, load_for_inference
    from xcit.models import create_model
    from xcit.models.weights import CheckpointError
    from xcit.segment.data import DatasetInfo

    (tmp / "exists.csv").write_text("x\n")
    calls = []
    for kind, (path, words) in UNREADABLE.items():
        file = Path(path.replace("W/", f"{world}/"))
        calls += [(f"read_image: {kind}", lambda f=file: read_image(f), ValueError, (file.name, *words)),
                  (f"load_image: {kind}", lambda f=file: load_image(f, 1), ValueError, (file.name, *words)),
                  (f"read_large_image: {kind}", lambda f=file: read_large_image(f), ValueError, (file.name,))]
    calls += [
        ("collect_images: missing list", lambda: collect_images([], [tmp / "nope.txt"]), FileNotFoundError,
         ("nope.txt",)),
        ("load_for_inference: empty", lambda: load_for_inference(world / "empty.pth"), CheckpointError,
         ("empty.pth", "expected")),
        ("create_model: NaN weights", lambda: create_model(checkpoint=world / "nan.pth"), CheckpointError,
         ("nan.pth", "blocks.1.mlp.fc1.weight", "NaN")),
        ("CocoDetection: string ids", lambda: CocoDetection(world / "coco" / "string_id.json"), CocoFormatError,
         ("string_id.json", "'img1'")),
        ("CocoDetection: width word", lambda: CocoDetection(world / "coco" / "width_word.json"), CocoFormatError,
         ("width_word.json", "width", "'abc'")),
        ("CocoDetection: short RLE, strict", lambda: CocoDetection(world / "coco" / "rle_short.json", masks=True,
                                                                   strict=True), CocoFormatError, ("3072",)),
        ("DatasetInfo: broken yaml", lambda: DatasetInfo.load(world / "bad_yaml" / "broken"), ValueError,
         ("dataset.yaml", "line")),
        ("DatasetInfo: typed yaml", lambda: DatasetInfo.load(world / "bad_yaml" / "typed"), ValueError,
         ("dataset.yaml", "classes")),
        ("build_dataset: link loop", lambda: build_dataset(world / "loop", "train"), ValueError,
         ("symbolic link", "up")),
        ("PredictionWriter: existing", lambda: PredictionWriter(tmp / "exists.csv"), FileExistsError,
         ("exists.csv", "--overwrite")),
        ("claim_file: the input", lambda: claim_file(world / "cls.pth", overwrite=True, inputs=[world / "cls.pth"]),
         ValueError, ("cls.pth", "input")),
    ]
    return calls


def test_python_entry_points_raise_one_line_errors_naming_the_file(world, tmp_path):
    from xcit.bench import BenchSettings, render_files
    from xcit.dino import linear_probe

    calls = _entry_points(world, tmp_path)
    calls += [
        ("BenchSettings: batch 0", lambda: BenchSettings(batch=0).check(), ValueError, ("batch", ">= 1")),
        ("render_files: broken JSON", lambda: render_files(world / "broken.json", tmp_path / "R.md"), ValueError,
         ("broken.json", "JSON")),
        ("linear_probe: output is input", lambda: linear_probe(world / "grey.pth", output=str(world / "grey.pth"),
                                                              overwrite=True), ValueError, ("grey.pth", "input")),
    ]
    before = _snapshot(world, tmp_path)
    for name, call, kind, words in calls:
        with pytest.raises(kind) as err:
            call()
        text = str(err.value)
        assert "\n" not in text and all(w in text for w in words), (name, text)
    assert _snapshot(world, tmp_path) == before
