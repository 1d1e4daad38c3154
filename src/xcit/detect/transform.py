"""The detectors' input transform (training / test sizes, native resolution) and memory-bounded mask pasting."""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform

COMPACT_MASK_BYTES = 1 << 30


def box_mask_patches(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]
                     ) -> Iterator[tuple[int, int, int, int, int, torch.Tensor]]:
    """(i, ya, yb, xa, xb, probabilities) for each (1, M, M) box-relative mask pasted over its box as torchvision
    pastes it (expanded by a pixel, bilinear), clipped to the image ``size``: only the box's pixels are made
    (masks outside the image yield nothing). Shared by :func:`paste_masks` and the tiled detector's RLE writer."""
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    h, w = size
    if masks.shape[0] == 0:
        return
    masks, scale = expand_masks(masks, padding=1)
    boxes = expand_boxes(boxes, scale).to(torch.int64).tolist()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        bw, bh = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        m = F.interpolate(masks[i:i + 1], size=(bh, bw), mode="bilinear", align_corners=False)[0, 0]
        xa, xb, ya, yb = max(x0, 0), min(x1 + 1, w), max(y0, 0), min(y1 + 1, h)
        if xb > xa and yb > ya:
            yield i, ya, yb, xa, xb, m[ya - y0:yb - y0, xa - x0:xb - x0]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], compact: bool = False) -> torch.Tensor:
    """(N, 1, H, W) image-size masks from (N, 1, M, M) box-relative ones, writing only inside each box
    (torchvision's ``paste_masks_in_image`` allocates one full image per mask, then stacks them)."""
    h, w = size
    out = torch.zeros((masks.shape[0], 1, h, w), dtype=torch.bool if compact else masks.dtype, device=masks.device)
    for i, ya, yb, xa, xb, m in box_mask_patches(masks, boxes, size):
        out[i, 0, ya:yb, xa:xb] = m >= 0.5 if compact else m  # mmdet: mask >= mask_thr_binary
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
