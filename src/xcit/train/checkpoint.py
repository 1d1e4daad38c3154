"""Full training state (``last.pt`` / ``best.pt``): written atomically, read with ``weights_only=True``.

A state file holds the model, optimizer, scheduler, gradient scaler and EMA state dicts, the
epoch and step counters, the best accuracy so far, the resolved configuration, and the random
number generator states of torch, numpy and Python (as tensors, so no object is unpickled).
Like every file this project writes, it records the SHA-256 of its tensors, checked when read.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.weights import CheckpointError, load_file, with_digest

STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / Python generator states, as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def save_state(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(with_digest({"version": STATE_VERSION, **state}), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state; :class:`CheckpointError` if it is missing, corrupt or not a state file."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (expected a run directory or its last.pt)")
    state = load_file(path, what="training checkpoint")
    needed = ("model", "optimizer", "scheduler", "epoch", "step", "config", "rng")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        have = list(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a training state written by `xcit train` (needs {', '.join(needed)}; has {have}). "
            "To start from model weights instead, use --finetune."
        )
    state["path"] = str(path)
    return state


def resume_path(resume: str | None, out: str | os.PathLike) -> Path | None:
    """The state file a dense-task run continues from: None (fresh run), ``"auto"`` (``out/last.pt`` when
    it exists) or a path, which must exist."""
    if resume is None:
        return None
    if resume == "auto":
        path = Path(out) / "last.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint to resume from, got {resume!r} which is not a file")
    return path


def read_task_checkpoint(path: str | os.PathLike, fmt: str, task: str,
                         map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A dense-task checkpoint (``{'format': fmt, ...}``, weights-only load) written by ``xcit TASK train``;
    a clear error for a missing, unreadable or other kind of file."""
    path = Path(path)
    what = {"segment": "segmentation", "detect": "detection"}.get(task, task)
    if not path.is_file():
        raise FileNotFoundError(f"expected a {what} checkpoint, got {str(path)!r} which is not a file")
    raw = load_file(path, what=f"{what} checkpoint", map_location=map_location)
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise CheckpointError(
            f"{path}: not a {what} checkpoint (expected one written by `xcit {task} train`; "
            f"to start from a classification or DINO checkpoint use `xcit {task} train --pretrained`)"
        )
    return raw
