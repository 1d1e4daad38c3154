"""Whole-slide images read a region at a time, and dense label maps written a band at a time.

A gigapixel image (a pyramidal whole-slide TIFF, OME-TIFF or SVS file, or a georeferenced aerial GeoTIFF) never has
to fit in memory: :func:`open_slide` opens one resolution level of it as a :class:`SlideLevel`, a lazy (H, W, C)
uint8 array whose regions decode only the tiles or strips of the file they touch, with what the file states of its
scale (microns per pixel) and of its place on the map (:class:`GeoReference`). Pixels follow the policy of
:func:`xcit.data.large_images.read_large_image` (grey to RGB, alpha dropped, deep grey scaled by its bit depth),
which also reads every other format (PNG, JPEG...) whole, behind the same interface.

:func:`write_label_tiff` writes a prediction as a tiled, compressed, pyramidal TIFF from the row bands the model
produces, so that the label map is never held whole either; like every output of the package it is written through
a temporary file and never replaces a file unasked (:mod:`xcit.data.outputs`).
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import display_path
from .large_images import conform_channels, grey_to_8bit, image_size, read_large_image
from .outputs import atomic_write, claim_file

#: The first bytes of a classic or BigTIFF file, little- or big-endian (SVS, OME-TIFF, NDPI... start so too).
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

#: Decoded tiles kept per open level, so that overlapping windows of a tiled forward decode each tile once.
SEGMENT_CACHE_BYTES = 64 << 20

# microns per TIFF ResolutionUnit (2 inch, 3 centimetre; 4 and 5 are tifffile's millimetre and micrometre)
_UM_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
# microns per OME UnitsLength (PhysicalSizeX/YUnit; the default is the micrometre)
_UM_PER_OME_UNIT = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3,
                    "pm": 1e-6, "Å": 1e-4, "in": 25400.0, "ft": 304800.0, "thou": 25.4}
# GeoTIFF ProjLinearUnitsGeoKey codes (EPSG units): name and metres per unit
_LINEAR_UNITS = {9001: ("metre", 1.0), 9002: ("foot", 0.3048), 9003: ("US survey foot", 1200 / 3937),
                 9036: ("kilometre", 1000.0)}
_METRES_PER_UNIT = dict(_LINEAR_UNITS.values())
# GeoKeyDirectoryTag keys
_RASTER_TYPE, _GEOGRAPHIC_CRS, _PROJECTED_CRS, _PROJ_LINEAR_UNITS = 1025, 2048, 3072, 3076
_USER_DEFINED = 32767


# ------------------------------------------------------------------------------------------------ georeferencing
@dataclass(frozen=True)
class GeoReference:
    """Where a raster lies on the map, as GDAL reads a GeoTIFF.

    ``transform`` is the affine (x0, dx, rx, y0, ry, dy) taking pixel (column, row) to map coordinates,
    X = x0 + col * dx + row * rx and Y = y0 + col * ry + row * dy, (0, 0) being the top-left corner of the top-left
    pixel; ``crs`` is "EPSG:<code>" where the file names a coded CRS; ``unit`` is the linear unit of a projected
    CRS ("metre" unless the file states another), "degree" for a geographic one, None where unknown.
    """

    transform: tuple[float, float, float, float, float, float]
    crs: str | None
    unit: str | None = None

    def scaled(self, fy: float, fx: float) -> GeoReference:
        """The reference of the same raster resampled to pixels ``fx`` times wider and ``fy`` times taller."""
        x0, dx, rx, y0, ry, dy = self.transform
        return GeoReference((x0, dx * fx, rx * fy, y0, ry * fx, dy * fy), self.crs, self.unit)

    @property
    def pixel_area(self) -> float:
        """The area of one pixel in map units squared."""
        _, dx, rx, _, ry, dy = self.transform
        return abs(dx * dy - rx * ry)


def pixel_to_map(georef: GeoReference, x: Any, y: Any) -> tuple[Any, Any]:
    """Map coordinates (X, Y) of pixel position (``x`` = column, ``y`` = row; floats or arrays, 0.5 the centre of
    the first pixel) under ``georef``."""
    x0, dx, rx, y0, ry, dy = georef.transform
    return x0 + x * dx + y * rx, y0 + x * ry + y * dy


def _geokeys(tags: Any) -> dict[int, int]:
    """The short-valued keys of a GeoKeyDirectoryTag (those whose value is in the directory itself)."""
    tag = tags.get(34735)
    values = [int(v) for v in tag.value] if tag is not None else []
    keys = {}
    for k in range(min(values[3] if len(values) >= 4 else 0, (len(values) - 4) // 4)):
        key, location, _, value = values[4 + 4 * k:8 + 4 * k]
        if location == 0:
            keys[key] = value
    return keys


def _read_georef(page: Any) -> GeoReference | None:
    """The GeoTIFF reference of ``page``: ModelTransformationTag, else ModelPixelScaleTag with the first
    ModelTiepointTag; None where neither is there (or only ground control points, which no affine map is)."""
    tags = page.tags
    try:
        if 34264 in tags:
            m = [float(v) for v in tags[34264].value]
            transform = (m[3], m[0], m[1], m[7], m[4], m[5])
        elif 33550 in tags and 33922 in tags:
            sx, sy = (float(v) for v in tags[33550].value[:2])
            i, j, _, x, y, _ = (float(v) for v in tags[33922].value[:6])
            transform = (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
        else:
            return None
    except (ValueError, TypeError, IndexError):  # a malformed tag: no reference rather than a wrong one
        return None
    if not all(math.isfinite(v) for v in transform):
        return None
    keys = _geokeys(tags)
    if keys.get(_RASTER_TYPE) == 2:  # PixelIsPoint: the tiepoint is a pixel's centre; GDAL moves it to the corner
        x0, dx, rx, y0, ry, dy = transform
        transform = (x0 - 0.5 * (dx + rx), dx, rx, y0 - 0.5 * (ry + dy), ry, dy)
    crs, unit = None, None
    if keys.get(_PROJECTED_CRS, _USER_DEFINED) not in (0, _USER_DEFINED):
        crs = f"EPSG:{keys[_PROJECTED_CRS]}"
        unit = _LINEAR_UNITS.get(keys.get(_PROJ_LINEAR_UNITS, 9001), (None, None))[0]
    elif keys.get(_GEOGRAPHIC_CRS, _USER_DEFINED) not in (0, _USER_DEFINED):
        crs, unit = f"EPSG:{keys[_GEOGRAPHIC_CRS]}", "degree"
    return GeoReference(transform, crs, unit)


# ------------------------------------------------------------------------------------------------ pixel size
def parse_aperio_mpp(description: str) -> float | None:
    """The microns per pixel of an Aperio SVS ImageDescription (``...|MPP = 0.4990|...``), None where absent."""
    found = re.search(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", description or "")
    value = float(found.group(1)) if found else 0.0
    return value if math.isfinite(value) and value > 0 else None


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    """(y, x) microns per pixel of the first image of OME-XML, from PhysicalSizeY/X and their units."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("Y", "X"):
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        try:
            size = float(value) * _UM_PER_OME_UNIT[unit] if value is not None else None
        except (ValueError, KeyError):  # a unit of no length (pixel, reference frame) or a malformed value
            size = None
        sizes.append(size if size is not None and math.isfinite(size) and size > 0 else None)
    y, x = sizes[0] or sizes[1], sizes[1] or sizes[0]  # one axis given: square pixels
    return (y, x) if y and x else None


