"""mmdetection 2.11's Mask R-CNN conventions (the official XCiT configs) on torchvision's detector.

- ``roi_align="mmdet"``: mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``: box corners shifted by
  half a pixel and an adaptive number of samples per bin (``ceil(roi size / output size)``);
  torchvision's detectors use ``aligned=False, sampling_ratio=2``; mmdet's level of a box,
  ``floor(log2(sqrt(area) / 56 + 1e-6))`` clamped to the 4 levels, and fixed strides 4..32.
- ``box_loss="l1"``: the configs' ``L1Loss`` for the RPN and the box head (torchvision: smooth L1,
  beta 1/9), with the same normalisation (sampled anchors / sampled RoIs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align

ROI_ALIGNS = ("mmdet", "torchvision")
BOX_LOSSES = ("l1", "smooth_l1")
LEVELS = ["0", "1", "2", "3"]


FINEST_SCALE = 56  # mmdet's SingleRoIExtractor: level 0 for boxes up to 56 x 56 pixels
FEATMAP_STRIDES = (4, 8, 16, 32)


def map_roi_levels(boxes: torch.Tensor, num_levels: int = 4, finest_scale: int = FINEST_SCALE) -> torch.Tensor:
    """mmdet's SingleRoIExtractor level of each (x1, y1, x2, y2) box: floor(log2(sqrt(area) / 56 + 1e-6)), clamped."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


class MMDetRoIAlign(MultiScaleRoIAlign):
    """RoIAlign over FPN levels as mmdet 2.11: ``aligned=True`` (half-pixel shift), adaptive sampling
    (``sampling_ratio=0``: ceil(bin size) points per bin), mmdet's level mapping, fixed strides.

    Called as torchvision's ``MultiScaleRoIAlign`` is: (features dict, boxes per image, image shapes).
    """

    def __init__(self, output_size: int, featmap_names=("0", "1", "2", "3"), strides=FEATMAP_STRIDES,
                 sampling_ratio: int = 0, aligned: bool = True, finest_scale: int = FINEST_SCALE) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)  # a MultiScaleRoIAlign to torchvision
        self.strides = tuple(strides)
        self.sampling_ratio, self.aligned, self.finest_scale = sampling_ratio, aligned, finest_scale

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        feats = [x[n] for n in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = map_roi_levels(rois[:, 1:], len(feats), self.finest_scale)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel():
                out[idx] = roi_align(feat, rois[idx].to(feat.dtype), self.output_size, 1.0 / stride,
                                     self.sampling_ratio, self.aligned).to(out.dtype)
        return out


def roi_poolers(kind: str) -> dict[str, nn.Module]:
    """``box_roi_pool`` (7x7) and ``mask_roi_pool`` (14x14) for torchvision's ``MaskRCNN`` / ``FasterRCNN``."""
    if kind not in ROI_ALIGNS:
        raise ValueError(f"expected roi_align in {ROI_ALIGNS}, got {kind!r}")
    if kind == "torchvision":
        return dict(box_roi_pool=MultiScaleRoIAlign(LEVELS, 7, 2), mask_roi_pool=MultiScaleRoIAlign(LEVELS, 14, 2))
    return dict(box_roi_pool=MMDetRoIAlign(7, LEVELS), mask_roi_pool=MMDetRoIAlign(14, LEVELS))


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with an L1 box loss over the positive sampled anchors, divided by all sampled."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg])
        labels, targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


class L1RoIHeads(RoIHeads):
    """torchvision's RoI heads whose ``loss_box_reg`` is the L1 loss of the same samples and predictions
    (class-specific deltas of the positive RoIs, divided by all sampled RoIs)."""

    def select_training_samples(self, proposals, targets):
        out = super().select_training_samples(proposals, targets)
        self._samples = out[2], out[3]  # labels, regression targets
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        captured = {}
        hook = self.box_predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        if self.training and "out" in captured:
            labels, targets_ = (torch.cat(t, dim=0) for t in self._samples)
            deltas = captured["out"][1]
            deltas = deltas.reshape(len(deltas), -1, 4)
            pos = torch.where(labels > 0)[0]
            box_loss = F.l1_loss(deltas[pos, labels[pos]], targets_[pos], reduction="sum")
            losses["loss_box_reg"] = box_loss / labels.numel()
            del self._samples
        return result, losses


def use_box_loss(model: nn.Module, kind: str) -> None:
    """Give ``model`` (a torchvision two-stage detector) the ``"l1"`` or ``"smooth_l1"`` box losses.

    Swaps the classes of ``model.rpn`` and ``model.roi_heads`` (state and weights unchanged)."""
    if kind not in BOX_LOSSES:
        raise ValueError(f"expected box_loss in {BOX_LOSSES}, got {kind!r}")
    if kind == "l1":
        model.rpn.__class__ = L1RegionProposalNetwork
        model.roi_heads.__class__ = L1RoIHeads
