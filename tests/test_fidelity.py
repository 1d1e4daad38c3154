"""The paper presets against the official code: docs/fidelity.md's table, the DINO and ImageNet
schedules against the official formulas, DINO's per-parameter clipping, the Semantic FPN neck
width, the linear-probe defaults and the detection conventions."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from xcit.dino import config as dino_config
from xcit.dino.schedules import build_schedules
from xcit.classify import config as train_config
from xcit.train.optim import EpochCosine, build_param_groups, clip_grad_per_param_

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the table of docs/fidelity.md


def _table() -> list[tuple[str, str, object]]:
    rows = []
    for line in (REPO / "docs" / "fidelity.md").read_text().splitlines():
        m = re.match(r"\| (train|dino|detect|segment) \| `(\w+)` \| `([^`]*)` \|", line)
        if m:
            rows.append((m.group(1), m.group(2), yaml.safe_load(m.group(3))))
    return rows


def _resolved() -> dict[str, object]:
    from xcit.detect.config import DetectConfig
    from xcit.segment.config import SegmentConfig

    return {"train": train_config.resolve_config(preset="imagenet"),
            "dino": dino_config.resolve_config(preset="imagenet"), "detect": DetectConfig(), "segment": SegmentConfig()}


def _yaml_files() -> dict[str, list[Path]]:
    configs = REPO / "configs"
    return {"train": sorted(configs.glob("imagenet_xcit_*.yaml")),
            "dino": sorted((configs / "dino").glob("imagenet_*.yaml")),
            "detect": [configs / "detect" / "coco_mask_rcnn.yaml"],
            "segment": [configs / "segment" / "ade20k_fpn.yaml"]}  # (UperNet: 160k iterations)


def test_every_paper_preset_resolves_to_the_official_defaults():
    rows = _table()
    assert {p for p, _, _ in rows} == {"train", "dino", "detect", "segment"} and len(rows) > 60
    resolved = _resolved()
    wrong = [(p, k, getattr(resolved[p], k), v) for p, k, v in rows if getattr(resolved[p], k) != v]
    assert not wrong, wrong
    # the bundled paper configs set none of these options to anything else
    for preset, files in _yaml_files().items():
        official = {k: v for p, k, v in rows if p == preset}
        for path in files:
            given = {k.replace("-", "_"): v for k, v in yaml.safe_load(path.read_text()).items()}
            changed = {k: v for k, v in given.items() if k in official and v != official[k]}
            assert not changed, (path, changed)


def test_small_data_presets_state_their_kept_choices():
    fm = train_config.resolve_config(preset="fashion-mnist")
    assert fm.sched_step == "step" and fm.wd_exempt_per_channel and not fm.ema
    dino_fm = dino_config.resolve_config(preset="fashion-mnist")
    assert dino_fm.clip_grad_mode == "global" and dino_fm.wd_exempt_per_channel
    for name in ("nuclei_fpn", "trees_fpn"):
        cfg = yaml.safe_load((REPO / "configs" / "segment" / f"{name}.yaml").read_text())
        assert cfg["fpn-channels"] == 256 and cfg["wd-rule"] == "bias-norm"
    for name in ("nuclei", "trees"):
        cfg = yaml.safe_load((REPO / "configs" / "detect" / f"{name}.yaml").read_text())
        assert (cfg["roi-align"], cfg["box-loss"], cfg["crop-policy"]) == ("torchvision", "smooth_l1", False)


# ------------------------------------------------------------------ schedules


def _dino_cosine(base, final, epochs, niter, warmup_epochs=0, start=0.0):
    """DINO's utils.cosine_scheduler, as written there."""
    warmup = np.array([])
    warmup_iters = warmup_epochs * niter
    if warmup_epochs > 0:
        warmup = np.linspace(start, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


@pytest.mark.parametrize("epochs, niter", [(100, 10), (30, 5)])  # a long run and a short one
def test_dino_schedules_equal_the_official_formulas(epochs, niter):
    cfg = dino_config.resolve_config(preset="imagenet", epochs=epochs)
    total = epochs * niter
    s = build_schedules(cfg, 1e-3, niter, total)
    lr = _dino_cosine(1e-3, cfg.min_lr, epochs, niter, int(cfg.warmup_epochs))
    wd = _dino_cosine(cfg.weight_decay, cfg.weight_decay_end, epochs, niter)
    mom = _dino_cosine(cfg.momentum_teacher, 1, epochs, niter)
    w = int(cfg.warmup_teacher_temp_epochs)
    temp = np.concatenate((np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, w),
                           np.ones(max(epochs - w, 0)) * cfg.teacher_temp))
    for step in range(total):
        v = s.at(step)
        assert v["lr"] == pytest.approx(lr[step], rel=1e-12, abs=1e-15)
        assert v["wd"] == pytest.approx(wd[step], rel=1e-12)
        assert v["momentum"] == pytest.approx(mom[step], rel=1e-12)
        assert v["teacher_temp"] == pytest.approx(temp[step // niter], rel=1e-12)
    # the 30-epoch run warms up for the full 10 epochs: no cap without a time budget
    assert s.lr.warmup_steps == 10 * niter and s.freeze_steps == niter


def test_training_schedule_equals_timm_stepped_once_per_epoch():
    from timm.scheduler import CosineLRScheduler

    epochs, spe, base = 40, 3, 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    # main.py: create_scheduler(args) -> CosineLRScheduler(t_initial=epochs, ...), step(epoch) after each epoch
    timm = CosineLRScheduler(opt, t_initial=epochs, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5, cycle_limit=1,
                             t_in_epochs=True)
    ours = EpochCosine(base, epochs, spe, 5, 1e-6, 1e-5)
    for epoch in range(epochs):
        for it in range(spe):
            assert ours.lr(epoch * spe + it) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        timm.step(epoch)
    assert ours.lr(0) == ours.lr(spe) == pytest.approx(1e-6)  # the official first two epochs


# ------------------------------------------------------------------ DINO optimisation


def test_per_parameter_clipping_matches_a_hand_computation():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0, 0.0])  # norms 5 and 1
    clip_grad_per_param_([a, b], 3.0)
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) * 3.0 / (5.0 + 1e-6))  # DINO: clip / (norm + 1e-6)
    assert torch.equal(b.grad, torch.tensor([1.0, 0.0, 0.0]))  # under the threshold: untouched
    # the global norm (sqrt 26) would have scaled both
    c, d = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    c.grad, d.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0, 0.0])
    torch.nn.utils.clip_grad_norm_([c, d], 3.0)
    assert d.grad[0] < 1.0 and not torch.allclose(c.grad, a.grad)


