"""Detectors: the XCiT pyramid + torchvision's FPN inside torchvision's Mask R-CNN / Faster R-CNN.

The backbone is :func:`xcit.models.create_pyramid` (named, custom, or the trunk of any
classification or DINO checkpoint, official release files included), wrapped with a 256-channel
:class:`torchvision.ops.FeaturePyramidNetwork` and a max-pooled fifth level (P2..P6, strides
4..64) as in the paper's Mask R-CNN. Detector checkpoints hold the configuration to rebuild the
model, so ``eval`` / ``predict`` need nothing else.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..models import MODELS, XCiTPyramid, create_pyramid, resolve_name
from ..models.weights import CheckpointError, check_finite, check_layout, infer_architecture, load_file
from .mmdet_compat import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    apply_mmdet_conventions,
    is_mmdet_checkpoint,
    mmdet_to_torchvision,
)
from .recipe import BOX_LOSSES, ROI_ALIGNS, roi_poolers, use_box_loss
from .transform import NativeSizeTransform, paste_masks  # noqa: F401  (paste_masks: part of this module's API)

FORMAT = "xcit-detector-1"
KINDS = ("mask_rcnn", "faster_rcnn")
CONVENTIONS = ("torchvision", "mmdet")


class XCiTFPN(nn.Module):
    """XCiT pyramid (strides 4, 8, 16, 32) -> FPN with ``out_channels`` and a max-pooled stride-64 level.

    Returns the ``OrderedDict`` torchvision's detectors read: keys "0".."3" and "pool". A
    backbone trained on grey images (``in_chans=1``) receives the mean of the RGB channels.
    """

    def __init__(self, body: XCiTPyramid, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.in_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.body.in_chans == 1 and x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return self.fpn(self.body(x))


def default_drop_path(backbone: str | None) -> float:
    """The dense-task drop path of a named model (tiny 0, small_12 0.05, small_24 0.1, medium_24 0.15), else 0."""
    return MODELS[resolve_name(backbone).arch].drop_path_rate if backbone else 0.0


def detector_config(
    num_classes: int,
    *,
    kind: str = "mask_rcnn",
    fpn_channels: int = 256,
    anchor_sizes: list[int] | None = None,
    aspect_ratios: list[float] | None = None,
    min_size: list[int] | None = None,
    max_size: int = 1333,
    test_size: int | None = None,
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    rpn_batch_size: int = 256,
    rpn_pre_nms_train: int = 2000,
    rpn_post_nms_train: int = 1000,
    rpn_pre_nms_test: int = 1000,
    rpn_post_nms_test: int = 1000,
    roi_batch_size: int = 512,
    detections_per_img: int = 100,
    score_thresh: float = 0.05,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    roi_align: str = "mmdet",
    box_loss: str = "l1",
    conventions: str = "torchvision",
) -> dict[str, Any]:
    """The detector settings (defaults: the paper's Mask R-CNN with FPN(256), multi-scale 480..800 training).

    ``min_size`` lists the shorter sides drawn at training time; ``test_size`` is the test-time
    shorter side (default: the largest of ``min_size``); 0 in either keeps images at their size.
    ``roi_align`` and ``box_loss`` choose mmdetection's conventions (the official configs) or
    torchvision's (:mod:`xcit.detect.recipe`). ``conventions="mmdet"`` also computes anchors, box
    decoding, test resize and mask pasting as mmdetection 2.11 did (see
    :mod:`xcit.detect.mmdet_compat`; used for the official COCO weights).
    """
    if conventions not in CONVENTIONS:
        raise ValueError(f"expected conventions in {CONVENTIONS}, got {conventions!r}")
    if roi_align not in ROI_ALIGNS or box_loss not in BOX_LOSSES:
        raise ValueError(f"expected roi_align in {ROI_ALIGNS} and box_loss in {BOX_LOSSES}, "
                         f"got {roi_align!r}, {box_loss!r}")
    if kind not in KINDS:
        raise ValueError(f"expected a detector kind in {KINDS}, got {kind!r}")
    if num_classes < 1:
        raise ValueError(f"expected at least 1 object class, got {num_classes}")
    min_size = list(min_size) if min_size else list(range(480, 801, 32))
    if any(s < 0 for s in min_size) or (0 in min_size and len(min_size) > 1):
        raise ValueError(f"expected positive training sizes (or just 0 for native size), got {min_size}")
    anchor_sizes = list(anchor_sizes) if anchor_sizes else [32, 64, 128, 256, 512]
    if len(anchor_sizes) != 5:
        raise ValueError(f"expected 5 anchor sizes (one per FPN level P2..P6), got {anchor_sizes}")
    return dict(
        num_classes=num_classes, kind=kind, fpn_channels=fpn_channels, anchor_sizes=anchor_sizes,
        aspect_ratios=list(aspect_ratios or [0.5, 1.0, 2.0]), min_size=min_size, max_size=max_size,
        test_size=max(min_size) if test_size is None else test_size, box_head_dim=box_head_dim,
        mask_head_channels=mask_head_channels, rpn_batch_size=rpn_batch_size, rpn_pre_nms_train=rpn_pre_nms_train,
        rpn_post_nms_train=rpn_post_nms_train, rpn_pre_nms_test=rpn_pre_nms_test, rpn_post_nms_test=rpn_post_nms_test,
        roi_batch_size=roi_batch_size, detections_per_img=detections_per_img, score_thresh=score_thresh,
        image_mean=list(image_mean or IMAGENET_MEAN), image_std=list(image_std or IMAGENET_STD),
        roi_align=roi_align, box_loss=box_loss,
        **({"conventions": conventions} if conventions != "torchvision" else {}),
    )


def assemble(body: XCiTPyramid, cfg: dict[str, Any]) -> nn.Module:
    """A torchvision Mask R-CNN / Faster R-CNN (``cfg`` from :func:`detector_config`) on ``body``."""
    backbone = XCiTFPN(body, cfg["fpn_channels"])
    c = cfg["fpn_channels"]
    anchors = AnchorGenerator(tuple((s,) for s in cfg["anchor_sizes"]), (tuple(cfg["aspect_ratios"]),) * 5)
    common = dict(
        min_size=tuple(cfg["min_size"]), max_size=cfg["max_size"], image_mean=cfg["image_mean"], image_std=cfg["image_std"],
        rpn_anchor_generator=anchors, rpn_batch_size_per_image=cfg["rpn_batch_size"],
        rpn_pre_nms_top_n_train=cfg["rpn_pre_nms_train"], rpn_post_nms_top_n_train=cfg["rpn_post_nms_train"],
        rpn_pre_nms_top_n_test=cfg["rpn_pre_nms_test"], rpn_post_nms_top_n_test=cfg["rpn_post_nms_test"],
        box_batch_size_per_image=cfg["roi_batch_size"], box_detections_per_img=cfg["detections_per_img"],
        box_score_thresh=cfg["score_thresh"], box_head=TwoMLPHead(c * 7 * 7, cfg["box_head_dim"]),
        box_predictor=_box_predictor(cfg["box_head_dim"], cfg["num_classes"] + 1),
        **roi_poolers(cfg.get("roi_align", "torchvision")),  # checkpoints from before the option: torchvision's
    )
    if cfg["kind"] == "mask_rcnn":
        m = cfg["mask_head_channels"]
        model = MaskRCNN(backbone, None, mask_head=MaskRCNNHeads(c, [m] * 4, 1), mask_predictor=_mask_predictor(m, cfg["num_classes"] + 1), **common)
    else:
        common.pop("mask_roi_pool")
        model = FasterRCNN(backbone, None, **common)
    use_box_loss(model, cfg.get("box_loss", "smooth_l1"))
    model.transform = NativeSizeTransform(cfg["min_size"], cfg["test_size"], cfg["max_size"], cfg["image_mean"], cfg["image_std"])
    model.detector_config = dict(cfg)
    if cfg.get("conventions") == "mmdet":
        apply_mmdet_conventions(model)
    return model


def _box_predictor(dim: int, classes: int) -> nn.Module:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(dim, classes)


def _mask_predictor(dim: int, classes: int) -> nn.Module:
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    predictor = MaskRCNNPredictor(dim, dim, classes)
    # torchvision's fan-out init gives logits of std ~10 for a few classes (loss ~8 at step 0); detectron2's is small
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    return predictor


def set_test_size(model: nn.Module, size: int, max_size: int | None = None) -> None:
    """Test-time shorter side of ``model`` (0: each image at its own size) and optionally the longer-side cap."""
    if size < 0:
        raise ValueError(f"expected a test size >= 0 (0: native resolution), got {size}")
    model.transform.test_size = int(size)
    if max_size is not None:
        model.transform.max_size = int(max_size)


def build_detector(
    num_classes: int,
    backbone: str | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    out_indices: list[int] | None = None,
    drop_path_rate: float | None = None,
    arch: dict | None = None,
    **settings,
) -> nn.Module:
    """Mask R-CNN (default) or Faster R-CNN (``kind="faster_rcnn"``) for ``num_classes`` object classes.

    The backbone comes from :func:`xcit.models.create_pyramid` (``backbone`` name, ``pretrained``
    checkpoint and/or ``arch`` shape); ``drop_path_rate`` defaults to the named model's dense-task
    rate. ``settings`` go to :func:`detector_config`.
    """
    if drop_path_rate is None:
        drop_path_rate = default_drop_path(backbone)
    body = create_pyramid(backbone, pretrained, out_indices=out_indices, drop_path_rate=drop_path_rate, **(arch or {}))
    cfg = detector_config(num_classes, **settings)
    cfg["backbone"] = dict(arch=dict(body.arch_config), out_indices=list(body.out_indices),
                           name=getattr(body, "model_name", None), drop_path_rate=drop_path_rate)
    return assemble(body, cfg)


def detector_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Rebuild (without weights) a detector from its stored ``detector_config``."""
    bb = cfg["backbone"]
    body = XCiTPyramid(out_indices=bb["out_indices"], drop_path_rate=bb.get("drop_path_rate", 0.0), **bb["arch"])
    body.model_name = bb.get("name")
    return assemble(body, cfg)


def detector_state(model: nn.Module, meta: dict | None = None) -> dict[str, Any]:
    """The checkpoint dictionary of ``model``: format, config, weights (CPU) and ``meta``."""
    model = getattr(model, "module", model)
    return {"format": FORMAT, "config": dict(model.detector_config),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta or {}}


def read_detector_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw detector checkpoint at ``path`` (weights-only load), with a clear error for anything else."""
    from ..train.checkpoint import read_task_checkpoint

    return read_task_checkpoint(path, FORMAT, "detect")


def load_detector(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """(detector in eval mode, meta) from a checkpoint written by ``xcit detect train``, or from an official
    COCO release file (mmdet 2.11 layout; a path or a name such as ``maskrcnn_xcit_tiny_12_p16``)."""
    from ..models.hub import dense_release_arch, weights_file

    if dense_release_arch(os.fspath(path)) is not None and not os.path.isfile(path):
        path = weights_file(path)
    try:
        raw = read_detector_checkpoint(path)
    except CheckpointError:
        other = load_file(path)
        if not is_mmdet_checkpoint(other):
            raise
        model, meta = load_mmdet_detector(path, other)
        check_finite(model.state_dict(), path)
        return model, meta
    check_finite(raw["model"], path)  # NaN weights would predict nothing: refused, naming the tensor
    model = detector_from_config(raw["config"])
    model.load_state_dict(raw["model"])
    return model.eval(), raw.get("meta", {})


def load_mmdet_detector(path: str | os.PathLike, raw: dict | None = None) -> tuple[nn.Module, dict]:
    """(Mask R-CNN in eval mode with mmdet 2.11 conventions, meta) from an official COCO release file.

    The architecture is read from the file's shapes; every key must be accounted for and fit.

    Raises:
        CheckpointError: not an mmdet Mask R-CNN file, or one of another configuration (keys or shapes differ).
    """
    raw = load_file(path) if raw is None else raw
    if not is_mmdet_checkpoint(raw):
        raise CheckpointError(f"{path}: not an mmdetection detector checkpoint (expected 'state_dict' with 'rpn_head.*' / 'roi_head.*' keys)")
    state = raw["state_dict"]
    meta = dict(raw.get("meta") or {})
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    arch = infer_architecture(backbone)
    cls = state.get("roi_head.bbox_head.fc_cls.weight")
    if "depth" not in arch or "patch_size" not in arch or cls is None:
        raise CheckpointError(f"{path}: expected an XCiT backbone ('backbone.blocks.*', 'backbone.patch_embed.*') and "
                              "a box classifier ('roi_head.bbox_head.fc_cls.weight'): the Mask R-CNN layout of the official COCO configs")
    num_classes = cls.shape[0] - 1
    shape = {k: arch[k] for k in ("patch_size", "embed_dim", "depth", "num_heads") if k in arch}
    kind = "mask_rcnn" if any(k.startswith("roi_head.mask_head.") for k in state) else "faster_rcnn"
    model = build_detector(num_classes, arch=shape, kind=kind, min_size=[800], test_size=800, max_size=1333,
                           conventions="mmdet")
    converted, unknown = mmdet_to_torchvision(state)
    header = (f"{path} is not a checkpoint of the official XCiT Mask R-CNN configs (mmdet 2.11 layout; backbone "
              f"{arch.get('name', shape)}, {num_classes} classes):")
    check_layout(model.state_dict(), converted, unknown, header)
    model.load_state_dict(converted, strict=True)
    classes = list(meta.get("CLASSES") or (COCO_CLASSES if num_classes == 80 else [f"class{i}" for i in range(1, num_classes + 1)]))
    ids = COCO_CATEGORY_IDS if list(classes) == list(COCO_CLASSES) else list(range(1, num_classes + 1))
    info = {"classes": classes, "category_ids": ids, "source": os.fspath(path), "format": "mmdet-2.11",
            "mmdet_version": meta.get("mmdet_version")}
    return model.eval(), info
