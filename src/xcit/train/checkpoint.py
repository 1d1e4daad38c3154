"""Full training state (``last.pt`` / ``best.pt``): written atomically, read with ``weights_only=True``.

A state file (written by :func:`xcit.train.fit`, the same layout for every task) holds the task name,
the resolved options, the step, the trained model's weights, the optimiser and gradient-scaler state,
the task's own state (EMA, teacher, ...), the best evaluation so far, the elapsed training time, and
the random number generator states of torch, numpy and Python of every process (as tensors, so no
object is unpickled). Like every file this project writes, it records the SHA-256 of its tensors,
checked when read.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.weights import CheckpointError, load_file, with_digest, write_atomically

STATE_VERSION = 2  # 2: the one training loop (task, options, the task's own entries); 1: the loops before it


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
    """Write ``state`` to ``path`` through a temporary file and a rename (never a half-written file); a failed write
    (a full disk) is an ``OSError`` naming ``path``."""
    return write_atomically(path, lambda tmp: torch.save(with_digest({"version": STATE_VERSION, **state}), tmp))


def load_state(path: str | os.PathLike, task: str | None = None, command: str = "xcit train") -> dict[str, Any]:
    """Read a training state (a run folder or its ``last.pt``); :class:`CheckpointError` if it is missing,
    corrupt, not a state file, written before the one training loop, or (given ``task``) another task's."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (expected a run folder or its last.pt)")
    state = load_file(path, what="training checkpoint")
    needed = ("task", "options", "model", "optimizer", "step", "rng")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        have = list(state)[:10] if isinstance(state, dict) else type(state).__name__
        old = isinstance(state, dict) and "train_state" in state or isinstance(state, dict) and "scheduler" in state
        raise CheckpointError(
            f"{path} is not a training state of this version of xcit (needs {', '.join(needed)}; has {have})"
            + ("; it was written by a version before the one training loop: start a new run from its weights "
               "(--finetune / --pretrained)" if old else f"; to start from model weights instead, give them to "
               f"{command} (--finetune / --pretrained)"))
    if task is not None and state["task"] != task:
        raise CheckpointError(f"{path} is the state of a `{state.get('command', state['task'])}` run, not of "
                              f"{command}")
    state["path"] = str(path)
    return state


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
