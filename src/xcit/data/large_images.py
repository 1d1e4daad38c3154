"""Reading images too large for PIL's defaults: size from the header, pixels memory-mapped where possible.

TIFF (the format of whole-slide and aerial images) is read with tifffile: uncompressed, contiguous
files are memory-mapped as they are; compressed or tiled ones are decoded into a temporary
memory-mapped file, so the pixels never have to fit in RAM. Other formats (PNG, JPEG...) are decoded by
PIL with its decompression-bomb limit lifted for the one file the user named.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".ome.tif")


def _is_tiff(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TIFF_SUFFIXES)


@contextmanager
def _no_pixel_limit():
    """PIL refuses images above ``MAX_IMAGE_PIXELS`` (decompression-bomb guard); lift it for a named file."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels; ValueError if unreadable."""
    try:
        if _is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape = series.axes, series.shape
                return shape[axes.index("Y")], shape[axes.index("X")]
        from PIL import Image

        with _no_pixel_limit(), Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError, SyntaxError) as err:  # tifffile raises TiffFileError (a ValueError)
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - PIL's UnidentifiedImageError is an OSError, others vary
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {type(err).__name__}: {err}") from err


def read_large_image(path: str | os.PathLike, in_chans: int = 3) -> np.ndarray:
    """The pixels as a uint8 (H, W, in_chans) array, memory-mapped for TIFF files.

    Grey images are given three channels by a broadcast view (no copy) for RGB models and an alpha
    channel is dropped (a view). ValueError names what was expected for other layouts or dtypes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot read image {os.fspath(path)!r}: no such file")
    try:
        arr = _read_tiff(path) if _is_tiff(path) else _read_with_pil(path)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - decoder errors of any kind become one readable message
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {type(err).__name__}: {err}") from err
    if arr.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got {arr.dtype} pixels in {os.fspath(path)!r}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"expected a grey, RGB or RGBA image, got pixel array of shape {arr.shape} in {os.fspath(path)!r}"
        )
    colour = arr.shape[2] >= 3
    arr = arr[:, :, :3] if colour else arr[:, :, :1]  # drop alpha
    if in_chans == 3 and not colour:
        return np.broadcast_to(arr, (*arr.shape[:2], 3))
    if in_chans != arr.shape[2]:
        raise ValueError(f"expected a {'grey' if in_chans == 1 else 'colour'} image for a {in_chans}-channel model, "
                         f"got {arr.shape[2]} channels in {os.fspath(path)!r}")
    return arr


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        axes = tif.series[0].axes
    try:
        arr = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or tiled: decode into a temporary memory-mapped file
        arr = tifffile.imread(path, out="memmap")
    if axes[:1] in ("S", "C") and axes[1:] == "YX":  # planar (3, H, W): a channels-last view
        arr = arr.transpose(1, 2, 0)
    elif axes not in ("YX", "YXS"):
        raise ValueError(f"expected a 2-D grey or RGB TIFF (axes YX or YXS), got axes {axes!r} in {os.fspath(path)!r}")
    return arr


def _read_with_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with _no_pixel_limit(), Image.open(path) as img:
        if img.mode not in ("L", "RGB", "RGBA", "LA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        return np.asarray(img)
