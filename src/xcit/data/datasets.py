"""Datasets for training and evaluation.

Three kinds, all built by :func:`build_dataset`:

* ``fashion-mnist``: the standard gzipped IDX files (Debian ``dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``), decoded once into a uint8 tensor held in memory;
* ``digits``: scikit-learn's 1,797 real 8x8 digits, a fixed stratified 80/20 split, for tests;
* a folder path: ImageNet-style ``ROOT/<split>/<class>/<image>`` class folders, read lazily.

In-memory datasets are :class:`TensorImageDataset` (augmented a batch at a time by the loader);
folders are :class:`ImageFolderDataset`, whose unreadable images are skipped with a warning.
Every problem with the data (missing, empty, mis-laid) raises :class:`DataError` when the
dataset is built, before any training starts.
"""
from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_image, walk_images

log = logging.getLogger("xcit.data")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Per-channel statistics of the 60k Fashion-MNIST training images and of the digits (scaled to 0..1).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3759,)
# Where a named Fashion-MNIST is looked for, first match wins ($XCIT_FASHION_MNIST overrides).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/xcit/fashion-mnist", "data/fashion-mnist")
NAMED_DATASETS = ("fashion-mnist", "digits")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_ALIASES = {"val": ("val", "validation"), "test": ("test", "val", "validation")}