def test_dino_groups_decay_temperature_and_cls_token():
    from xcit.dino.train import build_networks

    cfg = dino_config.resolve_config(preset="digits")
    student, _ = build_networks(cfg, 1)
    named = dict(student.named_parameters())
    groups = build_param_groups(student, 0.04, exempt_per_channel=cfg.wd_exempt_per_channel,
                                read_no_weight_decay=cfg.wd_exempt_per_channel)
    decayed = {id(p) for g in groups if g["decayed"] for p in g["params"]}
    assert id(named["backbone.blocks.0.attn.temperature"]) in decayed and id(named["backbone.cls_token"]) in decayed
    assert id(named["backbone.blocks.0.attn.qkv.bias"]) not in decayed
    assert id(named["backbone.norm.weight"]) not in decayed


def test_weight_decay_schedule_from_zero_is_applied(tmp_path):
    from xcit.dino import pretrain
    from xcit.train.checkpoint import load_state

    cfg = dino_config.resolve_config(data="digits", local_crops=1, batch_size=256, out_dim=64, hidden_dim=32,
                                     bottleneck_dim=16, threads=1, progress=False, plot=False, epochs=1,
                                     weight_decay=0.0, weight_decay_end=0.4, output=str(tmp_path / "run"))
    run = pretrain(cfg)
    groups = load_state(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]
    last = build_schedules(cfg, 1e-3, run.steps, run.steps).weight_decay.lr(run.steps - 1)
    assert last > 0.3  # the cosine from 0 to 0.4, near its end
    assert [g["decayed"] for g in groups] == [True, False]
    assert groups[0]["weight_decay"] == pytest.approx(last) and groups[1]["weight_decay"] == 0.0


# ------------------------------------------------------------------ dense tasks


