"""Small promises: messages name options the user can see, written files get the umask's permissions,
masks are binarised as mmdetection binarises them."""
from __future__ import annotations

import os
import re
import stat
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import xcit
from test_cli_errors import run

from xcit.detect.evaluation import to_coco_results
from xcit.detect.predict import draw_overlay
from xcit.models.weights import download_file


def test_the_export_refusal_names_only_options_help_shows(tmp_path, capsys):
    model = xcit.XCiT(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    ckpt = xcit.save_checkpoint(model, tmp_path / "m.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "m.json").write_text("an earlier export")
    code, _, err = run(["export", "--checkpoint", str(ckpt), "-o", str(tmp_path / "out"), "--img-size", "32"], capsys)
    assert code == 2 and "already holds an export named m (m.json)" in err
    named = set(re.findall(r"--[a-z][a-z0-9-]*", err))
    assert {"--overwrite", "--output", "--name"} <= named, err
    code, help_text, _ = run(["export", "--help"], capsys)
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    assert code == 0 and named <= shown, f"the message names options --help does not show: {sorted(named - shown)}"


@contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_weights_get_the_umasks_permissions(tmp_path, monkeypatch, mask):
    """save_checkpoint (both formats, new and replaced files) and the download cache: 0666 less the umask,
    as any other file of a run (they were 0600: the temporary file's mode survived the rename)."""
    model = xcit.XCiT(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "weights.pth").write_bytes(b"anything")
    torch.hub.set_dir(str(tmp_path / "hub"))
    with umask(mask):
        paths = [xcit.save_checkpoint(model, tmp_path / "run" / name) for name in ("model.pth", "model.safetensors")]
        paths.append(xcit.save_checkpoint(model, tmp_path / "run" / "model.pth"))  # replaced
        paths.append(download_file((mirror / "weights.pth").as_uri(), "test weights"))
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.pth", "model.safetensors"]  # no temporaries


def test_a_mask_probability_equal_to_the_threshold_is_foreground():
    """mmdet 2.11 keeps ``mask >= mask_thr_binary`` (FCNMaskHead.get_seg_masks); COCO results and overlays agree."""
    probs = torch.tensor([[0.49, 0.5, 0.51], [0.5, 0.2, 0.8]])
    output = {"boxes": torch.tensor([[0.0, 0.0, 3.0, 2.0]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1]), "masks": probs[None, None]}
    from pycocotools import mask as mask_utils

    [entry] = to_coco_results(output, image_id=7, label_to_cat={1: 3})
    rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
    assert mask_utils.decode(rle).tolist() == [[0, 1, 1], [1, 0, 1]]
    image = torch.zeros(3, 2, 3, dtype=torch.uint8)
    tinted = np.asarray(draw_overlay(image, output, ["thing"], labels=False)).any(-1)
    assert tinted[1, 0] and tinted[0, 1] and not tinted[1, 1]  # (0, 0) is under the box outline
