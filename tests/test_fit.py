"""The one training loop's guarantees, each written once and tested over every task.

Every test here runs for the five training commands (``xcit train``, ``xcit dino``, ``xcit detect train``,
``xcit segment train`` and the linear probe ``xcit linear``) on real images (scikit-learn's digits, the stardist
nuclei image) with models small enough for seconds-long runs:

* a run killed with SIGKILL after a checkpoint and resumed ends bit-identical to an uninterrupted one;
* a non-finite loss stops the run with one line and exit status 1, leaving a loadable last checkpoint;
* a time budget stops the run and writes ``result.json``;
* ``result.json`` has the same fields for every task, and ``--lr`` means the same everywhere.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from xcit.cli import main
from xcit.train import load_state

REPO = Path(__file__).resolve().parents[1]
TINY_BACKBONE = ["--patch-size", "8", "--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
TASKS = ("train", "dino", "segment", "detect", "linear")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The nuclei image prepared for segmentation and for detection (3 training quadrants, 1 held out)."""
    from xcit import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("data")
    assert main(["segment", "prepare", "nuclei", "--output", str(root / "seg")]) == 0
    assert main(["detect", "prepare", "nuclei", "--output", str(root / "det")]) == 0
    torch.manual_seed(0)  # frozen features for the linear probe: a small XCiT for the 8x8 digits
    features = create_model("xcit_nano_12_p16", num_classes=0, in_chans=1, patch_size=2, embed_dim=32, depth=2,
                            num_heads=2)
    save_checkpoint(features, root / "features.pth", extra={"data": {"dataset": "digits", "img_size": 8,
                                                                     "in_chans": 1, "crop_pct": 1.0}})
    return {"segment": root / "seg", "detect": root / "det", "linear": root / "features.pth"}


def command(task: str, datasets: dict[str, Path], *, length: list[str] | None = None) -> list[str]:
    """A seconds-long run of ``task`` (its length replaceable), checkpointing every few steps."""
    common = ["--threads", "1", "--no-progress", "--no-plot", "--amp", "none"]
    if task == "train":
        return ["train", "--data", "digits", *(length or ["--epochs", "2"]), "--ckpt-every", "5", *common]
    if task == "dino":
        return ["dino", "--data", "digits", *(length or ["--epochs", "1"]), "--ckpt-every", "5", "--eval-every", "22",
                *common]
    if task == "linear":  # DINO's protocol: random crops through the frozen network at every step
        return ["linear", str(datasets["linear"]), *(length or ["--epochs", "2"]), "--batch-size", "64",
                "--ckpt-every", "5", *common]
    if task == "segment":  # two loader worker processes: their augmentation must resume too
        return ["segment", "train", "--data", str(datasets["segment"]), "--head", "fpn", *TINY_BACKBONE,
                "--channels", "16", "--fpn-channels", "16", "--crop-size", "64", "--scale", "none", "--eval-scale",
                "none", *(length or ["--iters", "10"]), "--eval-every", "4", "--ckpt-every", "3", "--workers", "2",
                "--warmup-iters", "2", *common]
    return ["detect", "train", "--data", str(datasets["detect"]), *TINY_BACKBONE, "--fpn-channels", "32",
            "--box-head-dim", "64", "--mask-head-channels", "16", "--rpn-batch-size", "32", "--roi-batch-size", "32",
            "--min-size", "96", "128", "160", "--test-size", "128", "--max-size", "256", "--crop-policy",
            *(length or ["--iters", "8"]), "--eval-every", "4", "--ckpt-every", "2", "--workers", "0",
            "--warmup-iters", "2", *common]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "xcit", *argv]


_SIGNALLED_AFTER = """
import os, signal, sys
import xcit.train.run as run
from xcit.cli import main

save, how, after, sent = run.save_state, signal.Signals[sys.argv[1]], int(sys.argv[2]), []

def save_or_signal(path, state):
    if path.name == "last.pt" and state["step"] > after and not sent:  # the work since the last checkpoint is lost
        sent.append(how)
        os.kill(os.getpid(), how)
    return save(path, state)

run.save_state = save_or_signal
sys.exit(main(sys.argv[3:]))
"""


def cli_signalled_after(how: signal.Signals, step: int, argv: list[str]) -> list[str]:
    """``xcit argv`` that sends itself ``how`` (once) as it is about to write a checkpoint past ``step``: a kill or a
    cancel between two checkpoints at a known place, with no race between the run and the test."""
    return [sys.executable, "-c", _SIGNALLED_AFTER, how.name, str(step), *argv]


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a state file by path (the random generator states and clocks left out)."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    out = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in ("rng", "elapsed", "path"):
                out.update(_tensors(item, f"{prefix}.{key}"))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            out.update(_tensors(item, f"{prefix}.{i}"))
    return out