@pytest.mark.parametrize("backbone, width", [("xcit_tiny_12_p16", 192), ("xcit_small_12_p16", 384),
                                             ("xcit_medium_24_p8", 512)])
def test_semantic_fpn_neck_is_as_wide_as_the_backbone(backbone, width):
    from xcit.segment.model import build_segmenter

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_segmenter(150, backbone, head="fpn")
        narrow = build_segmenter(150, backbone, head="fpn", fpn_channels=256)
    neck = model.decode_head.neck
    assert neck.out_channels == width and all(c.in_channels == width for c in neck.lateral)
    assert model.head_config["fpn_channels"] == width
    assert narrow.decode_head.neck.out_channels == 256


def test_mmcv_weight_decay_rule_exempts_only_norm_names():
    from xcit.models import XCiTPyramid
    from xcit.train.optim import param_groups_by_rule

    model = XCiTPyramid(patch_size=16, embed_dim=32, depth=4, num_heads=2, out_indices=[0, 1, 2, 3])
    decay, keep = param_groups_by_rule(model, "mmcv", 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in keep["params"]) and keep["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"blocks.0.attn.temperature", "blocks.0.attn.qkv.bias", "patch_embed.proj.0.1.weight",
            "blocks.0.local_mp.bn.weight", "blocks.0.gamma1"} <= decayed


def test_aligned_roi_align_and_l1_rpn_loss():
    from torchvision.ops import roi_align

    from xcit.detect.recipe import L1RegionProposalNetwork, MMDetRoIAlign, roi_poolers

    feats = {str(i): torch.randn(1, 4, 64 // 2 ** i, 64 // 2 ** i) for i in range(4)}
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0], [0.0, 0.0, 250.0, 250.0]])]
    pool = MMDetRoIAlign(7)
    out = pool(feats, boxes, [(256, 256)])
    # small box -> level 0 (stride 4), large box -> level 2 (stride 16): sqrt(area) / 56 = 0.6 and 4.5
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    assert torch.allclose(out[0], roi_align(feats["0"], rois[:1], 7, 1 / 4, 0, aligned=True)[0], atol=1e-6)
    assert torch.allclose(out[1], roi_align(feats["2"], rois[1:], 7, 1 / 16, 0, aligned=True)[0], atol=1e-6)
    assert isinstance(roi_poolers("mmdet")["box_roi_pool"], MMDetRoIAlign)

    rpn = L1RegionProposalNetwork.__new__(L1RegionProposalNetwork)
    torch.nn.Module.__init__(rpn)

    class AllSampled:
        def __call__(self, labels):
            return [(lab == 1).to(torch.uint8) for lab in labels], [(lab == 0).to(torch.uint8) for lab in labels]

    rpn.fg_bg_sampler = AllSampled()
    labels = [torch.tensor([1.0, 0.0, 1.0, -1.0])]
    deltas, targets = torch.randn(4, 4), [torch.randn(4, 4)]
    objectness = torch.randn(4, 1)
    _, box = rpn.compute_loss(objectness, deltas, labels, targets)
    expected = (deltas[[0, 2]] - targets[0][[0, 2]]).abs().sum() / 3  # positives' L1 over the 3 sampled anchors
    assert box.item() == pytest.approx(expected.item(), rel=1e-6)


def test_detr_crop_keeps_boxes_and_masks_together():
    import random

    from xcit.detect.coco import detr_crop

    image = torch.zeros(3, 480, 640, dtype=torch.uint8)
    masks = torch.zeros(2, 480, 640, dtype=torch.uint8)
    masks[0, 100:200, 100:300] = 1
    masks[1, 400:470, 600:630] = 1
    target = {"boxes": torch.tensor([[100.0, 100, 300, 200], [600, 400, 630, 470]]), "labels": torch.tensor([1, 2]),
              "masks": masks}
    for seed in range(20):
        img, t = detr_crop(image, dict(target), random.Random(seed))
        h, w = img.shape[-2:]
        # the crop side is 384..600 pixels of the image resized to a shorter side of 400..600 (here x0.83..1.25)
        assert 384 / 1.25 - 1 <= min(h, w) and max(h, w) <= 600 / (400 / 480) + 1
        assert t["masks"].shape[-2:] == (h, w) and len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = torch.where(mask > 0)
            assert len(ys) and box[0] <= xs.min() and xs.max() < box[2] and box[1] <= ys.min() and ys.max() < box[3]


