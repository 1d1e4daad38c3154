"""xcit train (:mod:`xcit.classify`): a real (seconds-long) training on scikit-learn's digits, DDP, data, options.

The guarantees every task shares (exact resume, non-finite loss, time budget) are tested once for all four
tasks in tests/test_fit.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from xcit import create_model
from xcit.cli import main as cli_main
from xcit.models.weights import CheckpointError, save_checkpoint
from xcit.classify import evaluate, resolve_config, train
from xcit.train import load_state
from xcit.train.optim import WarmupCosine, build_param_groups

REPO = Path(__file__).resolve().parents[1]
# One thread per process: bit-exact comparisons between runs, and two processes fit two cores.
FAST = dict(data="digits", threads=1, progress=False, tensorboard=False)


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "xcit", "train", "--data", "digits", "--threads", "1", "--no-progress",
            "--no-tensorboard", *args]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple:
    """One 3-epoch training on digits, shared by the tests that inspect a finished run."""
    out = tmp_path_factory.mktemp("run") / "digits"
    return train(output=str(out), epochs=3, **FAST), out


def test_training_on_digits_lowers_the_loss_and_learns(digits_run):
    result, out = digits_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 3 and len(steps) >= 10
    assert sum(steps[-3:]) / 3 < 0.6 * sum(steps[:3]) / 3  # from ~2.3 (chance) to well below
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert result.metrics["top1"] > 75.0  # chance is 10%
    assert result.metrics["n"] == 364 and result.status == "completed"
    for name in ("model.pth", "last.pt", "best.pt", "metrics.jsonl", "train.log", "config.yaml", "curves.png", "result.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_file_holds_what_predict_needs(digits_run):
    result, out = digits_run
    raw = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    assert raw["classes"] == [str(i) for i in range(10)]
    assert raw["data"]["img_size"] == 8 and raw["data"]["in_chans"] == 1 and raw["data"]["crop_pct"] == 1.0
    assert len(raw["data"]["mean"]) == 1 and raw["data"]["dataset"] == "digits"
    assert raw["metrics"]["top1"] == pytest.approx(result.metrics["top1"])
    assert raw["weights"] in ("raw", "ema")
    model = create_model(checkpoint=out / "model.pth")  # architecture read back from the file
    assert model.patch_size == 2 and model.embed_dim == 32 and model.num_classes == 10
    state = load_state(out / "last.pt")
    assert state["epoch"] == 3 and state["step"] == result.steps
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"torch", "numpy", "python"}  # one per process
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"] == "digits" and saved["_derived"]["steps_per_epoch"] * 3 == result.steps


def test_eval_reproduces_the_run_metrics(digits_run, capsys):
    result, out = digits_run
    metrics = evaluate(out / "model.pth", "digits", "val", progress=False)
    assert metrics["top1"] == pytest.approx(result.metrics["top1"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(result.metrics["loss"], rel=1e-5)
    assert metrics["top5"] >= metrics["top1"]
    assert cli_main(["eval", str(out / "model.pth"), "--data", "digits", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(result.metrics["top1"])


def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    """gloo DDP with all-reduced BatchNorm statistics = one process at the global batch size.

    Tolerance: float32 sums taken in another order differ by ~1e-7; after 44 AdamW steps every
    weight agrees within 1e-5, except the key biases of class attention. Those have an exactly
    zero gradient (a key bias shifts every logit of the softmax equally), so Adam turns round-off
    into steps of up to lr each: they are only bounded by lr x steps.
    """
    common = ["--epochs", "2", "--lr", "2e-3"]
    train(output=str(tmp_path / "one"), epochs=2, lr=2e-3, batch_size=64, **FAST)  # one process, in this one
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "xcit", "train",
         "--data", "digits", "--threads", "1", "--no-progress", "--no-tensorboard", *common, "--batch-size", "32",
         "--output", str(tmp_path / "two")],
        env=_env(), capture_output=True, text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["_derived"]
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 64
    a, b = _weights(tmp_path / "one" / "model.pth"), _weights(tmp_path / "two" / "model.pth")
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        if k.startswith("cls_attn_blocks.") and k.endswith("attn.qkv.bias"):
            c = diff.numel() // 3
            assert diff[c:2 * c].max() <= 2e-3 * 44, k  # key bias: zero gradient, see above
            diff = torch.cat([diff[:c], diff[2 * c:]])
        assert diff.max() < 1e-5, (k, diff.max().item())
    ra = json.loads((tmp_path / "one" / "result.json").read_text())["metrics"]
    rb = json.loads((tmp_path / "two" / "result.json").read_text())["metrics"]
    assert rb["n"] == ra["n"] == 364  # every eval image counted once across the two ranks
    assert ra["top1"] == rb["top1"] and abs(ra["loss"] - rb["loss"]) < 1e-5
    assert ra["top1"] > 50  # both runs learned: the comparison is not between two untrained models


def test_folder_data_with_the_imagenet_recipe_skips_corrupt_images(tmp_path):
    from test_data import make_image_folder

    root = make_image_folder(tmp_path / "data", per_class=9, size=24,
                             corrupt=[("train", "cat", "bad.png"), ("val", "fox", "bad.jpg")])
    # The default (ImageNet) recipe at toy scale: RandAugment, random erasing, mixup/cutmix, label
    # smoothing, drop path, EMA, bf16 autocast on CPU (repeated augmentation has its own tests and
    # is off so that every epoch draws each of the 28 files exactly once: 7 batches of 4).
    result = train(data=str(root), output=str(tmp_path / "run"), model="xcit_nano_12_p16", patch_size=4, embed_dim=32,
                   depth=1, num_heads=2, img_size=16, epochs=2, batch_size=4, workers=0, drop_path=0.1,
                   ema_decay=0.9, amp="bf16", repeated_aug=1, **{k: v for k, v in FAST.items() if k != "data"})
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["preset"] == "imagenet" and cfg["mixup"] == 0.8 and cfg["auto_augment"] == "rand-m9-mstd0.5-inc1"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["skipped_images"] for r in epochs] == [1, 1]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "bad.png" in log and "skipped 1 unreadable image" in log
    assert result.metrics["n"] == 27 and result.metrics["skipped"] == 1  # the corrupt val image
    assert "ema_top1" in evals[-1] and math.isfinite(epochs[-1]["train_loss"])


@pytest.mark.parametrize("args, message", [
    (["--model", "xcit_huge_99_p16"], "unknown model"),
    (["--lr", "-0.001"], "expected lr > 0"),
    (["--data", "/nonexistent/imagenet"], "nor an existing folder"),
    (["--batch-size", "0"], "expected batch_size to be an integer >= 1"),
    (["--finetune", "BAD_FILE"], "not a readable PyTorch checkpoint"),
    (["--resume", "BAD_FILE"], "not a readable training checkpoint"),
    (["--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--epochs", "0"], "expected epochs > 0"),
])
def test_bad_values_fail_before_any_work(tmp_path, capsys, args, message):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    args = [str(bad) if a == "BAD_FILE" else a for a in args]
    out = tmp_path / "run"
    code = cli_main(["train", "--data", "digits", "--output", str(out), "--no-progress", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()


def test_finetune_new_classes_new_resolution_and_channels(tmp_path, digits_run):
    _, out = digits_run
    # An RGB "pretrained" model of the same shape, 5 classes: stem summed to 1 channel, new head.
    rgb = create_model("xcit_nano_12_p16", num_classes=5, in_chans=3, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                       tokens_norm=True)
    save_checkpoint(rgb, tmp_path / "rgb.pth")
    result = train(output=str(tmp_path / "ft"), epochs=1, finetune=str(tmp_path / "rgb.pth"), img_size=16,
                   layer_decay=0.7, **FAST)
    log = (tmp_path / "ft" / "train.log").read_text()
    assert "stem converted from 3 to 1 input channels" in log and "new 10-class head" in log
    tuned = create_model(checkpoint=result.model_path)
    assert tuned.num_classes == 10 and torch.load(result.model_path, weights_only=True)["data"]["img_size"] == 16
    # A checkpoint of another width is refused with the keys that do not fit.
    with pytest.raises(CheckpointError, match="mismatched"):
        train(output=str(tmp_path / "ft2"), epochs=1, finetune=str(out / "model.pth"), embed_dim=64, **FAST)


def test_distillation_from_a_teacher_checkpoint(tmp_path, digits_run):
    _, out = digits_run
    for kind in ("hard", "soft"):
        result = train(output=str(tmp_path / kind), epochs=1, teacher=str(out / "model.pth"), distillation=kind, **FAST)
        assert math.isfinite(result.metrics["loss"])
    from xcit.classify.losses import DistillationLoss, LabelCrossEntropy

    teacher = torch.nn.Identity()
    logits = torch.randn(4, 10)
    soft = DistillationLoss(LabelCrossEntropy(), teacher, "soft", alpha=1.0)
    assert soft(logits, logits, torch.zeros(4, dtype=torch.long)).item() == pytest.approx(0.0, abs=1e-6)
    hard = DistillationLoss(LabelCrossEntropy(), teacher, "hard", alpha=1.0)
    assert hard(logits, logits, torch.zeros(4, dtype=torch.long)) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, logits.argmax(1)).item())


def test_schedule_is_stepped_per_iteration_with_warmup():
    s = WarmupCosine(base_lr=1e-3, total_steps=100, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [s.lr(i) for i in range(101)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] > lrs[0]  # no repeated first value (official off-by-one)
    assert lrs[10] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert lrs[100] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=1e-6)


def test_layer_decay_and_weight_decay_groups():
    model = create_model("xcit_nano_12_p16", num_classes=10, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    groups = build_param_groups(model, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0
    assert scale[id(named["blocks.2.attn.qkv.weight"])] == 0.5
    assert scale[id(named["blocks.0.attn.qkv.weight"])] == 0.125
    assert scale[id(named["patch_embed.proj.0.0.weight"])] == 0.0625
    assert decay[id(named["blocks.0.attn.temperature"])] == 0.05  # decayed, as the official code
    assert decay[id(named["blocks.0.attn.qkv.bias"])] == 0.0 and decay[id(named["head.weight"])] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)
    exempt = build_param_groups(model, 0.05, exempt_per_channel=True)
    assert any(p is named["blocks.0.attn.temperature"] for p in exempt[1]["params"])
    assert [g["decayed"] for g in exempt] == [True, False]


def test_config_precedence_yaml_and_cli(tmp_path, capsys):
    assert resolve_config().preset == "fashion-mnist" and resolve_config().patch_size == 8
    assert resolve_config(data="digits").epochs == 3
    imagenet = resolve_config(data=str(tmp_path))  # a folder: the paper's recipe
    assert (imagenet.lr_base, imagenet.weight_decay, imagenet.mixup, imagenet.cutmix, imagenet.reprob) == (5e-4, 0.05, 0.8, 1.0, 0.25)
    assert imagenet.auto_augment == "rand-m9-mstd0.5-inc1" and imagenet.repeated_aug == 3 and imagenet.ema_decay == 0.99996
    with pytest.raises(ValueError, match="unknown training option"):
        resolve_config(learning_rate=1.0)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: digits\nepochs: 7\nlr: 0.001\nema: true\n")
    assert cli_main(["train", "--config", str(cfg_file), "--lr", "0.002", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 7 and printed["lr"] == 0.002 and printed["ema"] is True and printed["preset"] == "digits"


@pytest.mark.parametrize("values, expected", [
    ({"batch_size": "2"}, ("batch_size", 2)),  # a string from an environment or a form: coerced as the command line does
    ({"batch_size": 2.0}, ("batch_size", 2)),
    ({"epochs": 2}, ("epochs", 2.0)),
    ({"lr": "1e-3"}, ("lr", 1e-3)),
    ({"lr": 1}, ("lr", 1.0)),
    ({"mean": 0.5, "std": [0.25]}, ("mean", [0.5])),  # one value for a list option, as `--mean 0.5`
    ({"output": Path("runs/x")}, ("output", "runs/x")),
])
def test_python_config_values_are_coerced_like_the_command_line(values, expected):
    cfg = resolve_config({"data": "digits", **values})
    name, value = expected
    assert getattr(cfg, name) == value and type(getattr(cfg, name)) is type(value)


@pytest.mark.parametrize("values, message", [
    ({"batch_size": 2.5}, r"batch_size: expected an integer, got 2\.5"),  # never silently 2
    ({"epochs": True}, "epochs: expected a number, got True"),
    ({"lr": "abc"}, "lr: expected a number, got 'abc'"),
    ({"ema": "yes"}, "ema: expected true or false, got 'yes'"),
    ({"mean": ["a"]}, "mean: expected a number"),
    ({"model": ["xcit_nano_12_p16"]}, "model: expected a single value"),
])
def test_python_config_values_of_the_wrong_type_name_the_option(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config({"data": "digits", **values})


def test_dino_config_values_are_coerced_too():
    from xcit.dino import resolve_config as dino_config

    assert dino_config({"data": "digits", "epochs": "3", "out_dim": 64.0}).out_dim == 64
    with pytest.raises(ValueError, match="batch_size: expected an integer, got 2.5"):
        dino_config(data="digits", batch_size=2.5)
    with pytest.raises(ValueError, match="lr: expected a number, got 'abc'"):
        dino_config(data="digits", lr="abc")


def test_bundled_yaml_presets_are_valid(capsys):
    files = [f for pattern in ("fashion_mnist.yaml", "digits.yaml", "imagenet_*.yaml", "transfer_*.yaml")
             for f in sorted((REPO / "configs").glob(pattern))]
    assert files
    for f in files:
        assert cli_main(["train", "--config", str(f), "--print-config"]) == 0, f
        capsys.readouterr()


def test_metrics_file_is_strict_json_and_reads_back_non_finite_values(tmp_path):
    import json
    import math

    from xcit.train.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.write("step", 1, loss=float("nan"), entropy=float("inf"), lr=torch.tensor(0.5))
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # how files written before nulls held them
        f.write('{"kind": "step", "step": 2, "loss": "nan", "entropy": "-inf", "lr": 0.25}\n')

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0], parse_constant=no_constants)["loss"] is None
    first, second = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(first["loss"]) and math.isnan(first["entropy"]) and first["lr"] == 0.5
    assert math.isnan(second["loss"]) and second["entropy"] == -math.inf and second["lr"] == 0.25


def test_poly_schedule_warms_up_and_decays():
    from xcit.train.optim import PolySchedule

    s = PolySchedule(base_lr=1.0, total_steps=100, warmup_steps=10, warmup_ratio=0.1, power=1.0, min_lr=0.0)
    assert s.lr(0) == pytest.approx(0.1)  # warm-up starts at warmup_ratio of the scheduled rate
    assert s.lr(10) == pytest.approx(0.9) and s.lr(50) == pytest.approx(0.5) and s.lr(100) == pytest.approx(0.0)
    squared = PolySchedule(1.0, 100, power=2.0, min_lr=0.1)
    assert squared.lr(50) == pytest.approx(0.9 * 0.25 + 0.1)


TOY = dict(model="xcit_nano_12_p16", patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16, epochs=1,
           workers=0, auto_augment="none", reprob=0.0, repeated_aug=1, ema=False, amp="none", threads=1,
           progress=False, plot=False)


def test_training_data_with_a_single_class_is_refused(tmp_path):
    from test_data import make_image_folder

    from xcit.data import DataError

    root = make_image_folder(tmp_path / "data", classes=("cat",), per_class=4, size=16)
    with pytest.raises(DataError, match=r"expected at least 2 classes to learn.*got 1: cat"):
        train(data=str(root), output=str(tmp_path / "run"), batch_size=2, **TOY)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_an_empty_image_with_mixup_at_batch_two_skips_the_step_not_the_run(tmp_path):
    """Mixup pairs images: a batch of 2 with one unreadable image leaves none to mix, so that step is skipped."""
    from test_data import make_image_folder

    root = make_image_folder(tmp_path / "data", per_class=2, size=16)
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    result = train(data=str(root), output=str(tmp_path / "run"), batch_size=2, mixup=0.8, cutmix=1.0, **TOY)
    assert result.status == "completed" and result.steps == 3  # 7 images: 3 batches of 2
    assert json.loads((tmp_path / "run" / "result.json").read_text())["skipped_images"]["train"] == 1
    assert "empty.png" in (tmp_path / "run" / "train.log").read_text()