@pytest.mark.parametrize("task", TASKS)
def test_a_run_killed_after_a_checkpoint_resumes_bit_identical(task, datasets, tmp_path):
    argv = command(task, datasets)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(_cli([*argv, "--output", str(whole)]), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    total = load_state(whole / "last.pt")["step"]

    after = total // 2
    proc = subprocess.run(cli_signalled_after(signal.SIGKILL, after, [*argv, "--output", str(killed)]), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed: {proc.stderr[-3000:]}"
    killed_at = load_state(killed / "last.pt")["step"]
    assert 0 < killed_at <= after < total and (killed / "run.lock").exists()  # a dead run's lock: stale, taken over

    resumed = subprocess.run(_cli([task] if task in ("train", "dino", "linear") else [task, "train"]) +
                             ["--resume", str(killed)],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at} of {total}" in (killed / "train.log").read_text()
    a, b = _tensors(torch.load(whole / "last.pt", weights_only=True)), _tensors(torch.load(killed / "last.pt",
                                                                                           weights_only=True))
    assert a.keys() == b.keys() and len(a) > 20
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after resuming at step {killed_at}: {differ[:5]}"
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (whole, killed))
    assert ra["metrics"] == rb["metrics"] and ra["steps"] == rb["steps"] == total
    assert not (killed / "run.lock").exists()


@pytest.mark.parametrize("task", TASKS)
def test_a_non_finite_loss_is_one_line_and_keeps_the_last_good_checkpoint(task, datasets, tmp_path, monkeypatch,
                                                                          capsys):
    from xcit.classify import Classification
    from xcit.detect import Detection
    from xcit.dino import Dino
    from xcit.dino.linear import LinearProbe
    from xcit.segment import Segmentation

    cls = {"train": Classification, "dino": Dino, "segment": Segmentation, "detect": Detection,
           "linear": LinearProbe}[task]
    original, calls = cls.loss, []

    def diverging(self, net, batch, values):
        loss, parts = original(self, net, batch, values)
        calls.append(1)
        return (loss * math.nan, parts) if len(calls) >= 5 else (loss, parts)

    monkeypatch.setattr(cls, "loss", diverging)
    run = tmp_path / "run"
    argv = [*command(task, datasets), "--workers", "0"]
    assert main([*argv, "--ckpt-every", "2", "--output", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "stopped: the training loss is nan" in err and "at step 5" in err and str(run / "last.pt") in err
    state = load_state(run / "last.pt")  # loadable: weights-only, digest checked
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in _tensors(state["model"]).values())
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "stopped: non-finite loss" and "nan" in result["error"] and result["steps"] == 4
    assert not (run / "run.lock").exists()


@pytest.mark.parametrize("task", TASKS)
def test_a_time_budget_stops_the_run_and_writes_the_result(task, datasets, tmp_path):
    long = {"train": ["--epochs", "500"], "dino": ["--epochs", "500"], "segment": ["--iters", "100000"],
            "detect": ["--iters", "100000"], "linear": ["--epochs", "5000"]}[task]
    run = tmp_path / "run"
    argv = [*command(task, datasets, length=long), "--time-budget-min", "0.05", "--eval-every", "0", "--ckpt-every", "0",
            "--output", str(run)]
    assert main(argv) == 0
    result = json.loads((run / "result.json").read_text())
    derived = yaml.safe_load((run / "config.yaml").read_text())["_derived"]
    assert result["status"] == "completed" and 15 <= result["steps"] == derived["total_steps"] < 2000
    assert load_state(run / "last.pt")["step"] == result["steps"] and (run / "result.json").is_file()


RESULT_FIELDS = {"status", "task", "command", "steps", "epochs", "train_loss", "primary", "metrics", "best",
                 "skipped_images", "stopped_by", "wall_time", "files"}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_writes_the_same_result_and_run_files(task, datasets, tmp_path):
    run = tmp_path / "run"
    assert main([*command(task, datasets), "--plot", "--output", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert set(result) == RESULT_FIELDS, set(result) ^ RESULT_FIELDS
    assert result["primary"] in result["metrics"] and result["best"]["metric"] == result["primary"]
    assert set(result["files"]) >= {"model", "last", "best", "log", "metrics", "config", "plot"}
    for name in ("last.pt", "best.pt", "train.log", "metrics.jsonl", "config.yaml", "result.json", "curves.png"):
        assert (run / name).is_file(), name
    assert (run / ("teacher.pth" if task == "dino" else "model.pth")).is_file()
    assert not (run / "run.lock").exists()
    kinds = {json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"step", "eval"} <= kinds
    derived = yaml.safe_load((run / "config.yaml").read_text())["_derived"]
    assert {"lr", "lr_from", "global_batch", "total_steps", "steps_per_epoch", "wd_rule"} <= set(derived)
    mode = (run / "last.pt").stat().st_mode & 0o777
    assert mode == (run / "result.json").stat().st_mode & 0o777  # state files follow the umask like the others


@pytest.mark.parametrize("task, base, size", [("train", 5e-4, 512), ("dino", 5e-4, 256), ("detect", 1e-4, 16),
                                              ("segment", 6e-5, 16)])
def test_lr_is_the_rate_applied_and_the_recipes_keep_their_official_rates(task, base, size, tmp_path):
    """REFERENCE: classification 5e-4 x global batch / 512; DINO 5e-4 per 256; detection 1e-4 and segmentation
    6e-5 at the official 8 GPUs x 2 images."""
    import importlib

    from xcit.train.options import resolve_lr

    package = importlib.import_module(f"xcit.{ {'train': 'classify'}.get(task, task) }")
    needs = {"train": {"data": "/imagenet"}, "dino": {"data": "/imagenet"},
             "detect": {"train_json": str(tmp_path / "t.json"), "model": "xcit_small_12_p16"},
             "segment": {"data": str(tmp_path), "model": "xcit_small_12_p16"}}[task]
    cfg = package.resolve_config(needs)
    assert (cfg.lr, cfg.lr_base, cfg.lr_base_size) == (None, base, size)
    official_batch = {"train": 1024, "dino": 1024, "detect": 16, "segment": 16}[task]
    assert resolve_lr(cfg, official_batch)[0] == pytest.approx(base * official_batch / size)
    given = package.resolve_config({**needs, "lr": 3e-4})
    assert resolve_lr(given, 12345) == (3e-4, "--lr as given")  # --lr: the rate applied, whatever the batch
    with pytest.raises(ValueError, match="lr_scaling.*is gone.*--lr-base"):
        package.resolve_config({**needs, "lr_scaling": False})


def test_presets_and_bundled_configs_keep_their_effective_rates():
    from xcit.classify import resolve_config as classify
    from xcit.dino import resolve_config as dino
    from xcit.train.options import load_config_file, resolve_lr

    assert resolve_lr(classify(data="fashion-mnist"), 64)[0] == pytest.approx(3e-3)  # 2.4e-2 per 512
    assert resolve_lr(classify(data="digits"), 64)[0] == pytest.approx(4e-3)
    assert resolve_lr(dino(data="fashion-mnist"), 64)[0] == pytest.approx(5e-4)  # 2e-3 per 256
    for name in ("nano_12_p16", "tiny_12_p16", "small_12_p16", "small_12_p8", "small_24_p16", "medium_24_p16"):
        cfg = classify(load_config_file(REPO / "configs" / f"imagenet_xcit_{name}.yaml"))
        assert resolve_lr(cfg, 8 * cfg.batch_size)[0] == pytest.approx(1e-3), name  # 8 GPUs: global 1024
    cfg = classify(load_config_file(REPO / "configs" / "imagenet_finetune_384.yaml"))
    assert 8 * cfg.batch_size == 512 and resolve_lr(cfg, 512)[0] == pytest.approx(5e-6) and cfg.min_lr == 5e-6


@pytest.mark.parametrize("task", TASKS)
def test_a_run_folder_in_use_is_refused(task, datasets, tmp_path, capsys):
    """A second process never trains into the folder of a run still training: not by --resume, not by --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / "run.lock").write_text(f"{holder.pid} {os.uname().nodename}\n")
        for extra in (["--resume", str(run)], ["--output", str(run), "--overwrite"]):
            assert main([*command(task, datasets), *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"in use by a run still training (process {holder.pid}" in err, err
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # nothing written, the lock left to its owner
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("task", TASKS)
def test_a_full_disk_at_the_first_checkpoint_is_one_line(task, datasets, tmp_path, monkeypatch, capsys):
    """torch's zip writer reports a full disk as a RuntimeError in the middle of the file."""
    import xcit.train.checkpoint as checkpoint

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1024")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    run = tmp_path / "run"
    assert main([*command(task, datasets), "--workers", "0", "--ckpt-every", "2", "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"could not write the checkpoint {run / 'last.pt'}" in err and "MiB free" in err
    assert not list(run.glob(".*.tmp")) and not (run / "last.pt").exists() and not (run / "run.lock").exists()