def _tiff_mpp(tif: Any, page: Any) -> tuple[float, float] | None:
    """(y, x) microns per pixel of the full-resolution ``page`` as the file states it: the Aperio description,
    else the OME-XML, else XResolution / YResolution in a unit of length."""
    if tif.is_svs:
        mpp = parse_aperio_mpp(page.description)
        if mpp is not None:
            return mpp, mpp
    if tif.is_ome and tif.ome_metadata:
        found = _ome_mpp(tif.ome_metadata)
        if found is not None:
            return found
    um = _UM_PER_RESOLUTION_UNIT.get(int(page.resolutionunit))
    try:
        xres, yres = (float(v) for v in page.resolution)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if um is None or not (xres > 0 and yres > 0 and math.isfinite(xres) and math.isfinite(yres)):
        return None
    if xres == yres == 1.0:  # the placeholder writers put when they know no pixel size (1 pixel per inch)
        return None
    return um / yres, um / xres


# ------------------------------------------------------------------------------------------------ readers
def _is_tiff_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def _segment_grid(page: Any) -> tuple[int, int, int, int, int]:
    """(segment height, segment width, segment rows, segment columns, sample planes) of a TIFF page."""
    height, width = page.imagelength, page.imagewidth
    if page.is_tiled:
        sh, sw = page.tilelength, page.tilewidth
    else:
        sh, sw = min(page.rowsperstrip or height, height), width
    planes = page.samplesperpixel if page.planarconfig == 2 else 1
    return sh, sw, math.ceil(height / sh), math.ceil(width / sw), planes


def _segment_name(page: Any, index: int) -> str:
    """``tile (row, column)`` or ``strip row`` (with its sample plane, for planar files) of segment ``index``."""
    _, _, rows, cols, planes = _segment_grid(page)
    plane, rest = divmod(index, rows * cols)
    row, col = divmod(rest, cols)
    name = f"tile ({row}, {col})" if page.is_tiled else f"strip {row}"
    return name + (f" of sample plane {plane}" if planes > 1 else "")


