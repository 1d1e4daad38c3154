"""Image files: which names are images, listing them, reading them, and the official evaluation preprocessing.

The one reader of every task (classification, attention, segmentation, detection) is
:func:`load_image` (a PIL image) and :func:`read_image` (its uint8 tensor), both through
:func:`open_image`, which refuses images above a pixel limit before decoding them and turns every
failure into a one-line ``ValueError`` naming the file; deeper than 8-bit images are scaled by their
bit depth (:func:`to_8bit`) everywhere. Folders are searched by :func:`walk_images` (linked folders
followed, each real folder once), and :func:`display_path` writes any file name as valid UTF-8.
"""
from __future__ import annotations

import math
import os
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# file name endings (lower case) taken for images when folders are searched
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether a file name ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def display_path(path: str | os.PathLike) -> str:
    """``path`` as printable UTF-8 text: bytes of a name that is not valid UTF-8 as ``\\xNN`` escapes and control
    characters (a newline in a name) escaped, so that every output and message that names a file stays
    valid UTF-8, one line per file."""
    text = os.fsdecode(path)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        text = text.encode("utf-8", "backslashreplace").decode("ascii")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        text = "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return text


def walk_images(folder: str | os.PathLike, *, recursive: bool = True,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Iterator[tuple[Path, str]]:
    """``(path, real path)`` of every image file in ``folder`` (and its sub-folders when ``recursive``).

    Symbolic links to folders are followed, but each real folder is walked once, so a link back up the
    tree (a loop) or a second link to the same folder lists no image twice and the walk ends. A link
    to a missing file is listed (reading it then reports it). A folder that cannot be listed is an
    ``OSError`` naming it: no image is dropped without a word.
    """
    ends = tuple(e.lower() for e in extensions)
    walked: set[str] = set()
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in walked:
            continue
        walked.add(real)
        with os.scandir(current) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        folders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                folders.append(Path(entry.path))
            elif entry.name.lower().endswith(ends):
                yield Path(entry.path), (os.path.realpath(entry.path) if entry.is_symlink()
                                         else os.path.join(real, entry.name))
        if recursive:
            pending.extend(reversed(folders))


def list_images(folder: str | os.PathLike, *, recursive: bool = True,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files in ``folder`` (and its sub-folders when ``recursive``), sorted by path (:func:`walk_images`:
    linked folders are followed, each real folder once)."""
    return sorted(path for path, _ in walk_images(folder, recursive=recursive, extensions=extensions))


def collect_images(inputs: Iterable[str | os.PathLike] = (), lists: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Image paths from files, folders (searched recursively for image extensions, sorted) and list files.

    A list file holds one path per line (blank lines and ``#`` comments skipped; ``-`` reads stdin);
    relative paths in it are relative to the current directory, and its names are read as bytes, so a
    name that is not valid UTF-8 is kept as it is. Files named explicitly are kept even when missing or
    not images, so that they are reported as errors rather than dropped.
    """
    paths: list[str] = []
    for item in inputs:
        if Path(item).is_dir():
            paths += [str(f) for f in list_images(item)]
        else:
            paths.append(os.fspath(item))
    for lst in lists:
        if os.fspath(lst) == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        else:
            if not Path(lst).is_file():
                raise FileNotFoundError(f"list file {display_path(lst)!r} does not exist (expected a text file of "
                                        "image paths, one per line)")
            data = Path(lst).read_bytes()
        lines = os.fsdecode(data.removeprefix(b"\xef\xbb\xbf")).splitlines()  # a UTF-8 byte order mark is no path
        paths += [s for line in lines if (s := line.strip()) and not s.startswith("#")]
    return paths


def pixel_limit() -> int | None:
    """The most pixels an image may have to be read by :func:`load_image`: PIL's ``Image.MAX_IMAGE_PIXELS``
    (89,478,485 unless changed; None: no limit). Larger images are refused as possible decompression bombs."""
    return Image.MAX_IMAGE_PIXELS


@contextmanager
def _pil_limit_lifted() -> Iterator[None]:
    """PIL refuses images above ``Image.MAX_IMAGE_PIXELS`` when opening them; lift that for one call whose
    caller checks the size itself (:func:`open_image` with a larger limit, reading a header)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


_DEFAULT = object()
# what PIL raises for damaged or unsupported data besides OSError (truncated, bad headers, odd layouts)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, EOFError, struct.error, zlib.error, IndexError,
                  TypeError, ValueError, MemoryError)


@contextmanager
def open_image(source: str | os.PathLike | BinaryIO, *, name: str | os.PathLike | None = None,
               max_pixels: int | None | object = _DEFAULT) -> Iterator[Image.Image]:
    """The PIL image of a file (or an open binary file, named by ``name`` in messages), its header read and its size
    checked before any pixel is decoded: the one door through which every image of the package is read.

    Any failure, in opening or in decoding inside the ``with`` block, is a ``ValueError`` that names the file
    and says what was wrong: missing, not an image, damaged, or larger than ``max_pixels`` (default
    :func:`pixel_limit`; None: any size), which would otherwise allocate memory for every pixel a
    small file claims (a decompression bomb).
    """
    label = display_path(name if name is not None else source if isinstance(source, (str, os.PathLike)) else "<data>")
    limit = pixel_limit() if max_pixels is _DEFAULT else max_pixels
    guard = Image.MAX_IMAGE_PIXELS
    try:
        if limit is None or (guard is not None and limit > guard):
            with _pil_limit_lifted():
                img = Image.open(source)
        else:
            with warnings.catch_warnings():  # PIL warns above its limit and fails at twice it; the check is below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(source)
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        count = f"{int(found[1]):,} pixels" if found else "more pixels than PIL reads"
        raise ValueError(f"cannot read image {label!r}: {count}, above the limit of {limit:,} "
                         f"{_LIMIT_HINT}") from None
    except FileNotFoundError:
        raise ValueError(f"cannot read image {label!r}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"cannot read image {label!r}: a folder, not an image file") from None
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot read image {label!r}: {_reason(err)}") from err
    with img:
        width, height = img.size
        if limit is not None and width * height > limit:
            raise ValueError(f"cannot read image {label!r}: {width}x{height} = {width * height:,} pixels, above the "
                             f"limit of {limit:,} {_LIMIT_HINT}")
        if width < 1 or height < 1:
            raise ValueError(f"cannot read image {label!r}: {width}x{height} pixels (expected at least 1x1)")
        try:
            yield img
        except _DECODE_ERRORS as err:
            if isinstance(err, ValueError) and str(err).startswith("cannot read image"):
                raise
            raise ValueError(f"cannot read image {label!r}: {_reason(err)}") from err


_LIMIT_HINT = ("(PIL.Image.MAX_IMAGE_PIXELS: a decompression bomb, or an image too large to read whole; "
               "`xcit predict` / `attention` / `embed` stream large TIFFs)")


def _reason(err: BaseException) -> str:
    """What a decoder said, on one line; its type where the text alone says little."""
    text = " ".join(str(err).split())
    if isinstance(err, UnidentifiedImageError) or text.startswith("cannot identify image file"):
        return "not an image PIL can read (unknown format or damaged header)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return text if isinstance(err, (OSError, SyntaxError)) and text else f"{type(err).__name__}: {text}".rstrip(": ")


def load_image(path: str | os.PathLike | BinaryIO, in_chans: int = 3, *, name: str | os.PathLike | None = None,
               max_pixels: int | None | object = _DEFAULT) -> Image.Image:
    """Open an image as RGB (``in_chans=3``) or greyscale (``in_chans=1``); ValueError if unreadable or larger than
    ``max_pixels`` (:func:`open_image`).

    Greyscale images deeper than 8 bits are scaled to 8 bits first (:func:`to_8bit`).
    """
    with open_image(path, name=name, max_pixels=max_pixels) as img:
        img.load()
        return to_8bit(img).convert("L" if in_chans == 1 else "RGB")


def read_image(path: str | os.PathLike, *, max_pixels: int | None | object = _DEFAULT) -> torch.Tensor:
    """uint8 (3, H, W) tensor of an image file (:func:`load_image` as RGB); ValueError if unreadable."""
    return torch.from_numpy(np.array(load_image(path, in_chans=3, max_pixels=max_pixels))).permute(2, 0, 1).contiguous()


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer, or float, greyscale image as 8-bit ``L``, scaled by its bit depth.

    PIL's ``convert`` clips such images to 0..255 instead (a 16-bit PNG turns almost white). The depth
    is the TIFF ``BitsPerSample`` where given, 16 for PNG / PGM ``I`` images (those formats stop at 16
    bits), else 32 (signed: negatives become 0). Float images are read as 0..1, or as 0..255 when their
    maximum is above 1. Other modes are returned unchanged.
    """
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":
        bits = _int_bits(img)
        top = float((1 << bits) - 1 if bits < 32 else (1 << 31) - 1)
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
    else:
        return img
    values = np.nan_to_num(np.asarray(img, dtype=np.float64)) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _int_bits(img: Image.Image) -> int:
    if hasattr(img, "tag_v2"):  # TIFF
        bits = img.tag_v2.get(258, 32)
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 16 if img.format in ("PNG", "PPM") else 32


def eval_transform(
    img_size: int | Sequence[int] = 224,
    crop_pct: float = 1.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The official evaluation pipeline: bicubic resize of the short side to size / crop_pct, centre crop.

    ``crop_pct=1.0`` is the paper's "full crop". Returns a float tensor normalised by ``mean``/``std``.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    resize = math.floor(min(size) / crop_pct) if size[0] == size[1] else tuple(math.floor(s / crop_pct) for s in size)
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (from torchvision's bundled metadata, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
