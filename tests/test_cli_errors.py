"""The CLI's promises about bad input: one-line errors, never a traceback, and one rule for unreadable images."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from xcit import create_model
from xcit.cli import main
from xcit.cli.unreadable import UNREADABLE_EXIT
from xcit.models.weights import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``xcit argv`` in this process; argparse's exits count as statuses."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def digits_model() -> torch.nn.Module:
    return create_model("xcit_nano_12_p16", num_classes=10, in_chans=1, patch_size=2, embed_dim=32, depth=2,
                        num_heads=2, tokens_norm=True)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """YAML files with bad values, a checkpoint that records no dataset, and an earlier export."""
    def yaml_file(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    save_checkpoint(digits_model(), tmp_path / "plain.pth")
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "plain.json").write_text("{}")
    return {
        "BATCH_FRACTION": yaml_file("fraction.yaml", "data: digits\nbatch_size: 2.5\n"),
        "EPOCHS_WORD": yaml_file("word.yaml", "epochs: two\n"),
        "ITERS_FRACTION": yaml_file("iters.yaml", "iters: 2.5\n"),
        "TOPK_WORD": yaml_file("topk.yaml", "top_k: five\n"),
        "FLAG_WORD": yaml_file("flag.yaml", "no_progress: maybe\n"),
        "BROKEN_YAML": yaml_file("broken.yaml", "epochs: [1,\n"),
        "SHORT_LIST": yaml_file("short.yaml", "out_indices: [1, 2]\n"),
        "GOOD": yaml_file("good.yaml", "data: digits\n"),
        "MISSING": tmp_path / "missing.yaml",
        "PLAIN": tmp_path / "plain.pth",
        "EXPORTED": tmp_path / "exported",
        "NOTES": yaml_file("notes.txt", "some notes, not a checkpoint, not JSON\n"),
        "NOWHERE": tmp_path / "nowhere",
    }


@pytest.mark.parametrize("argv, expected", [
    (["train", "--config", "BATCH_FRACTION", "--print-config"], ["batch_size", "2.5", "integer"]),
    (["train", "--config", "EPOCHS_WORD", "--print-config"], ["epochs", "'two'", "number"]),
    (["train", "--data", "digits", "--batch-size", "2.5", "--print-config"], ["--batch-size", "'2.5'"]),
    (["dino", "--config", "BATCH_FRACTION", "--print-config"], ["batch_size", "2.5"]),
    (["detect", "train", "--config", "EPOCHS_WORD"], ["epochs", "'two'"]),
    (["segment", "train", "--config", "ITERS_FRACTION"], ["iters", "2.5"]),
    (["predict", "x.png", "--model", "xcit_nano_12_p16", "--config", "TOPK_WORD"], ["top_k", "'five'"]),
    (["predict", "x.png", "--model", "xcit_nano_12_p16", "--config", "FLAG_WORD"], ["no_progress", "true or false"]),
    (["train", "--config", "BROKEN_YAML"], ["not valid YAML", "line"]),
    (["segment", "train", "--config", "SHORT_LIST"], ["out_indices", "expected 4 values", "[1, 2]"]),
    (["train", "--config", "GOOD", "--config", "MISSING", "--print-config"], ["missing.yaml", "does not exist"]),
    (["eval", "PLAIN", "--device", "cpu"], ["expected --data", "does not record"]),
    (["knn", "PLAIN", "--device", "cpu"], ["expected --data", "does not record"]),
    (["linear", "--pixels", "--device", "cpu"], ["expected --data"]),
    (["predict", "x.png", "--model", "xcit_nano_12_p16", "--device", "tpu"], ["expected a device", "'tpu'"]),
    (["export", "--checkpoint", "PLAIN", "-o", "EXPORTED"], ["already holds", "plain.json", "--overwrite"]),
    # every training command: bad values, files and paths are one line, never a traceback
    (["train", "--data", "digits", "--output", "NOTES", "--threads", "1"], ["--output", "notes.txt", "is a file"]),
    (["train", "--data", "digits", "--resume", "NOTES", "--threads", "1"], ["notes.txt", "checkpoint"]),
    (["train", "--data", "NOWHERE", "--threads", "1"], ["nowhere"]),
    (["dino", "--data", "digits", "--lr", "-1", "--print-config"], ["lr", "-1"]),
    (["dino", "--data", "digits", "--resume", "NOTES", "--threads", "1"], ["notes.txt", "checkpoint"]),
    (["dino", "--data", "digits", "--output", "NOTES", "--threads", "1"], ["notes.txt", "is a file"]),
    (["detect", "train", "--train-json", "NOWHERE", "--model", "xcit_nano_12_p16"], ["nowhere"]),
    (["detect", "train", "--train-json", "NOTES", "--model", "xcit_nano_12_p16"], ["notes.txt", "JSON"]),
    (["detect", "train", "--train-json", "NOTES", "--model", "xcit_nope"], ["xcit_nope"]),
    (["detect", "train", "--train-json", "NOTES", "--batch-size", "0", "--model", "xcit_nano_12_p16"],
     ["batch_size", "0"]),
    (["detect", "train", "--train-json", "NOTES"], ["expected --model"]),
    (["segment", "train", "--data", "NOWHERE", "--model", "xcit_nano_12_p16"], ["nowhere"]),
    (["segment", "train", "--data", "NOWHERE", "--model", "xcit_nano_12_p16", "--scale", "512"], ["--scale"]),
    (["segment", "train", "--data", "NOWHERE", "--model", "xcit_nano_12_p16", "--resume", "NOTES"],
     ["notes.txt", "training checkpoint"]),
    (["segment", "train", "--data", "NOWHERE", "--model", "xcit_nano_12_p16", "--amp", "fp17"], ["--amp", "fp17"]),
    # every other subcommand too
    (["models", "--config", "EPOCHS_WORD"], ["unknown option", "epochs"]),
    (["info", "xcit_nope"], ["xcit_nope"]),
    (["attention", "NOWHERE", "--checkpoint", "NOTES"], ["notes.txt"]),
    (["embed", "NOWHERE", "--model", "xcit_nano_12_p16"], ["--output"]),
    (["export", "--checkpoint", "NOTES", "-o", "NOWHERE"], ["notes.txt"]),
    (["bench", "--preset", "nope"], ["--preset", "nope"]),
    (["knn", "NOTES"], ["notes.txt"]),
    (["linear", "PLAIN", "--device", "cpu"], ["expected --data", "does not record"]),
    (["segment", "prepare", "nuclei"], ["expected --output"]),
    (["segment", "eval", "--checkpoint", "NOTES", "--data", "NOWHERE"], ["notes.txt"]),
    (["segment", "predict", "NOWHERE", "--checkpoint", "NOTES"], ["notes.txt"]),
    (["detect", "prepare", "trees"], ["expected --output"]),
    (["detect", "eval", "--checkpoint", "PLAIN", "--json", "NOTES"], ["plain.pth", "not a detection checkpoint"]),
    (["detect", "predict", "NOWHERE", "--checkpoint", "PLAIN"], ["plain.pth", "detection checkpoint"]),
])
def test_bad_input_is_one_line_on_stderr_and_a_nonzero_status(argv, expected, files, capsys):
    code, _, err = run([str(files.get(a, a)) for a in argv], capsys)
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(word in lines[0] for word in expected), lines[0]


def test_bad_config_value_in_a_fresh_process_is_one_line_and_status_2(tmp_path):
    (tmp_path / "c.yaml").write_text("batch_size: 2.5\n")
    result = subprocess.run([sys.executable, "-m", "xcit", "train", "--config", str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    expected = f"xcit train: error: batch_size: expected an integer, got 2.5 (in {tmp_path / 'c.yaml'})"
    assert result.stderr.strip() == expected


def test_integral_floats_are_integers_and_later_config_files_win(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("data: digits\nbatch_size: 4.0\nlr: 0.01\nmean: 0.5\n")
    (tmp_path / "b.yaml").write_text("batch_size: 6\n")
    code, out, _ = run(["train", "--config", str(tmp_path / "a.yaml"), "--print-config"], capsys)
    printed = yaml.safe_load(out)
    assert code == 0 and printed["batch_size"] == 4 and isinstance(printed["batch_size"], int)
    assert printed["mean"] == [0.5]  # a scalar for a multi-value option reads as `--mean 0.5`
    code, out, _ = run(["train", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"),
                        "--print-config"], capsys)
    printed = yaml.safe_load(out)
    assert code == 0 and printed["batch_size"] == 6 and printed["lr"] == 0.01  # b overrides a key by key
    code, out, _ = run(["train", "--config", str(tmp_path / "b.yaml"), "--config", str(tmp_path / "a.yaml"),
                        "--batch-size", "9", "--print-config"], capsys)
    assert code == 0 and yaml.safe_load(out)["batch_size"] == 9  # the command line wins over every file


def test_eval_without_data_uses_the_dataset_the_checkpoint_records(tmp_path, capsys):
    save_checkpoint(digits_model(), tmp_path / "m.pth",
                    extra={"data": {"dataset": "digits", "img_size": 8, "in_chans": 1, "crop_pct": 1.0}})
    code, out, _ = run(["eval", str(tmp_path / "m.pth"), "--device", "cpu", "--json"], capsys)
    metrics = json.loads(out)
    assert code == 0 and metrics["data"] == "digits" and metrics["n"] == 364  # digits' held-out split


def test_export_overwrite_replaces_every_file_of_the_earlier_export(tmp_path, capsys):
    save_checkpoint(create_model("xcit_nano_12_p16", num_classes=3, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                    tmp_path / "m.pth")
    out = tmp_path / "exported"
    out.mkdir()
    for name in ("m.onnx", "m.onnx.data", "m.pt2", "m.json", "other.json"):
        (out / name).write_text("old")
    argv = ["export", "--checkpoint", str(tmp_path / "m.pth"), "-o", str(out), "--formats", "pt2", "--no-check",
            "--img-size", "32"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "m.onnx, m.onnx.data, m.pt2, m.json" in err
    assert all((out / name).read_text() == "old" for name in ("m.onnx", "m.pt2", "m.json"))  # nothing touched
    code, _, _ = run([*argv, "--overwrite"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "m.pt2", "other.json"]  # no stale m.onnx beside them
    assert json.loads((out / "m.json").read_text())["pt2"] == "m.pt2" and (out / "other.json").read_text() == "old"


# ----------------------------------------------------------------------------- unreadable inputs


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with one readable image and one corrupt ``.png``."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png at all")
    return folder


def _segmenter(path: Path) -> Path:
    from xcit.segment.model import build_segmenter, save_segmenter

    model = build_segmenter(3, arch=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), head="fpn", channels=16,
                            fpn_channels=16)
    return save_segmenter(model, path)


def _detector(path: Path) -> Path:
    from xcit.detect.model import build_detector, detector_state
    from xcit.train.checkpoint import save_state

    model = build_detector(2, arch=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), kind="faster_rcnn",
                           fpn_channels=32, box_head_dim=64, rpn_pre_nms_test=50, rpn_post_nms_test=20,
                           anchor_sizes=[8, 16, 32, 64, 128], min_size=[64], max_size=128)
    save_state(path, detector_state(model, {"classes": ["a", "b"]}))
    return path


@pytest.mark.parametrize("command", ["predict", "embed", "attention", "segment predict", "detect predict"])
def test_prediction_commands_process_every_readable_image_and_exit_1_if_any_failed(command, images, tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "out"
    good, bad = images / "good.png", images / "bad.png"
    model = ["--model", "xcit_nano_12_p16"]
    argv = {
        "predict": ["predict", str(images), *model, "--img-size", "32", "-o", str(out / "p.csv"), "--no-progress"],
        "embed": ["embed", str(images), *model, "-o", str(out / "e.npz")],
        "attention": ["attention", str(bad), str(good), *model, "--img-size", "32", "-o", str(out)],
        "segment predict": ["segment", "predict", str(images), "--checkpoint", str(_segmenter(tmp_path / "s.pt")),
                            "--out", str(out), "--device", "cpu"],
        "detect predict": ["detect", "predict", str(images), "--checkpoint", str(_detector(tmp_path / "d.pt")),
                           "--out", str(out), "--device", "cpu"],
    }[command]
    code, _, err = run(argv, capsys)
    assert code == UNREADABLE_EXIT
    assert "Traceback" not in err
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"xcit {command}: skipped {bad}: ") and "good" not in skipped[0]
    # the readable image's output is written, and the unreadable one is recorded where the format allows
    if command == "predict":
        rows = {r["path"]: r for r in csv.DictReader((out / "p.csv").open())}
        assert rows[str(good)]["label_1"] and not rows[str(good)]["error"] and rows[str(bad)]["error"]
    elif command == "embed":
        saved = np.load(out / "e.npz")
        meta = json.loads(str(saved["meta"]))
        assert list(saved["paths"]) == [str(good)] and [u["path"] for u in meta["unreadable"]] == [str(bad)]
    elif command == "attention":
        assert (out / "good_attention.png").is_file() and not list(out.glob("bad*"))
    elif command == "segment predict":
        assert {p.name for p in out.iterdir()} == {"good_mask.png", "good_overlay.png"}
    else:
        pred = json.loads((out / "predictions.json").read_text())
        assert (out / "good_overlay.png").is_file() and [im["file_name"] for im in pred["images"]] == [str(good)]
        assert [u["path"] for u in pred["unreadable"]] == [str(bad)]


def test_prediction_exits_0_when_every_input_is_read(images, tmp_path, capsys):
    (images / "bad.png").unlink()
    code, _, err = run(["predict", str(images), "--model", "xcit_nano_12_p16", "--img-size", "32", "--no-progress"],
                       capsys)
    assert code == 0 and "skipped" not in err


def test_policy_is_stated_in_each_prediction_commands_help():
    from xcit.cli import build_parser
    from xcit.cli.config import _chosen_subparser

    parser = build_parser()
    for command in (["predict"], ["embed"], ["attention"], ["segment", "predict"], ["detect", "predict"]):
        text = _chosen_subparser(parser, command).format_help()
        assert f"{UNREADABLE_EXIT} if any could not be read" in " ".join(text.split()), command