# ------------------------------------------------------------------ linear probe and k-NN


def test_linear_probe_defaults_are_dinos():
    from xcit.dino.knn import default_crop_pct
    from xcit.dino.linear import dino_linear_head, resolve_config
    from xcit.train.options import resolve_lr

    cfg = resolve_config(checkpoint="x.pth")
    assert (cfg.protocol, cfg.epochs, cfg.pool, cfg.weight_decay, cfg.amp) == ("dino", 100, "cls", 0.0, "none")
    assert (cfg.batch_size, cfg.lr_base, cfg.lr_base_size) == (128, 0.001, 256)  # eval_linear.py:266,270
    assert resolve_lr(cfg, 8 * 128)[0] == pytest.approx(0.001 * 1024 / 256)  # lr x global batch / 256: :231
    fast = resolve_config(checkpoint="x.pth", protocol="precomputed")
    assert (fast.lr, fast.batch_size) == (0.1, 256) and resolve_lr(fast, 512)[0] == 0.1
    torch.manual_seed(0)
    head = dino_linear_head(384, 1000)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.02) and torch.all(head.bias == 0)
    assert default_crop_pct("/data/imagenet") == 0.875 and default_crop_pct("fashion-mnist") == 1.0
    with pytest.raises(ValueError, match="no weight decay"):
        resolve_config(checkpoint="x.pth", weight_decay=0.1)


def test_dino_linear_lr_follows_cosine_annealing_per_epoch():
    """``CosineAnnealingLR(epochs, 0)`` stepped after each epoch: constant within an epoch."""
    from xcit.dino.linear import LinearProbe, resolve_config
    from xcit.train.distributed import DistEnv

    probe = LinearProbe(resolve_config(checkpoint="x.pth", epochs=4), DistEnv())
    schedule = probe.schedule(0.1, total_steps=8, steps_per_epoch=2)
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4) for _ in range(2)]
    assert [schedule(s)["lr"] for s in range(8)] == pytest.approx(expected)
    fast = LinearProbe(resolve_config(checkpoint="x.pth", protocol="precomputed"), DistEnv())
    per_step = fast.schedule(0.1, total_steps=8, steps_per_epoch=2)
    assert [per_step(s)["lr"] for s in range(8)] == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 8))
                                                                  for s in range(8)])


def test_training_reports_the_weights_chosen_before_training(tmp_path):
    from xcit.classify import train

    common = dict(data="digits", threads=1, progress=False, tensorboard=False, plot=False, epochs=1, ema=True,
                  ema_decay=0.5)
    raw = train(output=str(tmp_path / "raw"), **common)
    ema = train(output=str(tmp_path / "ema"), eval_weights="ema", **common)
    assert raw.metrics["weights"] == "raw" and ema.metrics["weights"] == "ema"
    with pytest.raises(ValueError, match="needs --ema"):
        train_config.resolve_config(data="digits", eval_weights="ema", ema=False)


def test_segmentation_schedule_and_drop_path_follow_the_head_as_the_official_configs(tmp_path):
    """sem_fpn_*_80k: 80k iterations evaluated every 8k; upernet_*_160k: 160k every 16k; Semantic FPN on
    medium_24 uses drop path 0.2 where UperNet (and detection) use 0.15."""
    from xcit.segment import resolve_config
    from xcit.segment.config import drop_path_rate

    def resolved(**kw):
        cfg = resolve_config(data=str(tmp_path), **kw)
        return cfg.iters, cfg.eval_every, drop_path_rate(cfg)

    assert resolved(model="xcit_medium_24_p16", head="fpn") == (80000, "8000", 0.2)
    assert resolved(model="xcit_medium_24_p8", head="upernet") == (160000, "16000", 0.15)
    assert resolved(model="xcit_small_12_p16") == (160000, "16000", 0.05)  # UperNet is the default head
    assert resolved(model="xcit_small_24_p16", head="fpn", iters=100, drop_path=0.3) == (100, "10", 0.3)
    assert resolved(model="xcit_tiny_12_p16", epochs=2)[:2] == (None, "1ep")
