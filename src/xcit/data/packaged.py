"""Data files shipped inside PyPI wheels (stardist, deepforest), read without importing the package."""
from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path


def package_file(package: str, relpath: str, source: str | os.PathLike | None = None, pip_hint: str = "") -> bytes:
    """Bytes of ``package/relpath`` from ``source`` (a downloaded ``.whl``, a folder holding the
    package or an unpacked wheel) or, without ``source``, from the installed package.

    The package is located with ``importlib.util.find_spec`` and never imported (a wheel
    installed with ``--no-deps`` need not import).
    """
    inner = f"{package}/{relpath}"
    hint = pip_hint or f"pip install --no-deps {package}"
    if source is not None:
        src = Path(source)
        if src.is_file() and src.suffix == ".whl":
            with zipfile.ZipFile(src) as zf:
                try:
                    return zf.read(inner)
                except KeyError:
                    raise FileNotFoundError(f"expected {inner} inside {src}, but the wheel does not hold it") from None
        for candidate in (src / inner, src / relpath):
            if candidate.is_file():
                return candidate.read_bytes()
        raise FileNotFoundError(f"expected {inner} in {src} (a .whl file or a folder holding {package}/), found neither")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {package} package is not installed; install its wheel without dependencies "
            f"(`{hint}`) or pass --source PATH/TO/{package}-*.whl"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / relpath
        if path.is_file():
            return path.read_bytes()
    raise FileNotFoundError(f"the installed {package} package has no {relpath} (version without the data file?)")
