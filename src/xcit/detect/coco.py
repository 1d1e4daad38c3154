"""COCO-format detection datasets: reading, validating and serving images with their targets.

A dataset is an image folder plus a COCO JSON file (``images``, ``annotations``, ``categories``;
boxes as ``[x, y, width, height]`` in pixels, optional ``segmentation`` as polygons or RLE).
Validation rules (documented in docs/detection.md):

* unreadable file or broken JSON, missing ``images`` / ``categories``, an image entry without
  ``id`` / ``file_name``, an image or category id that is not an integer, duplicate image or category
  ids, a ``width`` / ``height`` that is not a positive integer, an image file that does not exist:
  :class:`CocoFormatError` naming the file, the entry and the problem;
* an annotation with an unknown ``image_id`` or ``category_id``, a malformed ``bbox``, a box with a
  non-finite coordinate (NaN, infinity), a box with no area, a box entirely outside its image, or a
  malformed ``segmentation`` (a polygon of non-numbers, an odd number of coordinates or fewer than 3
  points; an RLE without ``counts`` / ``size``, of another size than its image, or whose counts do not
  cover exactly its image's pixels): skipped, and counted in :class:`ValidationReport`;
* a box partly outside its image: clipped to the image, counted;
* an image without annotations: kept (a negative example for training), counted;
* ``iscrowd`` annotations: not trained on; COCO evaluation treats them as crowd regions;
* Mask R-CNN training on an annotation without ``segmentation``: its box is used as the mask, counted.

With ``strict=True`` any skipped annotation is an error instead.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import open_image, read_image

log = logging.getLogger("xcit.data")


class CocoFormatError(ValueError):
    """The COCO file cannot be used as it is (the message names the file and the entry)."""


@dataclass
class ValidationReport:
    """What validation changed: counts of skipped or repaired annotations, and examples of each."""

    images: int = 0
    annotations: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    empty_images: int = 0
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, example)

    def repair(self, reason: str, example: str) -> None:
        self.repaired[reason] += 1
        self.examples.setdefault(reason, example)

    def summary(self) -> str:
        parts = [f"{self.images} images, {self.annotations} annotations: {self.kept} kept"]
        parts += [f"{n} skipped ({reason}, e.g. {self.examples[reason]})" for reason, n in sorted(self.skipped.items())]
        parts += [f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in sorted(self.repaired.items())]
        if self.empty_images:
            parts.append(f"{self.empty_images} images without annotations (kept as negatives)")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "annotations": self.annotations, "kept": self.kept, "skipped": dict(self.skipped),
                "repaired": dict(self.repaired), "empty_images": self.empty_images}


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed COCO file, or :class:`CocoFormatError` (missing file, broken JSON, wrong top level)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a COCO annotation file, got {str(path)!r} which does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{path}: broken JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{path}: not a UTF-8 text file ({err})") from err
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with images, annotations and categories, got a {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{path}: expected a list under {key!r}, got {type(data.get(key)).__name__}")
    if not isinstance(data.get("annotations", []), list):
        raise CocoFormatError(f"{path}: expected a list under 'annotations'")
    if not data["categories"]:
        raise CocoFormatError(f"{path}: 'categories' is empty (expected at least one object class)")
    return data


def _unique_ids(path: Path, entries: list, what: str, required: tuple[str, ...]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(k not in entry for k in required):
            raise CocoFormatError(f"{path}: {what} entry {i} needs {', '.join(required)}, got {str(entry)[:120]}")
        if not _is_int(entry["id"]):
            raise CocoFormatError(f"{path}: {what} entry {i} has id {entry['id']!r}; expected an integer "
                                  f"(COCO {what} ids are integers)")
        if entry["id"] in out:
            raise CocoFormatError(f"{path}: duplicate {what} id {entry['id']!r}")
        out[entry["id"]] = entry
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_image_entry(path: Path, img: dict) -> None:
    """``file_name`` a non-empty string; ``width`` / ``height``, where given, positive whole numbers of pixels."""
    where = f"image {img['id']}"
    if not isinstance(img["file_name"], str) or not img["file_name"]:
        raise CocoFormatError(f"{path}: {where}: file_name {img['file_name']!r}; expected the image's file name")
    for key in ("width", "height"):
        value = img.get(key)
        if value is None:
            continue
        if not (_is_number(value) and math.isfinite(value) and value == int(value) and value >= 1):
            raise CocoFormatError(f"{path}: {where} ({img['file_name']}): {key} {value!r}; expected the image's {key} "
                                  "in pixels, a positive integer (or leave it out to read it from the file)")
        img[key] = int(value)


def clean_coco(data: dict[str, Any], path: str | os.PathLike = "<coco>", *, image_root: str | os.PathLike | None = None,
               need_masks: bool = False, strict: bool = False) -> tuple[dict[str, Any], ValidationReport]:
    """A validated copy of ``data`` (rules in the module docstring) and the report of what changed.

    Every kept annotation has a clipped ``bbox``, ``area`` and ``iscrowd``; images lacking width or
    height get them from the file under ``image_root``.
    """
    path = Path(path)
    images = _unique_ids(path, data["images"], "image", ("id", "file_name"))
    cats = _unique_ids(path, data["categories"], "category", ("id",))
    report = ValidationReport(images=len(images), annotations=len(data.get("annotations", [])))
    missing = []
    images = {k: dict(v) for k, v in images.items()}  # the caller's data stays as it was
    for img in images.values():
        _check_image_entry(path, img)
        file = Path(image_root) / img["file_name"] if image_root is not None else None
        if file is not None and not file.is_file():
            missing.append(img["file_name"])
            continue
        if not img.get("width") or not img.get("height"):
            if file is None:
                raise CocoFormatError(f"{path}: image {img['id']} has no width/height and no image folder was given")
            try:
                with open_image(file) as im:
                    img["width"], img["height"] = im.size
            except ValueError as err:
                raise CocoFormatError(f"{path}: image {img['id']}: {err}") from None
    if missing:
        raise CocoFormatError(f"{path}: {len(missing)} image files missing under {image_root} (e.g. {', '.join(missing[:3])})")
    kept, used = [], set()
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"annotation {ann.get('id', i) if isinstance(ann, dict) else i}"
        if not isinstance(ann, dict):
            report.skip("not an object", where)
            continue
        if ann.get("image_id") not in images:
            report.skip("unknown image_id", f"{where}: image_id {ann.get('image_id')!r}")
            continue
        if ann.get("category_id") not in cats:
            report.skip("unknown category_id", f"{where}: category_id {ann.get('category_id')!r}")
            continue
        box = ann.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
            report.skip("malformed bbox", f"{where}: bbox {box!r}")
            continue
        if not all(math.isfinite(v) for v in box):
            report.skip("non-finite bbox", f"{where}: bbox {box!r}")
            continue
        img = images[ann["image_id"]]
        problem = _segmentation_problem(ann.get("segmentation"), img)
        if problem:
            report.skip("malformed segmentation", f"{where}: {problem}")
            continue
        x0, y0, w, h = (float(v) for v in box)
        if not (w > 0 and h > 0):
            report.skip("box without area", f"{where}: bbox {box!r}")
            continue
        cx0, cy0 = max(x0, 0.0), max(y0, 0.0)
        cx1, cy1 = min(x0 + w, float(img["width"])), min(y0 + h, float(img["height"]))
        if cx1 - cx0 < 1 or cy1 - cy0 < 1:
            report.skip("box outside its image", f"{where}: bbox {box!r} in a {img['width']}x{img['height']} image")
            continue
        ann = dict(ann)
        if (cx0, cy0, cx1, cy1) != (x0, y0, x0 + w, y0 + h):
            report.repair("boxes clipped to their image", f"{where}: bbox {box!r}")
        ann["bbox"] = [cx0, cy0, cx1 - cx0, cy1 - cy0]
        ann.setdefault("iscrowd", 0)
        if need_masks and not ann.get("segmentation"):
            report.repair("boxes used as masks (no segmentation)", where)
            ann["segmentation"] = [[cx0, cy0, cx1, cy0, cx1, cy1, cx0, cy1]]
        if "area" not in ann:
            ann["area"] = _area(ann, img)
        ann.setdefault("id", i + 1)
        kept.append(ann)
        used.add(ann["image_id"])
    if strict and report.skipped:
        raise CocoFormatError(f"{path}: {sum(report.skipped.values())} invalid annotations (strict): {report.summary()}")
    report.kept = len(kept)
    report.empty_images = len(images) - len(used)
    out = {**data, "images": list(images.values()), "annotations": kept, "categories": list(cats.values())}
    return out, report


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _segmentation_problem(seg: Any, img: dict) -> str | None:
    """What is wrong with an annotation's ``segmentation`` (polygons or RLE), or None when it is usable or absent."""
    if not seg:
        return None  # absent: the box stands in for the mask where one is needed
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
                return f"polygon {k} is not a list of numbers ({str(poly)[:60]})"
            if not all(math.isfinite(v) for v in poly):
                return f"polygon {k} has a non-finite coordinate ({str(poly)[:60]})"
            if len(poly) % 2:
                return f"polygon {k} has an odd number of coordinates ({len(poly)}; expected x, y pairs)"
            if len(poly) < 6:
                return f"polygon {k} has {len(poly) // 2} points (expected at least 3)"
        return None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not (isinstance(counts, (str, bytes)) or (isinstance(counts, list) and all(_is_int(c) for c in counts))):
            return f"RLE without counts (a string or a list of integers), got {str(counts)[:60]}"
        if not isinstance(size, (list, tuple)) or list(size) != [img["height"], img["width"]]:
            return f"RLE of size {size!r} in a {img['height']}x{img['width']} (height x width) image"
        runs = rle_counts(counts)
        pixels = img["height"] * img["width"]
        if runs is None:
            return f"RLE counts {str(counts)[:40]!r} are not a valid compressed RLE string"
        if any(r < 0 for r in runs) or sum(runs) != pixels:
            return (f"RLE counts cover {sum(runs)} pixels{' (some negative)' if any(r < 0 for r in runs) else ''}; "
                    f"expected the {img['height']}x{img['width']} = {pixels} pixels of its image")
        return None
    return f"expected polygons (a list) or an RLE (an object), got {type(seg).__name__}"


