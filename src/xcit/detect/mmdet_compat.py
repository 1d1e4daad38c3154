"""The official COCO Mask R-CNN checkpoints (mmdetection 2.11) on torchvision's detector, computing what mmdet computed.

The released files (``maskrcnn_xcit_{tiny_12,small_12,small_24,medium_24}_p{16,8}.pth``) hold
``{'meta': ..., 'state_dict': ...}`` in mmdet's module names; ``reference/layouts/mmdet_coco_mask_rcnn.json``
lists every key and shape (derived from the official configs by ``scripts/derive_layouts.py``).
Where torchvision's Mask R-CNN differs from mmdet 2.11 with those configs, and what is done here:

============================  ===========================================  ==========================================
piece                         mmdet 2.11 (official configs)                here (``conventions="mmdet"``)
============================  ===========================================  ==========================================
classifier rows               80 classes, background *last*                rows permuted: background first
box regression                class-specific, 80 x 4, no background        4 zero rows prepended for the background
mask logits                   80 channels, no background                   a zero background channel prepended
RoI pooling                   RoIAlign aligned=True, sampling_ratio=0      :class:`MMDetRoIAlign` (torchvision: aligned=False, 2)
                              (adaptive), 7 (box) / 14 (mask)
RoI -> FPN level              floor(log2(sqrt(area) / 56 + 1e-6)),         the same (torchvision: canonical 224 at
                              clamped to 0..3                              level 4, eps inside the log differently)
anchors                       scale 8 x stride, ratios 0.5 / 1 / 2,        :class:`MMDetAnchorGenerator` (torchvision
                              centre offset 0, *not rounded*, strides      rounds the base anchors and takes the stride
                              4 / 8 / 16 / 32 / 64                         as padded size // grid: 61 for P6 at 800 px)
box decoding                  delta2bbox, stds (.1,.1,.2,.2) RCNN /        :class:`MMDetBoxCoder`: weights 10,10,5,5 / 1;
                              1 RPN, dw/dh clamped to +-log(1000/16)       both-sided clamp (torchvision: upper only)
box widths                    x2 - x1 (mmdet 2.x: no +1)                   the same as torchvision
RPN test                      1000 per level, NMS 0.7 per level (by        the same settings (torchvision's RPN also
                              level id), 1000 kept, min_bbox_size 0        runs NMS per level); min box size 0
                                                                           (torchvision default: 1e-3)
RCNN test                     score > 0.05, class-wise NMS 0.5, 100 kept   the same (torchvision also drops boxes
                                                                           under 0.01 px, kept as is)
test resize                   keep ratio into 1333 x 800, sizes rounded    :class:`MMDetTransform`: the same sizes,
                              (int(x * s + 0.5)), cv2 bilinear on uint8    bilinear, rounded to 8-bit levels (up to
                                                                           cv2's fixed-point weights)
normalisation, padding        ImageNet mean / std x 255 after resizing;    the same order (torchvision normalises
                              pad to 32                                    before resizing)
mask pasting                  grid_sample of the 28 x 28 mask over the     :func:`paste_masks_mmdet`, the same
                              box (pixel centres), threshold 0.5           (torchvision: expand by 1 px + interpolate)
============================  ===========================================  ==========================================
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .transform import COMPACT_MASK_BYTES, NativeSizeTransform
from .recipe import MMDetRoIAlign

BBOX_XFORM_CLIP = abs(math.log(16 / 1000))  # mmdet's wh_ratio_clip
RCNN_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # 1 / target_stds (0.1, 0.1, 0.2, 0.2)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# COCO 2017 category ids of the 80 classes, in mmdet's order (instances_*.json numbering, 1..90 with gaps)
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


# ----------------------------------------------------------------------------- conventions


class MMDetAnchorGenerator(AnchorGenerator):
    """torchvision's generator with mmdet 2.x's anchors: base anchors not rounded to integers, and the
    configured strides (4..64) rather than ``padded size // grid size`` (61 for P6 of an 800-pixel side,
    whose grid is 13 after padding to 32 and the stride-2 pooling)."""

    def __init__(self, sizes, aspect_ratios, strides=(4, 8, 16, 32, 64)) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides[:len(grid_sizes)]]
        self.set_cell_anchors(dtype, device)
        per_level = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [per_level for _ in image_list.image_sizes]


class MMDetBoxCoder(BoxCoder):
    """mmdet 2.11's ``delta2bbox`` (means 0, stds = 1 / weights): centres (x1 + x2) / 2, log-sizes clamped both ways."""

    def __init__(self, weights: tuple[float, float, float, float]) -> None:
        super().__init__(weights, bbox_xform_clip=BBOX_XFORM_CLIP)

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes.to(rel_codes.dtype)
        px, py = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5
        pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        wx, wy, ww, wh = self.weights
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        dw = (rel_codes[:, 2::4] / ww).clamp(-self.bbox_xform_clip, self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(-self.bbox_xform_clip, self.bbox_xform_clip)
        gx, gy = px[:, None] + pw[:, None] * dx, py[:, None] + ph[:, None] * dy
        gw, gh = pw[:, None] * dw.exp(), ph[:, None] * dh.exp()
        return torch.stack([gx - 0.5 * gw, gy - 0.5 * gh, gx + 0.5 * gw, gy + 0.5 * gh], dim=2).flatten(1)


def paste_masks_mmdet(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], compact: bool = False) -> torch.Tensor:
    """(N, 1, H, W) probabilities: each (M, M) mask sampled at the image's pixel centres inside its box
    (``grid_sample``, align_corners=False, zero outside), as mmdet 2.x's ``_do_paste_mask``; with
    ``compact`` thresholded at mmdet's 0.5 into ``bool`` (for images too large for float masks)."""
    h, w = size
    out = torch.zeros((masks.shape[0], 1, h, w), dtype=torch.bool if compact else masks.dtype, device=masks.device)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        xa, ya = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        xb, yb = min(math.ceil(x1) + 1, w), min(math.ceil(y1) + 1, h)
        if xb <= xa or yb <= ya:
            continue
        gx = (torch.arange(xa, xb, device=masks.device, dtype=torch.float32) + 0.5 - x0) / max(x1 - x0, 1e-6) * 2 - 1
        gy = (torch.arange(ya, yb, device=masks.device, dtype=torch.float32) + 0.5 - y0) / max(y1 - y0, 1e-6) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        pasted = F.grid_sample(masks[i:i + 1].float(), grid, align_corners=False)[0, 0]
        out[i, 0, ya:yb, xa:xb] = pasted >= 0.5 if compact else pasted.to(out.dtype)
    return out


