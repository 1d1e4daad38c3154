"""The README's "Python API" snippet runs as written on the kind of model its Quick start trains.

The Quick start's ``xcit train --output runs/fmnist`` takes 10 minutes; here the same command (the same
Fashion-MNIST preset: architecture, 1 channel, 28 x 28, Fashion-MNIST statistics, the same ``model.pth`` writer)
trains for one epoch on 256 Fashion-MNIST images, in a folder named like the README's, so the snippet runs
with its own file names: nothing in it is adapted.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import xcit
from xcit.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_dir, read_idx
from xcit.inference import Predictor, load_for_inference, read_metadata

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_snippet() -> str:
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (the Fashion-MNIST format): 0, 0, 0x08 (unsigned bytes), the number of dimensions, the sizes."""
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding ``runs/fmnist/model.pth`` written by ``xcit train`` with the Quick start's preset,
    ``photo.jpg`` (a colour photo of another size) and ``xcit_nano_12_p16_224.pth`` (official release layout)."""
    root = tmp_path_factory.mktemp("readme")
    # "fashion" in the folder's name: Fashion-MNIST's classes and statistics, as for the named dataset
    source, subset = fashion_mnist_dir(), root / "fashion-mnist-subset"
    subset.mkdir()
    for split, n in (("train", 256), ("t10k", 128)):
        for kind in ("images-idx3", "labels-idx1"):
            write_idx(subset / f"{split}-{kind}-ubyte.gz", read_idx(source / f"{split}-{kind}-ubyte.gz")[:n])
    command = [sys.executable, "-m", "xcit", "train", "--data", str(subset), "--output", "runs/fmnist", "--epochs", "1",
               "--threads", "1", "--no-plot", "--no-progress"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    y, x = np.mgrid[0:45, 0:60]
    photo = np.stack([4 * x, 5 * y, 255 - 2 * x - 2 * y], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(photo).save(root / "photo.jpg", quality=95)
    torch.save({"model": xcit.create_model("xcit_nano_12_p16").state_dict()}, root / "xcit_nano_12_p16_224.pth")
    return root


def test_the_checkpoint_is_the_quick_starts_kind(workdir):
    meta = read_metadata(workdir / "runs" / "fmnist" / "model.pth")
    assert meta["arch"]["in_chans"] == 1 and meta["arch"]["patch_size"] == 8 and meta["arch"]["depth"] == 4
    assert {k: meta["data"][k] for k in ("img_size", "in_chans", "mean", "std", "crop_pct", "interpolation")} == {
        "img_size": 28, "in_chans": 1, "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD),
        "crop_pct": 1.0, "interpolation": "bicubic"}
    assert meta["classes"][0] == "T-shirt/top"


def test_the_python_api_snippet_runs_as_written(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(python_api_snippet(), f"{README}: Python API", "exec"), scope)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert "DataConfig(in_chans=1, img_size=(28, 28), mean=(0.286,), std=(0.353,), crop_pct=1.0" in printed
    # the colour photo became the model's input: grey (PIL's luma), bicubic to 28 x 28, Fashion-MNIST statistics
    grey = torch.from_numpy(np.array(Image.open("photo.jpg").convert("L")))[None]
    resized = v2.functional.resize(grey, [28], v2.InterpolationMode.BICUBIC, antialias=True)
    resized = v2.functional.center_crop(resized, [28])
    expected = (resized.float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    assert scope["x"].shape == (1, 1, 28, 28) and torch.allclose(scope["x"][0], expected, atol=1e-5)
    # and its probabilities are those `xcit predict` gives for the file
    [pred] = Predictor(load_for_inference("runs/fmnist/model.pth"), optimize=False).predict(["photo.jpg"], top_k=10)
    assert scope["probs"].shape == (1, 10)
    assert torch.allclose(scope["probs"][0, pred.indices], torch.tensor(pred.probs), atol=1e-5)
    assert scope["maps"][1].shape == (1, 128, 4, 4) and scope["tokens"].shape == (1, 17, 128)
    assert [tuple(f.shape[-2:]) for f in scope["features"].values()] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert scope["transform"].transforms[2].size == [384]  # the 384 name: resize to 384
    assert xcit.resolve_data_config("grey.safetensors").in_chans == 1 and scope["tuned"].num_classes == 5