class DataError(ValueError):
    """A dataset that is missing, empty, mis-laid or does not fit the run."""


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W) with int64 targets.

    Items are ``(uint8 image (C, H, W), class index)``; the loader augments whole batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        *,
        name: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{name}: expected a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise DataError(f"{name}: {len(images)} images but {len(targets)} labels")
        if len(images) == 0:
            raise DataError(f"{name}: the dataset is empty")
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.name = name
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = images.shape[1]
        self.native_size = images.shape[-1]
        if int(self.targets.min()) < 0 or int(self.targets.max()) >= len(self.classes):
            raise DataError(f"{name}: labels outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"{type(self).__name__}({self.name}: {len(self)} images {c}x{h}x{w}, {len(self.classes)} classes)"


class SkippedImage:
    """What :class:`ImageFolderDataset` returns instead of a sample it could not read."""

    __slots__ = ("path", "reason")

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason


class ImageFolderDataset(Dataset):
    """ImageNet-style ``split_dir/<class>/<image>`` folders, loaded lazily.

    An image that cannot be decoded is logged as a warning and returned as a :class:`SkippedImage`
    (``collate_skipping`` drops it and counts it), so a corrupt file never stops an epoch.
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        *,
        in_chans: int = 3,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(split_dir)
        self.samples, self.classes = scan_image_folder(self.root, classes)
        self.targets = [t for _, t in self.samples]
        self.in_chans = in_chans
        self.transform = transform
        self.name = str(self.root)
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
        self.native_size = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = load_image(path, self.in_chans)
            if self.transform is not None:
                image = self.transform(image)
        except (ValueError, OSError) as err:  # decode errors, and PIL errors raised lazily by transforms
            log.warning("skipping unreadable image %s: %s", path, err)
            return SkippedImage(path, str(err))
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root}: {len(self)} images, {len(self.classes)} classes)"


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack ``(image, target)`` samples, dropping :class:`SkippedImage` entries.

    Returns ``(images, targets, skipped_paths)``; ``images`` may hold fewer rows than asked for.
    """
    kept = [b for b in batch if not isinstance(b, SkippedImage)]
    skipped = [b.path for b in batch if isinstance(b, SkippedImage)]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([k[0] for k in kept])
    targets = torch.tensor([k[1] for k in kept], dtype=torch.long)
    return images, targets, skipped


def scan_image_folder(
    split_dir: Path, classes: Sequence[str] | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of a ``split_dir/<class>/<image>`` tree; DataError if empty or mis-laid.

    ``classes`` fixes the class list (the training split's), so that a validation split with a
    missing class keeps the training indices; a class folder unknown to it is an error. Symbolic links
    are followed (:func:`xcit.data.images.walk_images`), but an image file reached twice, by a link loop
    or a link into another class, is an error naming both paths: never read twice or under a second label.
    """
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is not a directory")
    entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not class_dirs:
        if loose:
            raise DataError(
                f"{split_dir} holds {len(loose)} images directly (e.g. {loose[0]}) but no class folders; "
                f"expected {split_dir}/<class name>/<image>, one sub-folder per class"
            )
        raise DataError(f"{split_dir} is empty: expected one sub-folder of images per class")
    if classes is None:
        classes = class_dirs
    else:
        unknown = sorted(set(class_dirs) - set(classes))
        if unknown:
            raise DataError(
                f"{split_dir} has class folders that the training split lacks: {', '.join(unknown[:10])}"
                + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            )
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    empty = []
    first_seen: dict[str, str] = {}  # real file -> the path it was first found under
    for name in class_dirs:
        found = 0
        for path, real in walk_images(split_dir / name):
            if real in first_seen:
                raise DataError(_twice(split_dir, first_seen[real], str(path)))
            first_seen[real] = str(path)
            samples.append((str(path), index[name]))
            found += 1
        if not found:
            empty.append(name)
    if not samples:
        raise DataError(
            f"{split_dir} has {len(class_dirs)} class folders but no images in them "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    if empty:
        log.warning("%s: %d class folder(s) without images: %s", split_dir, len(empty), ", ".join(empty[:10]))
    return samples, list(classes)


def _twice(root: Path, first: str, second: str) -> str:
    """The error for an image file reached by two paths: which symbolic link leads to it again."""
    for path, other in ((second, first), (first, second)):
        current = root
        for part in Path(path).relative_to(root).parts:
            current = current / part
            if current.is_symlink():
                return (f"{path} is {other} again, through the symbolic link {current} -> {os.readlink(current)}; "
                        "expected each image once, in the folder of its one class (the link would read it twice, "
                        "or under a second label)")
    return f"{second} is {first} again; expected each image once, in the folder of its one class"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decode one IDX file (``.gz`` or raw): the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(f"{path}: header promises {dims} = {expected} bytes, file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem``, also under ``raw/`` (torchvision's layout)."""
    for base in (folder, folder / "raw", folder / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (base / name).is_file():
                return base / name
    return None


def is_idx_folder(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and find_idx_file(folder, _IDX_FILES["train"][0]) is not None


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files; DataError explaining how to get them."""
    candidates = [Path(root)] if root is not None else []
    if root is None:
        if os.environ.get("XCIT_FASHION_MNIST"):
            candidates.append(Path(os.environ["XCIT_FASHION_MNIST"]))
        candidates += [Path(p).expanduser() for p in FASHION_MNIST_DIRS]
    for folder in candidates:
        if is_idx_folder(folder):
            return folder
    raise DataError(
        "Fashion-MNIST not found (looked in " + ", ".join(str(c) for c in candidates) + "). Install it with "
        "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), or pass "
        "--data DIR where DIR holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
    )


def load_idx_dataset(folder: str | os.PathLike, split: str, classes: Sequence[str] | None = None) -> TensorImageDataset:
    """An MNIST-format dataset from IDX files; ``split`` "train" or "test" (``val`` means test)."""
    folder = Path(folder)
    kind = "train" if split == "train" else "test" if split in ("test", "val", "validation", "t10k") else None
    if kind is None:
        raise DataError(f"unknown split {split!r} for IDX data in {folder}; use train, val or test")
    paths = [find_idx_file(folder, stem) for stem in _IDX_FILES[kind]]
    missing = [stem for stem, p in zip(_IDX_FILES[kind], paths) if p is None]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(m + '.gz' for m in missing)} for the {split} split")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3:
        raise DataError(f"{paths[0]}: expected images (N, H, W), got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths[1]}: {labels.shape} labels for {len(images)} images")
    if classes is None:
        fashion = "fashion" in str(folder.resolve()).lower()
        classes = FASHION_MNIST_CLASSES if fashion else [str(i) for i in range(int(labels.max()) + 1)]
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if list(classes) == FASHION_MNIST_CLASSES else (
        (float(x.float().mean() / 255),), (float(x.float().std() / 255),))
    return TensorImageDataset(x, y, classes, name=f"fashion-mnist/{kind}", mean=mean, std=std)


def load_digits_dataset(split: str) -> TensorImageDataset:
    """scikit-learn's 8x8 digits, values 0..16 scaled to uint8; a fixed stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from err
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r} for digits; use train, val or test")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    # Stratified split with a fixed permutation: every 5th image of each class is held out.
    rng = np.random.default_rng(0)
    held_out = np.zeros(len(targets), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        held_out[idx[::5]] = True
    keep = ~held_out if split == "train" else held_out
    x = torch.from_numpy(images[keep]).unsqueeze(1)
    y = torch.from_numpy(targets[keep])
    return TensorImageDataset(x, y, [str(i) for i in range(10)], name=f"digits/{split}", mean=DIGITS_MEAN, std=DIGITS_STD)


def resolve_split_dir(root: Path, split: str) -> Path:
    """``root/split`` (``val`` also finds ``validation``); DataError naming what is there instead."""
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if subdirs and any(f.lower().endswith(IMAGE_EXTENSIONS) for d in subdirs[:3] for f in os.listdir(root / d)[:50]):
        raise DataError(
            f"{root} has no {split}/ folder but holds class folders directly ({', '.join(subdirs[:5])}...); "
            f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
        )
    raise DataError(
        f"{root} has no {split}/ folder (found: {', '.join(subdirs) or 'nothing'}); "
        f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    )


def dataset_kind(name_or_path: str | os.PathLike) -> str:
    """``"fashion-mnist"``, ``"digits"``, ``"idx"`` (an IDX folder) or ``"folder"``."""
    key = str(name_or_path).strip().lower()
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"):
        return "fashion-mnist"
    if key in ("digits", "sklearn-digits"):
        return "digits"
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(
            f"data {str(name_or_path)!r} is neither a known dataset ({', '.join(NAMED_DATASETS)}) "
            "nor an existing folder"
        )
    if not path.is_dir():
        raise DataError(f"data path {path} is a file; expected a folder with train/ and val/ class folders")
    return "idx" if is_idx_folder(path) else "folder"


def build_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    *,
    in_chans: int | None = None,
    transform: Callable | None = None,
    classes: Sequence[str] | None = None,
) -> TensorImageDataset | ImageFolderDataset:
    """A dataset by name (``fashion-mnist``, ``digits``) or path (IDX folder or class folders).

    Args:
        split: ``train``, ``val`` or ``test`` (Fashion-MNIST's val and test are its 10k test images).
        in_chans: channels to load folder images with (3 RGB, 1 grey); default 3.
        transform: per-image transform for folder datasets (in-memory ones are augmented by the loader).
        classes: the class list to index folder labels by (pass the training split's).
    Raises:
        DataError: the data is missing, empty or laid out wrongly (the message says what was expected).
    """
    kind = dataset_kind(name_or_path)
    if kind == "fashion-mnist":
        return load_idx_dataset(fashion_mnist_dir(), split, FASHION_MNIST_CLASSES)
    if kind == "digits":
        return load_digits_dataset(split)
    path = Path(name_or_path).expanduser()
    if kind == "idx":
        return load_idx_dataset(path, split)
    return ImageFolderDataset(resolve_split_dir(path, split), in_chans=in_chans or 3, transform=transform, classes=classes)
