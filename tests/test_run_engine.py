"""The run engine shared by every training command: one dialect, run folders that lose and mix nothing."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from xcit.cli import build_parser, main
from xcit.train import NonFiniteLossError, OptimOptions, OptimStep, RunFolderError, RunOptions
from xcit.train.distributed import DistEnv
from xcit.train.run import RUN_FILES, prepare_run_dir

TRAINING_COMMANDS = (["train"], ["dino"], ["detect", "train"], ["segment", "train"])
TINY_DIGITS = ["--data", "digits", "--epochs", "1", "--threads", "1", "--no-progress", "--no-plot"]


def _parser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_every_training_command_speaks_the_same_dialect():
    parsers = {" ".join(p): _options(_parser(p)) for p in TRAINING_COMMANDS}
    for name in RunOptions.__dataclass_fields__:  # one name, one meaning, one default
        flag = "--" + name.replace("_", "-")
        actions = {cmd: opts.get(flag) for cmd, opts in parsers.items()}
        assert all(actions.values()), (flag, [c for c, a in actions.items() if a is None])
        helps = {a.help for a in actions.values()}
        assert len(helps) == 1, (flag, helps)  # the same help, so the same meaning and default
    for name in OptimOptions.__dataclass_fields__:  # one name, one meaning; the default is each recipe's
        flag = "--" + name.replace("_", "-")
        helps = {re.sub(r" \[default: [^]]*\]$", "", opts[flag].help) for opts in parsers.values()}
        assert len(helps) == 1, (flag, helps)
    for cmd, opts in parsers.items():
        for flag in ("--config", "--print-config", "--preset", "--batch-size", "--model", "--lr", "--weight-decay"):
            assert flag in opts, (cmd, flag)
        assert "per process" in opts["--batch-size"].help, cmd
        assert "--out" not in opts or opts["--out"].help == argparse.SUPPRESS  # old spellings stay hidden
    for cmd in ("detect train", "segment train"):
        for old in ("--out", "--backbone", "--log-interval", "--eval-interval", "--checkpoint-interval",
                    "--time-limit-min"):
            assert parsers[cmd][old].help == argparse.SUPPRESS, (cmd, old)
    # the same weight-decay exemption switch wherever it exists
    for cmd, opts in parsers.items():
        assert "--wd-exempt-per-channel" in opts and "--wd-exempt-temperature" not in {
            s for s, a in opts.items() if a.help != argparse.SUPPRESS}, cmd


@pytest.mark.parametrize("command", TRAINING_COMMANDS, ids=lambda c: " ".join(c))
def test_print_config_resolves_old_spellings_to_the_new_names(command, tmp_path, capsys):
    extra = {"train": ["--data", "digits"], "dino": ["--data", "digits"],
             "detect train": ["--train-json", str(tmp_path / "t.json"), "--backbone", "xcit_nano_12_p16"],
             "segment train": ["--data", str(tmp_path), "--backbone", "xcit_nano_12_p16"]}[" ".join(command)]
    code = main([*command, *extra, "--out", str(tmp_path / "run"), "--log-interval", "7", "--print-config"])
    assert code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output"] == str(tmp_path / "run") and printed["log_every"] == 7
    assert "out" not in printed and "log_interval" not in printed
    if len(command) == 2:
        assert printed["model"] == "xcit_nano_12_p16"


def test_a_folder_holding_another_run_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pth").write_bytes(b"an earlier model")
    (run / "train.log").write_text("an earlier run's log\n")
    code = main(["train", *TINY_DIGITS, "--output", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "holds another run's files (model.pth, train.log)" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert (run / "model.pth").read_bytes() == b"an earlier model" and not (run / "metrics.jsonl").exists()
    # told to: the earlier files are removed first, so the new log and metrics hold only the new run
    assert main(["train", *TINY_DIGITS, "--output", str(run), "--overwrite"]) == 0
    assert "an earlier run" not in (run / "train.log").read_text()
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs"] == 1
    assert main(["train", *TINY_DIGITS, "--output", str(run), "--resume", "--overwrite"]) == 2
    assert "not both" in capsys.readouterr().err


def test_run_folder_paths_that_cannot_work_are_one_line_errors(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for output, expected in ((a_file, "which is a file"), (a_file / "run", "cannot write the run folder")):
        code = main(["train", *TINY_DIGITS, "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "not a folder"


def test_orphan_temporary_checkpoints_of_a_killed_run_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"state")
    orphan = run / ".last.pt.abc123.tmp"
    orphan.write_bytes(b"half written")
    keep = run / "notes.tmp"
    keep.write_text("the user's")
    with pytest.raises(RunFolderError, match="--resume"):
        prepare_run_dir(run, "unused", DistEnv())
    assert orphan.exists()  # nothing is touched when the folder is refused
    prepare_run_dir(run, "unused", DistEnv(), resuming=True)
    assert not orphan.exists() and keep.exists() and (run / "last.pt").exists()
    assert set(RUN_FILES) >= {"last.pt", "best.pt", "result.json", "config.yaml", "train.log", "metrics.jsonl"}


def test_the_optimiser_step_refuses_a_non_finite_loss_and_leaves_the_weights():
    layer = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    step = OptimStep(torch.optim.SGD(layer.parameters(), lr=0.1), layer.parameters(), DistEnv(), None, clip_grad=1.0)
    loss = layer(torch.ones(2, 3)).sum()
    assert math.isfinite(step(loss)) and step.steps == 1
    moved = {k: v.clone() for k, v in layer.state_dict().items()}
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    bad = layer(torch.full((2, 3), float("nan"))).sum()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan \(box 1, mask nan\) at step 2"):
        step(bad, parts={"box": torch.tensor(1.0), "mask": torch.tensor(float("nan"))})
    assert all(torch.equal(moved[k], v) for k, v in layer.state_dict().items()) and step.steps == 1
    # per-parameter clipping, DINO's rule: every gradient norm at most the limit
    per = OptimStep(torch.optim.SGD(layer.parameters(), lr=0.0), layer.parameters(), DistEnv(), None, clip_grad=0.5,
                    clip_mode="per-param")
    per(layer(torch.full((4, 3), 100.0)).sum())
    assert all(p.grad.norm() <= 0.5 + 1e-5 for p in layer.parameters())


def test_unreadable_validation_images_are_counted_and_reported(tmp_path, capsys):
    from test_data import make_image_folder

    root = make_image_folder(tmp_path / "data", per_class=4, size=16, corrupt=[("val", "fox", "bad.jpg")])
    code = main(["train", "--data", str(root), "--output", str(tmp_path / "run"), "--model", "xcit_nano_12_p16",
                 "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--img-size", "16",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-ema", "--mixup", "0", "--cutmix", "0",
                 "--repeated-aug", "1", "--auto-augment", "none", "--amp", "none", "--threads", "1", "--no-progress",
                 "--no-plot"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 unreadable, skipped" in printed and "skipped unreadable images: 0 in training (all epochs), 1 of" in printed
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    evaluation = [r for r in records if r["kind"] == "eval"][-1]
    assert evaluation["skipped"] == 1 and epoch["skipped_images"] == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["skipped_images"] == {"train": 0, "val": 1}


def test_resolve_config_takes_old_names_in_python_with_a_warning(tmp_path):
    from xcit.detect import resolve_config as detect_config
    from xcit.segment import resolve_config as segment_config

    with pytest.warns(FutureWarning, match="'out' is now 'output'"):
        cfg = detect_config(train_json=str(tmp_path / "t.json"), backbone="xcit_nano_12_p16", out=str(tmp_path / "r"))
    assert cfg.model == "xcit_nano_12_p16" and cfg.output == str(tmp_path / "r") and cfg.batch_size == 2
    with pytest.raises(ValueError, match="not both"):
        segment_config(data=str(tmp_path), model="xcit_nano_12_p16", out="a", output="b")
    seg = segment_config(data=str(tmp_path), model="xcit_nano_12_p16", scale="none", crop_size=[64])
    assert seg.scale is None and seg.crop_size == [64, 64] and seg.eval.stride == [42, 42]
    with pytest.raises(ValueError, match="expected --model NAME"):
        segment_config(data=str(tmp_path))


def test_sigterm_stops_a_run_cleanly_and_it_resumes(tmp_path):
    import signal
    import subprocess
    import sys

    from test_fit import cli_signalled_after
    from test_train import _env

    from xcit.train import load_state

    run = tmp_path / "run"
    cli = [sys.executable, "-m", "xcit", "train", *TINY_DIGITS[:2], "--threads", "1", "--no-progress", "--no-plot"]
    argv = [*cli[3:], "--epochs", "3", "--ckpt-every", "2", "--output", str(run)]
    proc = subprocess.run(cli_signalled_after(signal.SIGTERM, 10, argv), env=_env(), capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err and "--resume" in err
    assert not list(run.glob(".*.tmp")) and not (run / "model.pth").exists()
    stopped_at = load_state(run / "last.pt")["step"]
    assert 10 <= stopped_at < 66
    resumed = subprocess.run([*cli, "--resume", str(run)], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "result.json").read_text())["steps"] == 66 > stopped_at


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import errno

    import xcit.train.checkpoint as checkpoint

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    run = tmp_path / "run"
    code = main(["train", *TINY_DIGITS, "--output", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "could not write the checkpoint" in err and "No space left" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(run.glob(".*.tmp")) and not (run / "last.pt").exists()  # no half-written file left
