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
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..models import MODELS, XCiTPyramid, create_pyramid, resolve_name
from ..models.weights import CheckpointError
from .recipe import BOX_LOSSES, ROI_ALIGNS, roi_poolers, use_box_loss

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


COMPACT_MASK_BYTES = 1 << 30


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], compact: bool = False) -> torch.Tensor:
    """(N, 1, H, W) image-size masks from (N, 1, M, M) box-relative ones, writing only inside each box
    (torchvision's ``paste_masks_in_image`` allocates one full image per mask, then stacks them)."""
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    h, w = size
    out = torch.zeros((masks.shape[0], 1, h, w), dtype=torch.bool if compact else masks.dtype, device=masks.device)
    if masks.shape[0] == 0:
        return out
    masks, scale = expand_masks(masks, padding=1)
    boxes = expand_boxes(boxes, scale).to(torch.int64).tolist()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        bw, bh = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        m = F.interpolate(masks[i:i + 1], size=(bh, bw), mode="bilinear", align_corners=False)[0, 0]
        xa, xb, ya, yb = max(x0, 0), min(x1 + 1, w), max(y0, 0), min(y1 + 1, h)
        if xb > xa and yb > ya:
            m = m[ya - y0:yb - y0, xa - x0:xb - x0]
            out[i, 0, ya:yb, xa:xb] = m > 0.5 if compact else m
    return out


class NativeSizeTransform(GeneralizedRCNNTransform):
    """torchvision's resize + normalise + batch with separate training and test sizes.

    Training draws the shorter side from ``train_sizes`` (multi-scale training); evaluation uses
    ``test_size``. A size of 0 keeps each image at its own resolution, so any image runs in one
    pass (padded to a multiple of 32 for the stride-32 level).
    """

    def __init__(self, train_sizes, test_size: int, max_size: int, image_mean, image_std) -> None:
        super().__init__(tuple(train_sizes), max_size, image_mean, image_std)
        self.train_sizes, self.test_size = tuple(train_sizes), int(test_size)

    def resize(self, image, target=None):
        sizes = self.train_sizes if self.training else (self.test_size,)
        if sizes == (0,):
            return image, target
        self.min_size = sizes
        return super().resize(image, target)

    def postprocess(self, result, image_shapes, original_image_sizes):
        """Boxes back to the input size, masks pasted into it: float probabilities (as torchvision),
        or masks thresholded at 0.5 as ``bool`` when float masks would exceed ``COMPACT_MASK_BYTES``
        (100 float masks of a 6000x4000 image take 9.6 GB; torchvision's paste needs twice that)."""
        if self.training:
            return result
        masks = [r.pop("masks", None) for r in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for r, m, size in zip(result, masks, original_image_sizes):
            if m is not None:
                r["masks"] = paste_masks(m, r["boxes"], size, compact=m.shape[0] * size[0] * size[1] * 4 > COMPACT_MASK_BYTES)
        return result


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
        from .mmdet_compat import apply_mmdet_conventions

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
        from ..models.weights import load_file
        from .mmdet_compat import is_mmdet_checkpoint, load_mmdet_detector

        other = load_file(path)
        if not is_mmdet_checkpoint(other):
            raise
        return load_mmdet_detector(path, other)
    model = detector_from_config(raw["config"])
    model.load_state_dict(raw["model"])
    return model.eval(), raw.get("meta", {})
