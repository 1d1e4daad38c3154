"""DINO pretraining, k-NN and linear evaluation: tiny models on scikit-learn's 8x8 digits."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from xcit import create_model
from xcit.dino import (
    BatchMultiCrop,
    DINOHead,
    DINOLoss,
    MultiCropSpec,
    build_networks,
    build_schedules,
    knn_classify,
    koleo_loss,
    pretrain,
    resolve_config,
    update_teacher,
)
from xcit.models.weights import read_state_dict

torch.set_num_threads(1)

# A DINO run small enough for a test: 8x8 digits, a 2-block XCiT with 2x2 patches, 1 local crop.
TINY = dict(data="digits", local_crops=1, batch_size=256, out_dim=64, hidden_dim=32, bottleneck_dim=16, threads=1,
            progress=False, plot=False, log_every=1)


def _tiny_cfg(**kw):
    return resolve_config({**TINY, **kw})


def test_head_shapes_norms_and_frozen_norm():
    head = DINOHead(24, out_dim=50, hidden_dim=16, bottleneck_dim=8)
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 50)
    v = head.last_layer.parametrizations.weight.original1
    # with norm_last_layer, each output's weight vector has norm exactly 1: |logit| <= |L2-normalised x| = 1
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(50), atol=1e-5)
    assert out.abs().max() <= 1 + 1e-5
    assert not head.last_layer.parametrizations.weight.original0.requires_grad and v.requires_grad
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    default = DINOHead(128)
    assert default.mlp[0].out_features == 2048 and default.mlp[-1].out_features == 256
    assert default.last_layer.out_features == 65536


def test_head_scores_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = DINOHead(24, out_dim=300, hidden_dim=32, bottleneck_dim=16)
    x = torch.randn(64, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(x)
    exact = head(x)
    assert mixed.dtype == torch.float32
    # only the MLP runs in bf16: the scores differ by its rounding, far below bf16's own step near 1
    # (2^-8 ~ 0.004, i.e. 0.1 in logits at the teacher temperature 0.04)
    err = float((mixed - exact).detach().abs().max())
    assert err < 0.02, err
    off_bf16_grid = (mixed != mixed.to(torch.bfloat16).float()).float().mean()
    assert off_bf16_grid > 0.9  # the scores carry float32 precision


def test_multicrop_shapes_and_photometric_ops():
    spec = MultiCropSpec(global_size=28, local_crops=3, local_size=12, blur_sigma=(0.1, 0.5))
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    crops = BatchMultiCrop(spec, (0.5,), (0.5,))(images)
    assert [tuple(c.shape) for c in crops] == [(6, 1, 28, 28)] * 2 + [(6, 1, 12, 12)] * 3
    assert all(c.min() >= -1 - 1e-5 and c.max() <= 1 + 1e-5 for c in crops)  # [0, 1] normalised by 0.5 / 0.5
    # full-image crop without flips or photometric changes reproduces the image
    ident = MultiCropSpec(global_size=28, global_scale=(1.0, 1.0), local_crops=0, hflip=0.0, jitter_prob=0.0,
                          blur_prob=(0.0, 0.0, 0.0), solarize_prob=0.0)
    out = BatchMultiCrop(ident, (0.0,), (1.0,))(images)
    assert torch.allclose(out[0] * 255, images.float(), atol=1e-3)
    from xcit.dino.augment import gaussian_blur, solarize

    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(solarize(x, 1.0), torch.where(x >= 0.5, 1 - x, x))
    blurred = gaussian_blur(x, 1.0, (1.0, 1.0))
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.02) and blurred.std() < x.std()


def test_loss_decreases_in_a_few_steps():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    student, teacher = build_networks(cfg, 1)
    loss_fn = DINOLoss(cfg.out_dim, 3, cfg.student_temp, cfg.center_momentum)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    crops = [torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8), torch.randn(16, 1, 4, 4)]
    losses = []
    for _ in range(12):
        with torch.no_grad():
            t_out = teacher(crops[:2])
        loss = loss_fn(student(crops), t_out, 0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_teacher(student, teacher, 0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_koleo_spreads_the_features_and_is_wired_into_the_step():
    torch.manual_seed(0)
    spread = torch.eye(8)  # orthonormal rows: nearest neighbour at distance sqrt(2)
    assert torch.allclose(koleo_loss(spread), torch.tensor(-0.5 * math.log(2.0)), atol=1e-5)
    clustered = torch.eye(8) * 0.05 + torch.ones(8, 8)  # all rows close to one direction
    assert koleo_loss(clustered) > koleo_loss(spread) + 1.0
    x = clustered.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.05)
    first = koleo_loss(x).item()
    for _ in range(20):
        opt.zero_grad()
        koleo_loss(x).backward()
        opt.step()
    assert koleo_loss(x).item() < first - 0.5
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))
    # the student returns its backbone features with its head outputs, one row per crop image
    cfg = _tiny_cfg(koleo_weight=0.1)
    student, _ = build_networks(cfg, 1)
    crops = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.randn(4, 1, 4, 4)]
    out, features = student(crops, return_features=True)
    assert out.shape == (12, cfg.out_dim) and features.shape == (12, student.backbone.embed_dim)
    assert torch.allclose(student.head(features), out)


def test_teacher_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    student, teacher = build_networks(_tiny_cfg(), 1)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    crops = [torch.randn(8, 1, 8, 8)] * 2
    loss = DINOLoss(64, 2)(student(crops), teacher(crops), 0.04)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    update_teacher(student, teacher, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * s, atol=1e-6)
    assert any(not torch.equal(old, new) for old, new in zip(before, teacher.parameters()))


def test_centring_follows_its_momentum():
    loss_fn = DINOLoss(4, 2, center_momentum=0.9)
    t1, t2 = torch.randn(6, 4), torch.randn(6, 4)
    s = torch.randn(6, 4)
    loss_fn(s, t1, 0.04)
    assert torch.allclose(loss_fn.center, 0.1 * t1.mean(0, keepdim=True), atol=1e-6)
    loss_fn(s, t2, 0.04)
    assert torch.allclose(loss_fn.center, 0.09 * t1.mean(0, keepdim=True) + 0.1 * t2.mean(0, keepdim=True), atol=1e-6)
    # the loss is the cross-entropy from the centred teacher: with identical logits and centre c it is
    # H(softmax((t - c) / T_t), softmax(s / T_s)), averaged over the 2 cross pairs
    fresh = DINOLoss(4, 2)
    t = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    q = torch.softmax(t / 0.05, -1)
    expected = -(q.flip(0) * torch.log_softmax(t / 0.1, -1)).sum(-1).mean()
    assert torch.allclose(fresh(t, t, 0.05), expected, atol=1e-5)


def test_schedules_follow_the_recipe():
    cfg = resolve_config(preset="imagenet", epochs=100)
    spe, total = 10, 1000
    sched = build_schedules(cfg, 1e-3, spe, total)
    assert sched.teacher_temp(0) == pytest.approx(0.04)
    assert sched.teacher_temp(159) == pytest.approx(0.04 + 0.03 * 15 / 29)  # epoch 15 of the 30-epoch warm-up
    assert sched.teacher_temp(300) == sched.teacher_temp(999) == pytest.approx(0.07)
    assert sched.momentum.lr(0) == pytest.approx(0.996) and sched.momentum.lr(total) == pytest.approx(1.0, abs=1e-7)
    assert sched.momentum.lr(500) == pytest.approx(0.998)
    assert sched.weight_decay.lr(0) == pytest.approx(0.04)
    assert sched.weight_decay.lr(total) == pytest.approx(0.4, abs=1e-6)
    assert sched.lr.lr(0) == 0 and sched.lr.lr(99) == pytest.approx(1e-3) and sched.lr.lr(100) == pytest.approx(1e-3)
    assert sched.lr.lr(total) == pytest.approx(cfg.min_lr, abs=1e-8)
    assert sched.freeze_steps == spe
    values = [sched.lr.lr(s) for s in range(100, total)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    # a run without a time budget keeps its warm-ups whatever its length; a budgeted one caps them
    assert build_schedules(cfg, 1e-3, spe, 400).lr.warmup_steps == 100
    short = build_schedules(resolve_config(preset="imagenet", epochs=100, time_budget_min=5), 1e-3, spe, 40)
    assert short.lr.warmup_steps == 4 and short.temp_warmup_steps == 20


def test_pretrain_writes_a_teacher_checkpoint(tmp_path):
    full = pretrain(_tiny_cfg(epochs=2, output=str(tmp_path / "full")))
    assert full.steps == 2 * (1433 // 256)
    teacher = create_model(checkpoint=full.model_path)
    assert teacher.num_classes == 0 and teacher.patch_size == 2 and teacher.depth == 2
    assert teacher(torch.randn(2, 1, 8, 8)).shape == (2, 32)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, full.steps + 1))
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "step")
    # the training state holds student and teacher: weights.py takes the teacher's backbone
    state = read_state_dict(tmp_path / "full" / "last.pt")
    assert torch.equal(state["blocks.0.attn.qkv.weight"], teacher.blocks[0].attn.qkv.weight)
    # exact resume is tested for every task in tests/test_fit.py


def test_pretrain_with_koleo_logs_it_and_spreads_the_features(tmp_path):
    run = pretrain(_tiny_cfg(epochs=2, koleo_weight=0.5, output=str(tmp_path / "koleo")))
    records = [json.loads(line) for line in (tmp_path / "koleo" / "metrics.jsonl").read_text().splitlines()]
    koleo = [r["loss_koleo"] for r in records if r["kind"] == "step"]
    assert len(koleo) == run.steps and all(math.isfinite(k) for k in koleo)
    assert sum(koleo[-3:]) < sum(koleo[:3])  # the regulariser is minimised


def test_knn_on_separable_features_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 5
    train_y, test_y = torch.arange(500) % 5, torch.arange(100) % 5
    train_f = centres[train_y] + torch.randn(500, 16, generator=g) * 0.3
    test_f = centres[test_y] + torch.randn(100, 16, generator=g) * 0.3
    result = knn_classify(train_f, train_y, test_f, test_y, num_classes=5)
    assert result["top1"] == 100.0 and result["top5"] == 100.0 and result["n"] == 100
    # weighted votes: one exact neighbour with k=1 gives its label
    assert knn_classify(train_f, train_y, train_f[:7], train_y[:7], k=1)["top1"] == 100.0


def test_knn_and_linear_commands(tmp_path, capsys):
    from xcit.cli import main

    run = pretrain(_tiny_cfg(epochs=1, output=str(tmp_path / "run")))
    capsys.readouterr()
    assert main(["knn", str(run.model_path), "--json"]) == 0  # no --data: the dataset teacher.pth records
    knn = json.loads(capsys.readouterr().out)
    assert knn["data"] == "digits" and knn["n"] == 364 and 10 < knn["top1"] <= 100 and knn["top5"] >= knn["top1"]
    assert main(["knn", "--pixels", "--data", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 90  # 8x8 digits are easy for raw pixels
    for protocol in ("dino", "precomputed"):  # a training run: its model.pth is the probe as an XCiT classifier
        out = tmp_path / f"probe-{protocol}"
        assert main(["linear", str(run.model_path), "--protocol", protocol, "--epochs", "5", "--threads", "1",
                     "--no-progress", "--json", "--output", str(out)]) == 0
        probe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert probe["task"] == "linear" and probe["metrics"]["n"] == 364 and probe["primary"] == "top1"
        assert main(["eval", str(out / "model.pth"), "--json"]) == 0  # the data the probe records: digits
        # the saved classifier (the standardisation folded into its head) reproduces the probe's accuracy
        assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(probe["metrics"]["top1"], abs=0.3)
    assert main(["linear", "--pixels", "--data", "digits", "--protocol", "precomputed", "--epochs", "20",
                 "--threads", "1", "--no-progress", "--json", "--output", str(tmp_path / "pixels")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]["top1"] > 80  # raw 8x8 pixels


@pytest.mark.parametrize("options, message", [
    (dict(local_crops=-1), "local_crops"),
    (dict(global_scale=[0.8, 0.2]), "global_scale"),
    (dict(out_dim=0), "out_dim"),
    (dict(blur_prob=[0.5, 2.0, 0.1]), "blur_prob"),
    (dict(center_momentum=1.0), "center_momentum"),
    (dict(koleo_weight=-0.1), "koleo_weight"),
    (dict(time_budget_min=-3), "time_budget_min"),
    (dict(model="xcit_huge"), "unknown model"),
    (dict(lr_typo=1.0), "unknown DINO option"),
    (dict(preset="cifar"), "unknown preset"),
])
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        resolve_config({**TINY, **options})


def test_bad_evaluation_requests_fail_clearly(tmp_path, capsys):
    from xcit.cli import main

    assert main(["knn", "--data", "digits"]) == 2
    assert "expected a checkpoint" in capsys.readouterr().err
    assert main(["knn", "some.pth", "--pixels", "--data", "digits"]) == 2
    assert "not both" in capsys.readouterr().err
    # without --data: the checkpoint's recorded dataset, else a one-line error (never a default dataset)
    from xcit import create_model, save_checkpoint

    bare = save_checkpoint(create_model("xcit_nano_12_p16", num_classes=0, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                           tmp_path / "bare.pth")
    for command in (["knn", str(bare)], ["linear", str(bare)], ["knn", "--pixels"], ["linear", "--pixels"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "expected --data" in err and len(err.strip().splitlines()) == 1, err
    assert "bare.pth does not record the dataset" in (main(["knn", str(bare)]), capsys.readouterr().err)[1]
    with pytest.raises(ValueError, match="k >= 1"):
        knn_classify(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), k=0)


def test_folder_pipeline_makes_the_same_crops(tmp_path):
    from PIL import Image

    from xcit.dino import PILMultiCrop

    spec = MultiCropSpec(global_size=32, local_crops=2, local_size=16)
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy())
    crops = PILMultiCrop(spec, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(c.dtype == torch.float32 and c.abs().max() <= 2 + 1e-5 for c in crops)


def test_fashion_mnist_config_file_is_the_preset():
    import pathlib

    import yaml

    path = pathlib.Path(__file__).parents[1] / "configs" / "dino" / "fashion_mnist.yaml"
    from_file = resolve_config(yaml.safe_load(path.read_text()))
    assert from_file == resolve_config(preset="fashion-mnist")
    assert from_file.teacher_temp == from_file.warmup_teacher_temp == 0.04 and from_file.freeze_last_layer == 0
    assert from_file.koleo_weight == 0.1


def test_knn_compare_script_statistics_and_run(monkeypatch, capsys):
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).parents[1] / "scripts" / "knn_compare.py"
    spec = importlib.util.spec_from_file_location("knn_compare", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.mcnemar_p(0, 0) == 1.0 and script.mcnemar_p(7, 7) == 1.0
    assert script.mcnemar_p(0, 10) == pytest.approx(2 / 1024)
    assert script.mcnemar_p(30, 10) == pytest.approx(script.mcnemar_p(10, 30)) and script.mcnemar_p(30, 10) < 0.01
    torch.manual_seed(0)
    assert script.effective_rank(torch.randn(4000, 8)) == pytest.approx(8, rel=0.05)
    assert script.effective_rank(torch.randn(500, 1) * torch.randn(1, 8)) == pytest.approx(1, abs=0.01)
    monkeypatch.setattr(sys, "argv", ["knn_compare.py", "pixels", "pixels", "--data", "digits"])
    script.main()
    out = capsys.readouterr().out
    assert "pixels - pixels: +0.00 points" in out and "McNemar p = 1" in out
