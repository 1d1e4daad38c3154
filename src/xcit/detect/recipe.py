"""mmdetection 2.11's Mask R-CNN conventions (the official XCiT configs) on torchvision's detector.

- ``roi_align="mmdet"``: mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``: box corners shifted by
  half a pixel and an adaptive number of samples per bin (``ceil(roi size / output size)``);
  torchvision's detectors use ``aligned=False, sampling_ratio=2``. The level of a box is the same
  in both (``floor(log2(sqrt(area) / 56))``, clamped to the 4 levels).
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


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with mmcv's ``aligned=True`` (same level mapping and scales)."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feats = [x[k] for k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.setup_scales(feats, image_shapes)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out

    def setup_scales(self, feats: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> None:
        from torchvision.ops.poolers import _setup_scales

        self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale, self.canonical_level)


def roi_poolers(kind: str) -> dict[str, nn.Module]:
    """``box_roi_pool`` (7x7) and ``mask_roi_pool`` (14x14) for torchvision's ``MaskRCNN`` / ``FasterRCNN``."""
    if kind not in ROI_ALIGNS:
        raise ValueError(f"expected roi_align in {ROI_ALIGNS}, got {kind!r}")
    if kind == "torchvision":
        return dict(box_roi_pool=MultiScaleRoIAlign(LEVELS, 7, 2), mask_roi_pool=MultiScaleRoIAlign(LEVELS, 14, 2))
    return dict(box_roi_pool=AlignedMultiScaleRoIAlign(LEVELS, 7, 0),
                mask_roi_pool=AlignedMultiScaleRoIAlign(LEVELS, 14, 0))


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
