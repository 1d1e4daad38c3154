"""Batched prediction: folders and lists, a corrupt file reported not fatal, CSV / JSONL, metadata fallbacks."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xcit.cli import main
from xcit.data.images import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_image
from xcit.inference import Predictor, collect_images, load_for_inference, read_metadata
from xcit.models import XCiT
from xcit.models.weights import save_checkpoint

CLASSES = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
DATA = {"img_size": 24, "in_chans": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "crop_pct": 0.875, "dataset": "toy"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = XCiT(patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)  # spread the probabilities so rankings are meaningful
    path = tmp_path_factory.mktemp("ckpt") / "toy.pth"
    return save_checkpoint(model, path, extra={"classes": CLASSES, "data": DATA, "metrics": {"top1": 0.5}})


@pytest.fixture()
def folder(tmp_path):
    """Five readable images of different sizes and modes (one in a sub-folder), one corrupt, one non-image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name, shape in [("a.png", (30, 40, 3)), ("b.jpg", (64, 20, 3)), ("c.png", (17, 17)), ("sub/d.bmp", (50, 50, 3))]:
        Image.fromarray(rng.integers(0, 255, shape, dtype="uint8")).save(root / name)
    Image.fromarray(rng.integers(0, 255, (33, 28, 4), dtype="uint8"), "RGBA").save(root / "e.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_collect_images_recurses_sorts_and_keeps_named_missing_files(folder, tmp_path):
    found = collect_images([folder])
    names = [p.split("images/")[1] for p in found]
    assert names == ["a.png", "b.jpg", "c.png", "corrupt.jpg", "e.png", "sub/d.bmp"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my images\n{folder / 'a.png'}\n\n{tmp_path / 'missing.png'}\n")
    assert collect_images([], [lst]) == [str(folder / "a.png"), str(tmp_path / "missing.png")]
    with pytest.raises(FileNotFoundError, match="list file"):
        collect_images([], [tmp_path / "nope.txt"])


def test_predict_folder_with_a_corrupt_file(ckpt, folder):
    inf = load_for_inference(ckpt)
    paths = collect_images([folder])
    preds = list(Predictor(inf).predict(paths, top_k=3, batch_size=4))
    assert [p.path for p in preds] == paths  # input order, every file reported
    bad = [p for p in preds if p.error]
    assert [p.path for p in bad] == [str(folder / "corrupt.jpg")] and bad[0].labels == [] and bad[0].probs == []
    transform = eval_transform(24, 0.875, DATA["mean"], DATA["std"])
    for p in preds:
        if p.error:
            continue
        assert len(p.labels) == 3 and p.probs == sorted(p.probs, reverse=True) and sum(p.probs) <= 1 + 1e-6
        assert p.labels == [CLASSES[i] for i in p.indices]
        with torch.no_grad():
            expected = inf.model(transform(load_image(p.path))[None]).softmax(-1)[0]
        np.testing.assert_allclose(p.probs, expected[p.indices].numpy(), atol=1e-5)
        assert p.indices == expected.topk(3).indices.tolist()


def test_batch_size_and_threads_do_not_change_results(ckpt, folder):
    predictor = Predictor.load(ckpt)
    paths = collect_images([folder])
    one = list(predictor.predict(paths, top_k=2, batch_size=1))
    many = list(predictor.predict(paths, top_k=2, batch_size=8, threads=2))
    assert [p.labels for p in one] == [p.labels for p in many]
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        assert (a.error is None) == (b.error is None)


def test_cli_csv_and_jsonl(ckpt, folder, tmp_path, capsys):
    out_csv = tmp_path / "preds.csv"
    # one unreadable file: every other image is classified and written, the status says one failed
    code = main(["predict", str(folder), "--checkpoint", str(ckpt), "-o", str(out_csv), "--top-k", "2", "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "5 classified, 1 unreadable" in captured.err
    assert "ERROR" in captured.out  # few images: the table is printed too
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "error"]
    assert len(rows) == 6
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("corrupt.jpg") and bad[0]["label_1"] == ""
    good = [r for r in rows if not r["error"]]
    assert all(r["label_1"] in CLASSES and float(r["prob_1"]) >= float(r["prob_2"]) for r in good)

    out_jsonl = tmp_path / "preds.jsonl"
    lst = tmp_path / "list.txt"
    lst.write_text(f"{folder / 'a.png'}\n{folder / 'corrupt.jpg'}\n")
    assert main(["predict", "--list", str(lst), "--checkpoint", str(ckpt), "-o", str(out_jsonl), "--no-progress",
                 "--threads", "1", "--batch-size", "1"]) == 1
    records = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [r["error"] is None for r in records] == [True, False]
    assert len(records[0]["labels"]) == 5 and records[0]["labels"][0] == CLASSES[records[0]["indices"][0]]
    assert sum(records[0]["probs"]) <= 1 + 1e-5


def test_cli_all_unreadable_fails_and_nothing_to_do_errors(ckpt, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"junk")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--no-progress"]) == 1
    assert main(["predict", "--checkpoint", str(ckpt)]) == 2
    assert "expected images" in capsys.readouterr().err


def test_random_model_warns_and_uses_imagenet_names(tmp_path, capsys):
    Image.fromarray(np.zeros((40, 60, 3), dtype="uint8")).save(tmp_path / "black.png")
    assert main(["predict", str(tmp_path / "black.png"), "--model", "xcit_nano_12_p16", "--img-size", "64",
                 "--top-k", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "randomly initialised" in captured.err and "meaningless" in captured.err
    from xcit.data.images import imagenet_class_names

    names = set(imagenet_class_names())
    line = captured.out.splitlines()[-1]
    assert any(name in line for name in names)


def test_metadata_and_fallbacks(ckpt, tmp_path):
    meta = read_metadata(ckpt)
    assert meta["classes"] == CLASSES and meta["data"] == DATA and "model" not in meta
    inf = load_for_inference(ckpt)
    assert inf.classes == CLASSES and inf.img_size == (24, 24) and inf.crop_pct == 0.875 and inf.mean == (0.5, 0.4, 0.3)
    # safetensors carry the same metadata (JSON-encoded)
    st = save_checkpoint(inf.model, tmp_path / "toy.safetensors", extra={"classes": CLASSES, "data": DATA})
    assert read_metadata(st)["classes"] == CLASSES
    assert load_for_inference(st).img_size == (24, 24)
    # the training run's resampling is used for prediction too
    bil = save_checkpoint(inf.model, tmp_path / "bilinear.pth", extra={"data": {**DATA, "interpolation": "bilinear"}})
    from torchvision.transforms import v2

    resize = [t for t in load_for_inference(bil).transform().transforms if isinstance(t, v2.Resize)]
    assert [t.interpolation for t in resize] == [v2.InterpolationMode.BILINEAR]
    # a bare 1000-class state dict: ImageNet names and the ImageNet evaluation preprocessing
    model = XCiT(patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=1000)
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    assert read_metadata(bare) == {}
    inf = load_for_inference(bare)
    assert len(inf.classes) == 1000 and inf.classes[0] == "tench"
    assert inf.img_size == (224, 224) and inf.mean == IMAGENET_MEAN and inf.std == IMAGENET_STD and inf.crop_pct == 1.0
    # other class counts without names: generic names
    model = XCiT(patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3, in_chans=1)
    save_checkpoint(model, tmp_path / "three.pth")
    inf = load_for_inference(tmp_path / "three.pth")
    assert inf.classes == ["class_0", "class_1", "class_2"] and len(inf.mean) == 1
    with pytest.raises(ValueError, match="expected a checkpoint or a model name"):
        load_for_inference()


def test_the_progress_bar_counts_every_image_when_the_caller_stops_at_the_last(ckpt, folder, monkeypatch):
    """``xcit predict`` takes exactly one prediction per input (``next``), so the generator never resumes after the
    last one: the bar must already count it."""
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.counted = 0
            bars.append(self)

        def update(self, n=1):
            self.counted += n

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    paths = collect_images([folder])
    predictions = Predictor(load_for_inference(ckpt)).predict(paths, batch_size=3, progress=True)
    taken = [next(predictions) for _ in paths]
    assert len(taken) == len(paths) > 3 and bars[0].counted == len(paths)
