"""Reading images too large for PIL's defaults: size from the header, pixels memory-mapped where possible.

TIFF (the format of whole-slide and aerial images) is read with tifffile: uncompressed, contiguous
files are memory-mapped as they are; compressed or tiled ones are decoded into a temporary
memory-mapped file, so the pixels never have to fit in RAM. Other formats (PNG, JPEG...) are decoded by
PIL whole, above PIL's own decompression-bomb limit for the one file the user named but never above
:data:`MAX_DECODED_PIXELS` or the memory available (checked from the header, before decoding).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .images import display_path, open_image, to_8bit

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".ome.tif")


#: The most pixels a large image in a format that cannot be memory-mapped (PNG, JPEG...) may have: it is decoded
#: whole into memory (about 3 GB for RGB at this limit). A tiled or plain TIFF has no such limit.
MAX_DECODED_PIXELS = 1 << 30


def _is_tiff(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TIFF_SUFFIXES)


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (``MemAvailable``), None where it cannot say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels; ValueError if unreadable."""
    try:
        if _is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape = series.axes, series.shape
                return shape[axes.index("Y")], shape[axes.index("X")]
    except (OSError, ValueError, SyntaxError) as err:  # tifffile raises TiffFileError (a ValueError)
        raise ValueError(f"cannot read image {display_path(path)!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - tifffile's errors vary with the damage
        raise ValueError(f"cannot read image {display_path(path)!r}: {type(err).__name__}: {err}") from err
    with open_image(path, max_pixels=None) as img:  # the header only: no pixel is decoded
        return img.height, img.width


def read_large_image(path: str | os.PathLike, in_chans: int = 3) -> np.ndarray:
    """The pixels as a uint8 (H, W, in_chans) array, memory-mapped for TIFF files.

    Grey images are given three channels by a broadcast view (no copy) for RGB models and an alpha
    channel is dropped (a view); grey images deeper than 8 bits are scaled by their bit depth, as
    :func:`xcit.data.images.to_8bit` scales them for every other reader (a copy, in row blocks). Formats that cannot be memory-mapped are refused above
    :data:`MAX_DECODED_PIXELS` or above the memory available, and a compressed TIFF above the free
    space of the temporary folder it is decoded into, before anything is allocated. ValueError names
    what was expected for other layouts or dtypes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot read image {display_path(path)!r}: no such file")
    try:
        arr = _read_tiff(path) if _is_tiff(path) else _read_with_pil(path)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - decoder errors of any kind become one readable message
        raise ValueError(f"cannot read image {display_path(path)!r}: {type(err).__name__}: {err}") from err
    if arr.dtype != np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)):
        arr = grey_to_8bit(arr.reshape(arr.shape[:2]), _bits(path, arr.dtype))  # as to_8bit does for PIL images
    return conform_channels(arr, in_chans, path)


def conform_channels(arr: np.ndarray, in_chans: int, path: str | os.PathLike) -> np.ndarray:
    """A uint8 (H, W) or (H, W, 1..4) array as (H, W, in_chans), the policy of :func:`read_large_image` (shared
    with the region reads of :mod:`xcit.data.slides`): grey broadcast to RGB (a view), alpha dropped (a view);
    ValueError naming ``path`` for other dtypes, layouts or channel counts."""
    if arr.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image (or deeper greyscale), got {arr.dtype} pixels of shape {arr.shape} "
                         f"in {display_path(path)!r}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"expected a grey, RGB or RGBA image, got pixel array of shape {arr.shape} in {display_path(path)!r}"
        )
    colour = arr.shape[2] >= 3
    arr = arr[:, :, :3] if colour else arr[:, :, :1]  # drop alpha
    if in_chans == 3 and not colour:
        return np.broadcast_to(arr, (*arr.shape[:2], 3))
    if in_chans != arr.shape[2]:
        raise ValueError(f"expected a {'grey' if in_chans == 1 else 'colour'} image for a {in_chans}-channel model, "
                         f"got {arr.shape[2]} channels in {display_path(path)!r}")
    return arr


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape, dtype = series.axes, series.shape, series.dtype
    try:
        arr = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or tiled: decode into a temporary memory-mapped file
        needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
        scratch = tempfile.gettempdir()
        free = shutil.disk_usage(scratch).free
        if needed > free:
            raise ValueError(
                f"cannot read image {display_path(path)!r}: decoding this compressed TIFF needs {needed / 1e9:.1f} GB "
                f"in {scratch}, which has {free / 1e9:.1f} GB free; set TMPDIR to a larger disk, or store the image "
                "uncompressed (then it is memory-mapped in place)") from None
        arr = tifffile.imread(path, out="memmap")
    if axes[:1] in ("S", "C") and axes[1:] == "YX":  # planar (3, H, W): a channels-last view
        arr = arr.transpose(1, 2, 0)
    elif axes not in ("YX", "YXS"):
        raise ValueError(f"expected a 2-D grey or RGB TIFF (axes YX or YXS), got axes {axes!r} in "
                         f"{display_path(path)!r}")
    return arr


def _bits(path: Path, dtype: np.dtype) -> int:
    """The bit depth of a deep grey TIFF: its ``BitsPerSample`` where given, else its dtype's."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            bits = tif.pages[0].bitspersample
        return int(bits)
    except Exception:  # noqa: BLE001 - a PIL format, or an odd header: the dtype says enough
        return np.dtype(dtype).itemsize * 8


def grey_to_8bit(arr: np.ndarray, bits: int, rows: int = 1024, peak: float | None = None) -> np.ndarray:
    """A deep greyscale (H, W) array as uint8, scaled by its bit depth as :func:`xcit.data.images.to_8bit` scales a
    PIL image (unsigned and signed integers by ``bits``, negatives to 0; floats as 0..1, or 0..255 above 1), a block of
    ``rows`` at a time into memory, or into a temporary memory-mapped file above 512 MB (a memory-mapped slide).
    ``peak``: the largest value of the whole image where ``arr`` is a region of it (floats), so that every region
    of one image is scaled alike; by default the largest value of ``arr``."""
    h, w = arr.shape
    if arr.dtype.kind == "f":
        peak = float(np.nanmax(arr, initial=0.0)) if peak is None else peak
        top = 1.0 if peak <= 1.0 else 255.0
    elif arr.dtype.kind in "ui":
        top = float((1 << min(bits, 31 if arr.dtype.kind == "i" else 32)) - 1)
    else:
        raise ValueError(f"expected integer or floating-point grey pixels, got {arr.dtype}")
    if h * w > (512 << 20):  # an unnamed temporary file: gone with the last reference to the array
        out = np.memmap(tempfile.TemporaryFile(), dtype=np.uint8, mode="w+", shape=(h, w))
    else:
        out = np.empty((h, w), np.uint8)
    for start in range(0, h, rows):
        block = np.nan_to_num(np.asarray(arr[start:start + rows], dtype=np.float64)) * (255.0 / top)
        out[start:start + rows] = np.clip(np.rint(block), 0, 255)
    return out


def _read_with_pil(path: Path) -> np.ndarray:
    memory = available_memory()
    with open_image(path, max_pixels=None) as img:
        pixels = img.width * img.height
        needed = pixels * max(len(img.getbands()), 1) * (2 if img.mode.startswith("I;16") else 1)
        if pixels > MAX_DECODED_PIXELS or (memory is not None and needed > memory):
            room = f", {memory / 1e9:.1f} GB available" if memory is not None else ""
            raise ValueError(
                f"cannot read image {display_path(path)!r}: {img.width}x{img.height} = {pixels:,} pixels to decode "
                f"whole into memory ({needed / 1e9:.1f} GB{room}; the limit is {MAX_DECODED_PIXELS:,} pixels): a "
                "decompression bomb, or an image to store as a TIFF, which is memory-mapped instead")
        img.load()
        img = to_8bit(img)
        if img.mode not in ("L", "RGB", "RGBA", "LA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        return np.asarray(img)
