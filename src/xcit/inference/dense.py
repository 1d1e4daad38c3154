"""The dense backbone's four pyramid levels for images of any size, exact, a window at a time.

:func:`stream_pyramid` runs the XCA trunk of an :class:`~xcit.models.XCiTPyramid` once with the streaming forward
(:mod:`xcit.inference.streaming`: exact global XCA statistics, memory bounded by the token tensor) and keeps the
outputs of its four ``out_indices`` blocks on the patch grid. The levels themselves are never built whole: their
adapters are local (2x2 stride-2 transposed convolutions, BatchNorm, GELU up; 2x2 or 4x4 max-pooling down; identity),
so :meth:`PyramidMaps.window` computes any window of any level from the block outputs under it, equal to the same
window of ``pyramid(x)``. At 16384 x 16384 the stride-4 level of a 192-channel model would take 12.9 GB; a window of
it takes what the window takes.

Kept block outputs beyond ``max_resident_bytes`` go to a temporary file, removed by
:meth:`PyramidMaps.close` (or leaving the ``with`` block, or the process's exit), even on error.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..models.xcit import XCiTPyramid
from .streaming import DEFAULT_TOKENS_PER_CHUNK, StreamingXCiT

#: Default bound on the block outputs kept in memory (the resident token tensor itself is not counted).
DEFAULT_RESIDENT_BYTES = 2 << 30


def stream_pyramid(
    pyramid: XCiTPyramid,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tokens_per_chunk: int = DEFAULT_TOKENS_PER_CHUNK,
    max_resident_bytes: int | None = DEFAULT_RESIDENT_BYTES,
) -> StreamingPyramid:
    """The windowed, exact pyramid of ``pyramid`` (eval mode); uint8 inputs are normalised with ``mean`` / ``std``.

    ``max_resident_bytes`` bounds the block outputs kept in memory (None: no bound); above it they are written to a
    temporary file (``TMPDIR``) and read back a window at a time.
    """
    return StreamingPyramid(pyramid, mean, std, tokens_per_chunk, max_resident_bytes)


class StreamingPyramid(nn.Module):
    """See :func:`stream_pyramid`. :meth:`maps` runs the trunk; the returned :class:`PyramidMaps` gives windows."""

    def __init__(self, pyramid: XCiTPyramid, mean, std, tokens_per_chunk: int, max_resident_bytes: int | None) -> None:
        super().__init__()
        if not isinstance(pyramid, XCiTPyramid):
            raise ValueError(f"expected an XCiTPyramid (the dense backbone), got {type(pyramid).__name__}")
        if max_resident_bytes is not None and (isinstance(max_resident_bytes, bool) or max_resident_bytes < 0):
            raise ValueError(f"expected max_resident_bytes >= 0 or None, got {max_resident_bytes!r}")
        self.pyramid = pyramid
        self.trunk = StreamingXCiT(pyramid, mean, std, tokens_per_chunk)
        self.max_resident_bytes = max_resident_bytes
        self.adapters = [_Adapter(getattr(pyramid, f"fpn{i + 1}"), pyramid.patch_size, s)
                         for i, s in enumerate(pyramid.strides)]

    @torch.no_grad()
    def maps(self, image, pad_to: tuple[int, int] | None = None) -> PyramidMaps:
        """Run the trunk on ``image`` (as :func:`xcit.streaming` takes it; ``pad_to`` (H', W') zero-pads the normalised
        image at the bottom / right, as a detector's batching does) and return its windowed pyramid."""
        n_copies = len(self.pyramid.out_indices) - 1
        store = _Store(self.max_resident_bytes, n_copies)
        try:
            blocks, hp, wp = self.trunk.forward_maps(image, self.pyramid.out_indices, store=store, pad_to=pad_to)
        except BaseException:
            store.close()
            raise
        h, w = pad_to or spatial_size(image)
        return PyramidMaps(self, blocks, (hp, wp), (h, w), store)


class PyramidMaps:
    """Windows of the four pyramid levels of one image (see :func:`stream_pyramid`); a context manager."""

    strides = XCiTPyramid.strides

    def __init__(self, owner: StreamingPyramid, blocks: list[torch.Tensor], grid: tuple[int, int],
                 image_size: tuple[int, int], store: _Store) -> None:
        self._owner, self._blocks, self._store = owner, blocks, store
        self.grid, self.image_size = grid, image_size
        self.batch, self.channels = blocks[-1].shape[0], blocks[-1].shape[-1]
        self.sizes = [a.level_size(grid) for a in owner.adapters]

    @torch.no_grad()
    def window(self, level: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """(B, C, y1 - y0, x1 - x0) = ``pyramid(x)[str(level)][:, :, y0:y1, x0:x1]`` (level coordinates, clipped)."""
        if not 0 <= level < len(self.sizes):
            raise ValueError(f"expected a level in 0..{len(self.sizes) - 1}, got {level}")
        if self._blocks is None:
            raise RuntimeError("these pyramid maps are closed")
        h, w = self.sizes[level]
        y0, y1, x0, x1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if y1 <= y0 or x1 <= x0:
            return torch.zeros(self.batch, self.channels, max(y1 - y0, 0), max(x1 - x0, 0))
        adapter = self._owner.adapters[level]
        gy0, gy1, gx0, gx1 = adapter.grid_window(y0, y1, x0, x1)
        cells = _cells(self._blocks[level], self.grid, gy0, gy1, gx0, gx1).permute(0, 3, 1, 2)
        device = next(self._owner.pyramid.parameters()).device
        out = adapter(cells.to(device).contiguous())
        oy, ox = adapter.offset(gy0, gx0)
        return out[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]

    def close(self) -> None:
        """Drop the block outputs and remove their temporary file, if any."""
        self._blocks = None
        self._store.close()

    def __enter__(self) -> PyramidMaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Adapter:
    """One level's resampling of the patch-grid map, applied to windows: up by 2x2 stride-2 transposed convolutions
    (with pointwise layers between them), down by max-pooling of a factor, or the identity."""

    def __init__(self, module: nn.Module, patch: int, stride: int) -> None:
        self.module = module
        self.up = self.down = 1
        layers = list(module) if isinstance(module, nn.Sequential) else [module]
        for m in layers:
            if isinstance(m, nn.ConvTranspose2d):
                if m.kernel_size != (2, 2) or m.stride != (2, 2) or m.padding != (0, 0) or m.output_padding != (0, 0):
                    raise ValueError(f"expected 2x2 stride-2 transposed convolutions in the pyramid adapters, got {m}")
                self.up *= 2
            elif isinstance(m, nn.MaxPool2d):
                k, s = m.kernel_size, m.stride
                if k != s or m.padding != 0 or m.ceil_mode or m.dilation != 1:
                    raise ValueError(f"expected non-overlapping max-pooling in the pyramid adapters, got {m}")
                self.down *= k
            elif not isinstance(m, (nn.Identity, nn.BatchNorm2d, nn.GELU, nn.ReLU)):
                raise ValueError(f"expected pointwise layers, transposed convolutions or max-pooling in the pyramid "
                                 f"adapters, got {type(m).__name__}")
        if patch * self.down != stride * self.up:
            raise AssertionError(f"adapter {module} does not take stride {patch} to {stride}")

    def level_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return tuple(g * self.up // self.down for g in grid)

    def grid_window(self, y0: int, y1: int, x0: int, x1: int) -> tuple[int, int, int, int]:
        """The patch-grid cells [gy0, gy1) x [gx0, gx1) under level window [y0, y1) x [x0, x1)."""
        u, d = self.up, self.down
        return y0 * d // u, -(-y1 * d // u), x0 * d // u, -(-x1 * d // u)

    def offset(self, gy0: int, gx0: int) -> tuple[int, int]:
        """Level coordinates of the first output of a window starting at patch cell (gy0, gx0)."""
        return gy0 * self.up // self.down, gx0 * self.up // self.down

    def __call__(self, cells: torch.Tensor) -> torch.Tensor:
        return self.module(cells)


class _Store:
    """Where the streaming trunk copies kept block outputs: memory up to a bound, then a temporary file (deleted on
    :meth:`close`, or when the interpreter exits). The file is written and read with plain reads, not memory-mapped, so
    what was read does not stay in the process's resident memory."""

    def __init__(self, max_bytes: int | None, copies: int) -> None:
        self.max_bytes, self.copies = max_bytes, copies
        self.path: str | None = None
        self._file = None
        self._finalizer = None

    def __call__(self, tokens: torch.Tensor):
        nbytes = tokens.numel() * 4
        if self.max_bytes is None or nbytes * self.copies <= self.max_bytes:
            return tokens.clone()
        if self._file is None:
            fd, self.path = tempfile.mkstemp(prefix="xcit-pyramid-", suffix=".f32")
            self._file = os.fdopen(fd, "w+b")
            self._finalizer = weakref.finalize(self, _remove, self._file, self.path)
            free = _free_bytes(self.path)
            if free is not None and nbytes * self.copies > free:
                self.close()
                raise ValueError(f"the pyramid's block outputs need {nbytes * self.copies / 1e9:.1f} GB of temporary "
                                 f"disk in {tempfile.gettempdir()}, which has {free / 1e9:.1f} GB free; set TMPDIR to "
                                 "a larger disk or raise the resident-memory bound")
        offset = self._file.seek(0, os.SEEK_END)
        try:
            tokens.detach().to("cpu", torch.float32).contiguous().numpy().tofile(self._file)
            self._file.flush()
        except OSError as err:
            self.close()
            raise ValueError(f"cannot write the pyramid's block outputs to {self.path}: {err.strerror or err}; set "
                             "TMPDIR to a disk with room or raise the resident-memory bound") from None
        return _FileBlock(self._file, offset, tuple(tokens.shape))

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


class _FileBlock:
    """A (B, N, C) float32 block output in the store's file, read a band of grid rows at a time."""

    def __init__(self, file, offset: int, shape: tuple[int, int, int]) -> None:
        self.file, self.offset, self.shape = file, offset, shape

    def cells(self, grid: tuple[int, int], gy0: int, gy1: int, gx0: int, gx1: int) -> torch.Tensor:
        b, n, c = self.shape
        wp = grid[1]
        out = []
        for i in range(b):
            start = self.offset + (i * n + gy0 * wp) * c * 4
            raw = os.pread(self.file.fileno(), (gy1 - gy0) * wp * c * 4, start)
            rows = np.frombuffer(raw, dtype=np.float32).reshape(gy1 - gy0, wp, c)
            out.append(torch.from_numpy(rows[:, gx0:gx1].copy()))
        return torch.stack(out)


def _cells(block, grid: tuple[int, int], gy0: int, gy1: int, gx0: int, gx1: int) -> torch.Tensor:
    """(B, rows, cols, C) grid cells of a kept block output (a tensor or a :class:`_FileBlock`)."""
    if isinstance(block, _FileBlock):
        return block.cells(grid, gy0, gy1, gx0, gx1)
    return block.view(block.shape[0], *grid, block.shape[-1])[:, gy0:gy1, gx0:gx1]


def _remove(file, path: str) -> None:
    file.close()
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _free_bytes(path: str) -> int | None:
    try:
        import shutil

        return shutil.disk_usage(os.path.dirname(path)).free
    except OSError:
        return None


def spatial_size(image) -> tuple[int, int]:
    """(H, W) of an image as the streaming forward takes it: (H, W, C) channels last, or (B, C, H, W)."""
    shape = tuple(image.shape)
    return (shape[0], shape[1]) if len(shape) == 3 else (shape[-2], shape[-1])