def _check_segments(page: Any, path: Path, level: int, file_size: int) -> None:
    """ValueError naming the first tile or strip of ``page`` that is not all in the file (a truncated copy), or a
    segment table that does not fit the image."""
    _, _, rows, cols, planes = _segment_grid(page)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if len(offsets) != rows * cols * planes or len(counts) != len(offsets):
        raise ValueError(f"cannot read {display_path(path)!r}: level {level} lists {len(offsets)} tiles or strips "
                         f"({len(counts)} byte counts) where its size needs {rows * cols * planes}: a damaged file")
    ends = np.where(counts > 0, offsets + counts, 0)
    beyond = np.flatnonzero(ends > file_size)
    if len(beyond):
        first = int(beyond[0])
        raise ValueError(f"cannot read {display_path(path)!r}: truncated: {_segment_name(page, first)} of level "
                         f"{level} ends at byte {int(ends[first])}, the file has {file_size} bytes")


def _probe(codec: Any, data: Any) -> None:
    """KeyError where ``codec`` cannot run here: tifffile lists some codecs (zstd) whose module is missing."""
    try:
        codec(data)
    except ImportError as err:
        raise KeyError(f"its codec needs the module {err.name!r}, which is not installed") from err
    except Exception:  # noqa: BLE001, S110 - bad data (empty bytes) is expected: the codec runs
        pass


def _check_decodable(page: Any, path: Path, level: int) -> None:
    """ValueError at open for a compression or predictor this installation cannot decode (JPEG, LZW or JPEG 2000
    need the imagecodecs package), instead of at the first region read."""
    from tifffile import COMPRESSION, TIFF

    try:
        if page.compression != 1:
            _probe(TIFF.DECOMPRESSORS[page.compression], b"")
        if page.predictor != 1:
            TIFF.UNPREDICTORS[page.predictor]
    except KeyError as err:
        try:
            name = COMPRESSION(page.compression).name
        except ValueError:
            name = str(page.compression)
        raise ValueError(f"cannot read {display_path(path)!r}: level {level} is {name}-compressed (predictor "
                         f"{page.predictor}), which this installation cannot decode ({err.args[0]}); "
                         "install imagecodecs (pip install imagecodecs), or convert the file to a deflate-compressed "
                         "or uncompressed TIFF") from None
    if page.dtype is None:
        raise ValueError(f"cannot read {display_path(path)!r}: level {level} has {page.bitspersample}-bit samples of "
                         f"format {page.sampleformat}, which cannot be read")
    if page.is_subsampled and page.compression not in (6, 7, 33007, 34892):
        raise ValueError(f"cannot read {display_path(path)!r}: level {level} has chroma-subsampled YCbCr pixels "
                         "without JPEG compression, which cannot be read")