class MMDetTransform(NativeSizeTransform):
    """Test-time resize as mmdet's ``Resize(keep_ratio=True)`` into (max_size, test_size): scale =
    min(max / long side, test / short side), sizes ``int(x * scale + 0.5)``, bilinear (cv2's
    INTER_LINEAR: half-pixel centres, no antialiasing) on 8-bit values, rounded, then normalised;
    masks pasted as mmdet."""

    def _mmdet_test(self) -> bool:
        return not self.training and self.test_size != 0

    def normalize(self, image):
        return image if self._mmdet_test() else super().normalize(image)  # mmdet normalises after resizing

    def resize(self, image, target=None):
        if not self._mmdet_test():
            return super().resize(image, target)
        h, w = image.shape[-2:]
        scale = min(self.max_size / max(h, w), self.test_size / min(h, w))
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        image = super().normalize((image * 255).round().clamp(0, 255) / 255)  # the uint8 image mmdet resized
        if target is not None and "boxes" in target:
            from torchvision.models.detection.transform import resize_boxes

            target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        masks = [r.pop("masks", None) for r in result]
        result = GeneralizedRCNNTransform.postprocess(self, result, image_shapes, original_image_sizes)
        for r, m, size in zip(result, masks, original_image_sizes):
            if m is not None:
                r["masks"] = paste_masks_mmdet(m, r["boxes"], size, compact=m.shape[0] * size[0] * size[1] * 4 > COMPACT_MASK_BYTES)
        return result


def apply_mmdet_conventions(model: nn.Module) -> nn.Module:
    """Switch a torchvision Mask / Faster R-CNN built by :func:`xcit.detect.model.assemble` to mmdet 2.11's
    RoIAlign, level mapping, anchors, box decoding, test resize and mask pasting (in place; returned)."""
    rpn, roi = model.rpn, model.roi_heads
    old = rpn.anchor_generator
    rpn.anchor_generator = MMDetAnchorGenerator(old.sizes, old.aspect_ratios, strides=(4, 8, 16, 32, 64))
    rpn.box_coder = MMDetBoxCoder((1.0, 1.0, 1.0, 1.0))
    rpn.min_size = 0.0
    roi.box_coder = MMDetBoxCoder(RCNN_WEIGHTS)
    roi.box_roi_pool = MMDetRoIAlign(7)
    if roi.has_mask():
        roi.mask_roi_pool = MMDetRoIAlign(14)
    t = model.transform
    model.transform = MMDetTransform(t.train_sizes, t.test_size, t.max_size, t.image_mean, t.image_std)
    return model


# ----------------------------------------------------------------------------- checkpoint conversion

_RULES = [
    (r"^backbone\.", "backbone.body."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"^roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]


def background_first(t: torch.Tensor) -> torch.Tensor:
    """Classifier rows from mmdet's order (classes 0..n-1, background n) to torchvision's (background 0, classes 1..n)."""
    return torch.cat([t[-1:], t[:-1]])


def prepend_background(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` zero rows for a background class that mmdet's class-specific layer does not have."""
    return torch.cat([t.new_zeros((rows, *t.shape[1:])), t])


def mmdet_to_torchvision(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(torchvision-named state dict, keys no rule accounts for) of an mmdet 2.11 Mask R-CNN state dict."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in _RULES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    for kind in ("weight", "bias"):
        if (k := f"roi_heads.box_predictor.cls_score.{kind}") in out:
            out[k] = background_first(out[k])
        if (k := f"roi_heads.box_predictor.bbox_pred.{kind}") in out:
            out[k] = prepend_background(out[k], 4)
        if (k := f"roi_heads.mask_predictor.mask_fcn_logits.{kind}") in out:
            out[k] = prepend_background(out[k], 1)
    return out, unknown


def is_mmdet_checkpoint(raw: Any) -> bool:
    """Whether a loaded file is an mmdet detector (``state_dict`` with ``roi_head.`` / ``rpn_head.`` keys)."""
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    return isinstance(state, dict) and any(str(k).startswith(("roi_head.", "rpn_head.")) for k in state)