def rle_counts(counts: str | bytes | list[int]) -> list[int] | None:
    """The run lengths of an RLE's ``counts``: a list as it is, a compressed string (COCO's LEB128-like
    encoding, as pycocotools' ``rleFrString`` reads it) decoded; None for a string that is not one. Checked
    here because pycocotools reads a damaged string without an error, or crashes on it."""
    if isinstance(counts, list):
        return counts
    text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(text):
                return None  # the last number is cut off
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign extension
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _area(ann: dict, img: dict) -> float:
    seg = ann.get("segmentation")
    if seg:
        try:
            from pycocotools import mask as mask_utils

            return float(mask_utils.area(_rle(seg, img["height"], img["width"])))
        except (ValueError, TypeError, KeyError, IndexError) as err:  # a broken polygon: the box area
            log.debug("area of annotation %s from its box (%s)", ann.get("id"), err)
    return float(ann["bbox"][2] * ann["bbox"][3])


def _rle(seg, height: int, width: int):
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        return mask_utils.merge(rles)
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, height, width)
    return seg


def decode_mask(seg, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) mask of a COCO polygon list, uncompressed or compressed RLE."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_rle(seg, height, width)).astype(np.uint8)


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO file with torchvision targets (boxes x0 y0 x1 y1, labels 1..K, optional masks).

    Labels are the categories in file order (1..K; 0 is background). Training augmentation:
    random horizontal flip, and optionally vertical flip and 90-degree rotations (top-down
    imagery such as aerial photos and microscopy) and colour jitter (brightness, contrast,
    saturation by up to ``color_jitter``, hue by a quarter of it). Resizing is the detector's own (multi-scale).
    ``crop_policy`` adds the official 3x recipe's DETR-style crop to half of the images (:func:`detr_crop`).
    """

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike | None = None, *, masks: bool = False,
                 train: bool = False, hflip: float = 0.5, vflip: float = 0.0, rot90: bool = False,
                 color_jitter: float = 0.0, crop_policy: bool = False, strict: bool = False, seed: int = 0) -> None:
        self.path = Path(annotations)
        self.root = Path(images) if images is not None else self.path.parent
        raw = read_json(self.path)
        self.coco, self.report = clean_coco(raw, self.path, image_root=self.root, need_masks=masks, strict=strict)
        self.masks, self.train = masks, train
        self.hflip, self.vflip, self.rot90, self.crop_policy = hflip, vflip, rot90, crop_policy
        self.jitter = None
        if color_jitter > 0:
            from torchvision.transforms import v2

            self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(color_jitter, 0.5) / 4)
        self.categories = self.coco["categories"]
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.images = self.coco["images"]
        self.by_image: dict[Any, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in self.coco["annotations"]:
            self.by_image[ann["image_id"]].append(ann)
        self.rng = random.Random(seed)
        if self.report.skipped or self.report.repaired:
            log.warning("%s: %s", self.path, self.report.summary())

    def reseed(self, seed: int) -> None:
        """Set the augmentation's generator (the training loop seeds every image of an epoch on its own)."""
        self.rng.seed(seed)

    @property
    def class_names(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in self.categories]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """uint8 (3, H, W) image and its target (crowd annotations left out), without augmentation."""
        info = self.images[index]
        image = read_image(self.root / info["file_name"])
        h, w = image.shape[-2:]
        if (h, w) != (info["height"], info["width"]):
            raise CocoFormatError(f"{self.path}: image {info['file_name']} is {w}x{h} but the file says "
                                  f"{info['width']}x{info['height']}")
        anns = [a for a in self.by_image[info["id"]] if not a.get("iscrowd")]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                  "image_id": torch.tensor(index)}
        if self.masks:
            m = np.stack([decode_mask(a["segmentation"], h, w) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(m)
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, target = self.load(index)
        if self.train:
            image, target = self.augment(image, target)
        return image.float().div_(255), target

    def augment(self, image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Random flips (and 90-degree turns, DETR crops) of the image, boxes and masks together."""
        if self.rng.random() < self.hflip:
            image, target = _flip(image, target, horizontal=True)
        if self.crop_policy and self.rng.random() < 0.5:
            image, target = detr_crop(image, target, self.rng)
        if self.rng.random() < self.vflip:
            image, target = _flip(image, target, horizontal=False)
        if self.rot90 and self.rng.random() < 0.5:
            image, target = _transpose(image, target)
        if self.jitter is not None:
            image = self.jitter(image)
        return image, target


def _flip(image: torch.Tensor, target: dict, horizontal: bool) -> tuple[torch.Tensor, dict]:
    dim = -1 if horizontal else -2
    size = image.shape[dim]
    target = dict(target)
    b = target["boxes"].clone()
    i0, i1 = (0, 2) if horizontal else (1, 3)
    b[:, i0], b[:, i1] = size - target["boxes"][:, i1], size - target["boxes"][:, i0]
    target["boxes"] = b
    if "masks" in target:
        target["masks"] = target["masks"].flip(dim)
    return image.flip(dim), target


def detr_crop(image: torch.Tensor, target: dict, rng: random.Random, sizes=(400, 500, 600), max_size: int = 1333,
              crop=(384, 600)) -> tuple[torch.Tensor, dict]:
    """The second policy of the official 3x config's ``AutoAugment`` (from DETR), in input pixels.

    mmdet resizes the image (shorter side one of ``sizes``, longer <= ``max_size``), cuts a random
    crop of ``crop`` pixels (each side drawn in ``[min(side, lo), min(side, hi)]``), drops the boxes
    left without area, keeps the image even without boxes, then resizes to the multi-scale sizes.
    Here the crop is taken at the input resolution (the region mmdet's resized crop covers) and the
    detector's own multi-scale resize follows, one interpolation instead of two.
    """
    h, w = image.shape[-2:]
    short = rng.choice(sizes)
    factor = min(short / min(h, w), max_size / max(h, w))
    rh, rw = round(h * factor), round(w * factor)
    ch, cw = rng.randint(min(rh, crop[0]), min(rh, crop[1])), rng.randint(min(rw, crop[0]), min(rw, crop[1]))
    oy, ox = rng.randint(0, max(rh - ch, 0)), rng.randint(0, max(rw - cw, 0))
    y0, x0 = int(oy / factor), int(ox / factor)
    y1, x1 = min(h, max(y0 + 1, round((oy + ch) / factor))), min(w, max(x0 + 1, round((ox + cw) / factor)))
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=target["boxes"].dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, x1 - x0)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, y1 - y0)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target["boxes"], target["labels"] = boxes[keep], target["labels"][keep]
    if "masks" in target:
        target["masks"] = target["masks"][keep, y0:y1, x0:x1]
    return image[..., y0:y1, x0:x1], target


def _transpose(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Swap rows and columns (with the flips, this reaches all eight 90-degree turns and mirrors)."""
    target = dict(target)
    target["boxes"] = target["boxes"][:, [1, 0, 3, 2]]
    if "masks" in target:
        target["masks"] = target["masks"].transpose(-1, -2).contiguous()
    return image.transpose(-1, -2).contiguous(), target


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets (the detectors take images of different sizes)."""
    return [b[0] for b in batch], [b[1] for b in batch]