class _TiffLevel:
    """Regions of one TIFF page, decoded a tile or strip at a time from the open file (an LRU cache of decoded
    segments spares the overlaps of neighbouring windows); uncompressed strips are read a row at a time."""

    def __init__(self, tif: Any, page: Any, path: Path, level: int, in_chans: int) -> None:
        self.path, self.level, self.in_chans = path, level, in_chans
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.samples = int(page.samplesperpixel)
        self.segments_read = 0
        self._tif, self._page = tif, page
        self._grid = _segment_grid(page)
        self._offsets = [int(v) for v in page.dataoffsets]
        self._counts = [int(v) for v in page.databytecounts]
        self._dtype = np.dtype(page.dtype)
        self._bits = int(page.bitspersample)
        self._decode = page.decode  # tifffile's decoder for this page: (bytes, index) -> (segment, place, shape)
        self._rows_direct = (not page.is_tiled and page.compression == 1 and page.predictor == 1
                             and page.fillorder == 1 and self._bits in (8, 16, 32, 64))
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._peak: float | None = None
        self._convert(np.zeros((1, 1, self.samples), self._dtype), peak=1.0)  # a layout or dtype error: now

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()

    def region(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        peak = self._level_peak() if self._dtype.kind == "f" and self.samples == 1 else None
        return self._convert(self._raw(r0, r1, c0, c1), peak)

    def _convert(self, raw: np.ndarray, peak: float | None) -> np.ndarray:
        arr = raw
        if raw.dtype != np.uint8 and raw.shape[2] == 1:  # deep grey, scaled by bit depth as read_large_image does
            arr = grey_to_8bit(raw[:, :, 0], self._bits, peak=peak)
        return np.ascontiguousarray(conform_channels(arr, self.in_chans, self.path))

    def _level_peak(self) -> float:
        """The largest value of a floating-point grey level (its 8-bit scale depends on it), read once in bands."""
        if self._peak is None:
            step = max(self._grid[0], (32 << 20) // max(1, self.width * self._dtype.itemsize))
            self._peak = max((float(np.nanmax(self._raw(y, min(y + step, self.height), 0, self.width), initial=0.0))
                              for y in range(0, self.height, step)), default=0.0)
        return self._peak

    def _raw(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The stored samples of rows r0:r1, columns c0:c1 as (h, w, samples); segments the file omits are 0."""
        out = np.zeros((r1 - r0, c1 - c0, self.samples), self._dtype)
        if r1 <= r0 or c1 <= c0:
            return out
        sh, sw, _, _, planes = self._grid
        for plane in range(planes):
            target = out[:, :, plane:plane + 1] if planes > 1 else out
            for row in range(r0 // sh, (r1 - 1) // sh + 1):
                if self._rows_direct:
                    y0, y1 = max(r0, row * sh), min(r1, row * sh + sh)
                    target[y0 - r0:y1 - r0] = self._strip_rows(plane, row, y0, y1)[:, c0:c1]
                    continue
                for col in range(c0 // sw, (c1 - 1) // sw + 1):
                    segment = self._segment(plane, row, col)
                    if segment is None:
                        continue
                    top, left = row * sh, col * sw
                    y0, y1 = max(r0, top), min(r1, top + segment.shape[0])
                    x0, x1 = max(c0, left), min(c1, left + segment.shape[1])
                    if y1 > y0 and x1 > x0:
                        target[y0 - r0:y1 - r0, x0 - c0:x1 - c0] = segment[y0 - top:y1 - top, x0 - left:x1 - left]
        return out

    def _index(self, plane: int, row: int, col: int) -> int:
        _, _, rows, cols, _ = self._grid
        return (plane * rows + row) * cols + col

    def _read(self, offset: int, count: int) -> bytes:
        with self._lock:
            handle = self._tif.filehandle
            handle.seek(offset)
            self.segments_read += 1
            return handle.read(count)

    def _corrupt(self, index: int, err: BaseException) -> ValueError:
        kind = type(err).__qualname__ if type(err).__module__ == "builtins" else \
            f"{type(err).__module__.rpartition('.')[2]}.{type(err).__qualname__}"  # zlib.error, tifffile.TiffFileError
        what = err if type(err) is ValueError else f"{kind}: {err}"
        return ValueError(f"cannot read {display_path(self.path)!r}: {_segment_name(self._page, index)} of level "
                          f"{self.level} is corrupt or truncated ({what})")

    def _strip_rows(self, plane: int, row: int, y0: int, y1: int) -> np.ndarray:
        """Rows y0:y1 of an uncompressed strip, read alone (a one-strip image is read a region at a time)."""
        index = self._index(plane, row, 0)
        offset, count = self._offsets[index], self._counts[index]
        channels = self.samples if self._grid[4] == 1 else 1
        dtype = self._dtype.newbyteorder(self._tif.byteorder)
        row_bytes = self.width * channels * dtype.itemsize
        start, size = (y0 - row * self._grid[0]) * row_bytes, (y1 - y0) * row_bytes
        if count == 0:
            return np.zeros((y1 - y0, self.width, channels), self._dtype)
        data = self._read(offset + start, size) if start + size <= count else b""
        if len(data) != size:
            err = ValueError(f"rows {y0}..{y1 - 1} need bytes {offset + start}..{offset + start + size - 1}, "
                             f"the strip has {count} bytes from {offset}")
            raise self._corrupt(index, err)
        return np.frombuffer(data, dtype).reshape(y1 - y0, self.width, channels).astype(self._dtype)

    def _segment(self, plane: int, row: int, col: int) -> np.ndarray | None:
        """The decoded tile or strip (h, w, contiguous samples), None where the file leaves it out (sparse)."""
        index = self._index(plane, row, col)
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        offset, count = self._offsets[index], self._counts[index]
        if count == 0 or offset == 0:
            return None
        data = self._read(offset, count)
        try:
            if len(data) != count:
                raise ValueError(f"the file ends {count - len(data)} bytes before its end")
            segment = self._decode(data, index)[0]
            if segment is None or segment.ndim != 4:
                raise ValueError("the decoder returned no pixels")
        except Exception as err:  # zlib, tifffile and codec errors alike: one message naming the tile
            raise self._corrupt(index, err) from err
        segment = segment[0]  # depth 1: (h, w, samples)
        with self._lock:
            self._cache[index] = segment
            self._cached_bytes += segment.nbytes
            while self._cached_bytes > SEGMENT_CACHE_BYTES and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return segment


class _ArrayLevel:
    """An image read whole (a format without tiles: PNG, JPEG...), behind the interface of :class:`_TiffLevel`."""

    segments_read = 0

    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr
        self.height, self.width = arr.shape[:2]

    def close(self) -> None:
        self._arr = np.zeros((0, 0, self._arr.shape[2]), np.uint8)

    def region(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return np.ascontiguousarray(self._arr[r0:max(r0, r1), c0:max(c0, c1)])


class SlideLevel:
    """One resolution level of a slide as a lazy (H, W, C) uint8 array; see :func:`open_slide`.

    ``slide[r0:r1]`` or ``slide[r0:r1, c0:c1]`` (steps of 1; bounds clipped as numpy clips them) returns that region
    as a new contiguous (h, w, C) array, decoding only the tiles or strips of the file it touches: the level is never
    held whole. ``levels`` lists the (H, W) of every level of the file, ``mpp`` is this level's (y, x) microns per
    pixel where the file states it, ``georef`` its :class:`GeoReference`; ``segments_read`` counts the tiles or
    strips read from the file so far. Close it (or use it as a context manager) to release the file.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, path: Path, level: int, levels: list[tuple[int, int]], mpp: tuple[float, float] | None,
                 georef: GeoReference | None, in_chans: int, reader: _TiffLevel | _ArrayLevel) -> None:
        self.path, self.level, self.levels, self.mpp, self.georef = path, level, levels, mpp, georef
        self.in_chans = in_chans
        self.shape = (reader.height, reader.width, in_chans)
        self._reader: _TiffLevel | _ArrayLevel | None = reader

    @property
    def segments_read(self) -> int:
        return self._reader.segments_read if self._reader is not None else 0

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SlideLevel({display_path(self.path)!r}, level={self.level}, shape={self.shape}, mpp={self.mpp})"

    def __getitem__(self, key: slice | tuple[slice, ...]) -> np.ndarray:
        if self._reader is None:
            raise ValueError(f"cannot read {display_path(self.path)!r}: the slide is closed")
        parts = key if isinstance(key, tuple) else (key,)
        if len(parts) == 3 and parts[2] in (slice(None), Ellipsis):  # img[r0:r1, c0:c1, :]
            parts = parts[:2]
        if not 1 <= len(parts) <= 2 or not all(isinstance(p, slice) for p in parts):
            raise TypeError(f"expected a row slice or a (row slice, column slice) tuple, got {key!r}")
        rows, cols = (*parts, slice(None))[:2]
        if rows.step not in (None, 1) or cols.step not in (None, 1):
            raise ValueError(f"expected slices with a step of 1, got {key!r}: read the region, then subsample it")
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        return self._reader.region(r0, max(r0, r1), c0, max(c0, c1))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> SlideLevel:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _level_list(levels: list[tuple[int, int]]) -> str:
    return ", ".join(f"{k} ({w} x {h})" for k, (h, w) in enumerate(levels))


def _pick_level(path: Path, levels: list[tuple[int, int]], level: int | None, mpp: float | None,
                mpps: list[tuple[float, float]] | None) -> int:
    """The index of the level asked for by index or by nearest microns per pixel (ties: the finer level)."""
    if level is not None and mpp is not None:
        raise ValueError(f"give a level or a pixel size (mpp) to read from {display_path(path)!r}, not both")
    if mpp is not None:
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"expected a positive number of microns per pixel, got mpp={mpp!r}")
        if mpps is None:
            raise ValueError(f"cannot pick a level of {display_path(path)!r} by pixel size: the file states none "
                             "(no SVS MPP, OME PhysicalSizeX/Y or TIFF resolution in centimetres or inches); "
                             "give a level instead")
        return min(range(len(levels)), key=lambda k: (round(abs(math.log(math.sqrt(mpps[k][0] * mpps[k][1]) / mpp)),
                                                            9), k))
    level = 0 if level is None else level
    if not (isinstance(level, int) and 0 <= level < len(levels)):
        count = f"{len(levels)} level{'s' if len(levels) > 1 else ''}"
        raise ValueError(f"level {level} does not exist in {display_path(path)!r}: it has {count} (width x height): "
                         f"{_level_list(levels)}")
    return level


def open_slide(path: str | os.PathLike, level: int | None = None, mpp: float | None = None,
               in_chans: int = 3) -> SlideLevel:
    """One resolution level of a slide, opened lazily as a :class:`SlideLevel`.

    A TIFF (by its first bytes: .tif, .svs, .ome.tif, .btf, .ndpi...) lists the levels of its main image
    (tifffile's ``series[0].levels``: SVS, OME-TIFF SubIFDs and generic pyramids; a plain TIFF has one); ``level``
    picks one (0, the default, is full resolution) and ``mpp`` the one whose microns per pixel are nearest, from the
    Aperio MPP, the OME PhysicalSizeX/Y or the TIFF resolution in centimetres or inches. At open every level's
    tiles or strips are checked to lie inside the file (a truncated copy) and the compression to be decodable; a
    damaged tile is reported when a region containing it is read. Any other format is read whole by
    :func:`xcit.data.large_images.read_large_image` and has one level. ValueError names the file for every problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot read image {display_path(path)!r}: no such file")
    if in_chans not in (1, 3):
        raise ValueError(f"expected in_chans 1 or 3, got {in_chans}")
    if not _is_tiff_file(path):
        if level is not None or mpp is not None:  # one level, of no stated pixel size
            _pick_level(path, [image_size(path)], level, mpp, None)
        arr = read_large_image(path, in_chans)
        return SlideLevel(path, 0, [arr.shape[:2]], None, None, in_chans, _ArrayLevel(arr))
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # tifffile raises TiffFileError, struct.error... on a damaged header
        raise ValueError(f"cannot read image {display_path(path)!r}: {type(err).__name__}: {err}") from err
    try:
        return _open_tiff(tif, path, level, mpp, in_chans)
    except BaseException:
        tif.close()
        raise


def _open_tiff(tif: Any, path: Path, level: int | None, mpp: float | None, in_chans: int) -> SlideLevel:
    try:
        series = tif.series[0]
        pages = []
        for k, lv in enumerate(series.levels):
            found = [p for p in lv.pages if p is not None]
            if len(found) != 1 or found[0].imagedepth != 1:
                raise ValueError(f"cannot read {display_path(path)!r}: expected a 2-D grey or RGB image in one page "
                                 f"per level, got axes {lv.axes!r} of shape {lv.shape} in {len(found)} pages "
                                 f"at level {k}")
            page = found[0]
            pages.append(page if hasattr(page, "decode") else page.aspage())
        levels = [(int(p.imagelength), int(p.imagewidth)) for p in pages]
        base_mpp = _tiff_mpp(tif, pages[0])
        georef = _read_georef(pages[0])
    except ValueError:
        raise
    except Exception as err:  # tifffile's errors vary with the damage
        raise ValueError(f"cannot read image {display_path(path)!r}: {type(err).__name__}: {err}") from err
    mpps = None
    if base_mpp is not None:
        mpps = [(base_mpp[0] * levels[0][0] / h, base_mpp[1] * levels[0][1] / w) for h, w in levels]
    chosen = _pick_level(path, levels, level, mpp, mpps)
    file_size = os.path.getsize(path)
    for k, page in enumerate(pages):
        _check_segments(page, path, k, file_size)
    _check_decodable(pages[chosen], path, chosen)
    if georef is not None and chosen:
        georef = georef.scaled(levels[0][0] / levels[chosen][0], levels[0][1] / levels[chosen][1])
    reader = _TiffLevel(tif, pages[chosen], path, chosen, in_chans)
    return SlideLevel(path, chosen, levels, mpps[chosen] if mpps else None, georef, in_chans, reader)


# ------------------------------------------------------------------------------------------------ overview
#: Longer side of the downsampled images overlays are drawn on.
OVERVIEW_SIDE = 2048


def read_overview(slide: SlideLevel, max_side: int) -> np.ndarray:
    """The level as a small RGB (h, w, 3) uint8 image with max(h, w) <= ``max_side`` (area-averaged), for overlays.

    It is resampled from the smallest level of the file that is still at least that size (a pyramid's overview
    costs a few tiles), read in row bands, so that not even that level is held whole.
    """
    if not (isinstance(max_side, int) and max_side >= 1):
        raise ValueError(f"expected a positive max_side, got {max_side!r}")
    height, width = slide.shape[:2]
    scale = min(1.0, max_side / max(height, width, 1))
    th = max(1, min(height, math.floor(height * scale + 1e-9)))
    tw = max(1, min(width, math.floor(width * scale + 1e-9)))
    best = slide.level
    for k in range(slide.level + 1, len(slide.levels)):
        h, w = slide.levels[k]
        if h >= th and w >= tw and h * w < slide.levels[best][0] * slide.levels[best][1]:
            best = k
    source = slide if best == slide.level else open_slide(slide.path, level=best, in_chans=slide.in_chans)
    try:
        return _resample(source, th, tw)
    finally:
        if source is not slide:
            source.close()


def _resample(source: SlideLevel, th: int, tw: int) -> np.ndarray:
    """``source`` box-resampled to (th, tw, 3), a band of about 32 MB of source rows at a time."""
    height, width, chans = source.shape
    out = np.empty((th, tw, 3), np.uint8)
    sy = height / th
    per_band = max(1, int((32 << 20) // max(1, width * chans * sy)))
    for i0 in range(0, th, per_band):
        i1 = min(th, i0 + per_band)
        top, bottom = i0 * sy, i1 * sy
        a, b = math.floor(top), min(height, math.ceil(bottom))
        band = source[a:b]
        img = Image.fromarray(band[:, :, 0] if chans == 1 else band, "L" if chans == 1 else "RGB")
        if img.size != (tw, i1 - i0):
            img = img.resize((tw, i1 - i0), Image.Resampling.BOX, box=(0.0, top - a, float(width), bottom - a))
        arr = np.asarray(img)
        out[i0:i1] = arr[:, :, None] if arr.ndim == 2 else arr
    return out


# ------------------------------------------------------------------------------------------------ writing
def _disk_full(path: Path, err: OSError) -> ValueError:
    """The one-line error of a write that ran out of space (the partial file is already removed)."""
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free in {display_path(path.parent)} without it"
    except OSError:
        free = ""
    return ValueError(f"cannot write {display_path(path)!r}: the disk is full ({err.strerror or err}{free})")


def _pyramid_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(H, W) of every level: each half the one above (rounded up), down to the first that fits in one tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _check_compression(path: Path, compression: str | int | None) -> None:
    """ValueError now, before any band is computed, for a compression that cannot be written here (named as
    tifffile names them: 'zlib' is Adobe deflate)."""
    from tifffile import COMPRESSION, TIFF

    if not compression:
        return
    try:
        name = compression.upper() if isinstance(compression, str) else compression
        code = 8 if name == "ZLIB" else COMPRESSION[name] if isinstance(name, str) else COMPRESSION(name)
        _probe(TIFF.COMPRESSORS[int(code)], np.zeros(256, np.uint8))
    except (KeyError, ValueError) as err:
        raise ValueError(f"cannot write {display_path(path)!r} with compression {compression!r}: "
                         f"{err.args[0] if isinstance(err, KeyError) else err} (zlib, adobe_deflate, deflate or "
                         "lzma need no extra package)") from err


def _base_tiles(path: Path, bands: Iterator[Any], height: int, width: int, tile: int, dtype: np.dtype,
                half: np.ndarray | None) -> Iterator[np.ndarray]:
    """The tiles of the full-resolution map in TIFF order (row of tiles by row of tiles), from ``bands`` consumed
    as the tiles are needed; each band's even rows and columns are copied to ``half`` (the next level)."""
    pending: list[np.ndarray] = []
    held, received, count = 0, 0, 0

    def take() -> bool:
        nonlocal held, received, count
        band = next(bands, None)
        if band is None:
            return False
        band = np.asarray(band)
        if band.ndim != 2 or band.shape[1] != width or band.dtype != dtype:
            raise ValueError(f"cannot write {display_path(path)!r}: expected band {count} (from row {received}) to be "
                             f"a {dtype} array of shape (rows, {width}), got {band.dtype} of shape {band.shape}")
        if received + len(band) > height:
            raise ValueError(f"cannot write {display_path(path)!r}: the bands give more than the {height} rows "
                             f"of the map (band {count} ends at row {received + len(band)})")
        if half is not None:
            first = received % 2  # the band's first row of even index in the map
            half[(received + first) // 2:(received + len(band) + 1) // 2] = band[first::2, ::2]
        pending.append(np.array(band, copy=True))  # the caller may reuse its buffer
        held, received, count = held + len(band), received + len(band), count + 1
        return True

    for top in range(0, height, tile):
        rows = min(tile, height - top)
        while held < rows:
            if not take():
                raise ValueError(f"cannot write {display_path(path)!r}: the bands end after {received} rows, "
                                 f"the map has {height}")
        block = pending[0] if len(pending) == 1 else np.concatenate(pending)
        pending = [block[rows:]] if len(block) > rows else []
        held -= rows
        if top + rows == height:  # the last row of tiles: the bands must end here (take() refuses more rows)
            while take():
                pass
        for left in range(0, width, tile):
            yield block[:rows, left:left + tile]


def write_label_tiff(path: str | os.PathLike, height: int, width: int, bands: Iterable[np.ndarray], *,
                     tile: int = 256, compression: str | None = "zlib", overwrite: bool = False,
                     description: dict | None = None) -> Path:
    """Write a label map, given as consecutive row bands, as a tiled, compressed, pyramidal TIFF; return its path.

    ``bands`` yields (rows, ``width``) arrays of the map from the top, of any heights summing to ``height``, all of
    the first band's dtype (uint8, or uint16 for more than 256 classes). They are consumed as the tiles are written:
    no more than a row of tiles and a band is held, plus the half-resolution copy the pyramid is made of (a quarter
    of the map; on disk above 512 MB). The levels (SubIFDs) are the map strided by 2, 4, 8..., down to the first
    that fits in one ``tile``. ``description`` (JSON: class names, palette, model) is the base page's
    ImageDescription. The file is written beside ``path`` under a temporary name and renamed onto it when complete:
    an existing file is refused unless ``overwrite``, and any error (from ``bands`` too) leaves nothing under
    ``path`` and no temporary file; a full disk is a one-line ValueError.
    """
    import tifffile

    path = claim_file(path, overwrite=overwrite)
    if not (isinstance(tile, int) and tile >= 16 and tile % 16 == 0):
        raise ValueError(f"expected a tile size that is a positive multiple of 16 (a TIFF rule), got {tile!r}")
    if not (isinstance(height, int) and isinstance(width, int) and height >= 1 and width >= 1):
        raise ValueError(f"expected a positive height and width, got {height!r} x {width!r}")
    _check_compression(path, compression)
    text = json.dumps(description) if description is not None else None  # ASCII: non-ASCII names as \\u escapes
    bands = iter(bands)
    first = next(bands, None)
    if first is None:
        raise ValueError(f"cannot write {display_path(path)!r}: the bands give no rows, the map has {height}")
    first = np.asarray(first)
    if first.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"cannot write {display_path(path)!r}: expected uint8 or uint16 labels (uint16 for more than "
                         f"256 classes), got {first.dtype}; convert the bands")
    dtype = first.dtype
    shapes = _pyramid_shapes(height, width, tile)
    all_bands = (band for source in ([first], bands) for band in source)
    raw = height * width * dtype.itemsize
    try:
        with atomic_write(path) as tmp:
            half = None
            if len(shapes) > 1:
                half_shape = shapes[1]
                if raw // 4 > (512 << 20):  # an unnamed temporary file, gone with the array: no context manager
                    half = np.memmap(tempfile.TemporaryFile(), dtype=dtype, mode="w+", shape=half_shape)  # noqa: SIM115
                else:
                    half = np.empty(half_shape, dtype)
            options = {"tile": (tile, tile), "compression": compression, "photometric": "minisblack",
                       "metadata": None, "maxworkers": 1}
            with tifffile.TiffWriter(tmp, bigtiff=raw * 1.4 + (1 << 24) >= (1 << 32)) as tif:
                tif.write(data=_base_tiles(path, all_bands, height, width, tile, dtype, half), shape=(height, width),
                          dtype=dtype, subifds=len(shapes) - 1, description=text, **options)
                for k in range(1, len(shapes)):
                    step = 1 << (k - 1)
                    tif.write(half[::step, ::step], subfiletype=1, **options)
            del half
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(path, err) from err
        raise
    return path


def write_json_atomically(path: str | os.PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Write ``data`` as indented JSON through a temporary file (:func:`xcit.data.outputs.atomic_write`); an existing
    file is refused unless ``overwrite``. Returns the path."""
    path = claim_file(path, overwrite=overwrite)
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(path, err) from err
        raise
    return path


def write_overlay(path: str | os.PathLike, overview_rgb: np.ndarray, labels_small: np.ndarray,
                  palette: Sequence[Sequence[int]], alpha: float = 0.5, overwrite: bool = False) -> Path:
    """Write ``overview_rgb`` (h, w, 3) uint8 with each pixel's class colour from ``palette`` blended over it at
    ``alpha`` as a PNG; ``labels_small`` is the label map resized (nearest) to (h, w). Labels without a palette
    entry (an ignore index) leave the image as it is. Returns the path; an existing file is refused unless
    ``overwrite``."""
    image, labels = np.asarray(overview_rgb), np.asarray(labels_small)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 overview, got {image.dtype} of shape {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"expected labels of the overview's size {image.shape[:2]}, got shape {labels.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"expected alpha between 0 and 1, got {alpha}")
    colours = np.asarray(palette, dtype=np.float64).reshape(-1, 3)
    path = claim_file(path, overwrite=overwrite)
    coloured = (labels >= 0) & (labels < len(colours))
    tint = colours[np.where(coloured, labels, 0)]
    blend = np.rint((1.0 - alpha) * image + alpha * tint).clip(0, 255).astype(np.uint8)
    out = np.where(coloured[:, :, None], blend, image)
    try:
        with atomic_write(path) as tmp:
            Image.fromarray(out, "RGB").save(tmp, format="PNG")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(path, err) from err
        raise
    return path


def class_areas(counts: np.ndarray, classes: list[str], mpp: float | tuple[float, float] | None = None,
                georef: GeoReference | None = None) -> dict:
    """Per-class pixel counts, fractions and areas of a label map (JSON-ready).

    ``counts[i]`` is the number of pixels of class ``classes[i]`` (shorter: the missing classes have none), at the
    level the pixel size ``mpp`` ((y, x) or one number, microns) and ``georef`` describe: with ``mpp`` each class
    gets ``area_um2`` and ``area_mm2``; with ``georef`` ``area_map_units2``, and ``area_m2`` where the CRS's unit is
    a length (a projected CRS).
    """
    counts = np.asarray(counts).reshape(-1)
    if len(counts) > len(classes):
        raise ValueError(f"expected at most {len(classes)} counts (one per class), got {len(counts)}")
    if counts.size and (counts.min() < 0 or not np.all(np.isfinite(counts))):
        raise ValueError("expected counts of pixels (finite, not negative)")
    counts = np.concatenate([counts.astype(np.int64), np.zeros(len(classes) - len(counts), np.int64)])
    total = int(counts.sum())
    result: dict[str, Any] = {"pixels": total}
    pixel_um2 = None
    if mpp is not None:
        my, mx = (float(mpp), float(mpp)) if np.isscalar(mpp) else (float(mpp[0]), float(mpp[1]))
        pixel_um2 = my * mx
        result["mpp"] = [my, mx]
        result["pixel_area_um2"] = pixel_um2
    metres = None
    if georef is not None:
        result["crs"], result["map_unit"] = georef.crs, georef.unit
        result["pixel_area_map_units2"] = georef.pixel_area
        if georef.unit in _METRES_PER_UNIT:
            metres = _METRES_PER_UNIT[georef.unit]
            result["pixel_area_m2"] = georef.pixel_area * metres ** 2
    per_class = []
    for i, (name, n) in enumerate(zip(classes, counts.tolist())):
        entry: dict[str, Any] = {"index": i, "name": name, "pixels": n, "fraction": n / total if total else 0.0}
        if pixel_um2 is not None:
            entry["area_um2"] = n * pixel_um2
            entry["area_mm2"] = n * pixel_um2 * 1e-6
        if georef is not None:
            entry["area_map_units2"] = n * georef.pixel_area
            if metres is not None:
                entry["area_m2"] = n * georef.pixel_area * metres ** 2
        per_class.append(entry)
    result["classes"] = per_class
    return result
