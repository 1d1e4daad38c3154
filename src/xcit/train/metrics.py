"""Run logging: a text log, step and epoch metrics as JSON lines, TensorBoard when installed, progress bars."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("xcit.train")


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Rank 0 logs INFO to stdout and ``run_dir/train.log``; other ranks log warnings only."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None and is_main:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(file)
    data_log = logging.getLogger("xcit.data")
    data_log.setLevel(logging.WARNING)
    if run_dir is not None and is_main and not any(isinstance(h, logging.FileHandler) for h in data_log.handlers):
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        data_log.addHandler(handler)


def close_logging() -> None:
    for logger in (log, logging.getLogger("xcit.data")):
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                handler.close()


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` (and TensorBoard); inert on non-zero ranks."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None
        self._file = open(self.path, "a") if enabled else None

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch",):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None  # JSON has no NaN / inf: null
    return v


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # how older files wrote them


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (a run resumed several times appends to it). A null (a NaN
    or infinite value, which JSON numbers cannot hold) reads back as NaN; older files' "nan" / "inf" /
    "-inf" strings as those floats."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        for key, value in record.items():
            if value is None or (isinstance(value, str) and value in _NON_FINITE):
                record[key] = math.nan if value is None else _NON_FINITE[value]
    return records


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar when ``enabled`` and stderr is a terminal; otherwise a bar that does nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True,
                leave=False, unit="batch")


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Meter:
    """Loss (and its named parts) and throughput over the steps since the last log line and the last epoch."""

    def __init__(self) -> None:
        self.last_loss: float | None = None
        self._window: dict[str, list[float]] = {}
        self._epoch: list[float] = []
        self._images = self._epoch_images = 0
        self._t = self._t_epoch = time.time()

    def add(self, loss: float, parts: dict[str, torch.Tensor], images: int) -> None:
        self.last_loss = loss
        named = {k if k.startswith("loss_") else f"loss_{k}": float(v.detach()) for k, v in parts.items()}
        for key, value in {"loss": loss, **named}.items():
            self._window.setdefault(key, []).append(value)
        self._epoch.append(loss)
        self._images += images
        self._epoch_images += images

    def flush(self) -> dict[str, float]:
        """Means since the last call, and images per second."""
        now = time.time()
        record = {k: sum(v) / len(v) for k, v in self._window.items()}
        record.setdefault("loss", float("nan"))
        record["img_per_s"] = self._images / max(now - self._t, 1e-9)
        self._window, self._images, self._t = {}, 0, now
        return record

    def end_epoch(self) -> dict[str, float]:
        now = time.time()
        record = {"train_loss": sum(self._epoch) / max(len(self._epoch), 1), "epoch_time": now - self._t_epoch,
                  "epoch_img_per_s": self._epoch_images / max(now - self._t_epoch, 1e-9)}
        self._epoch, self._epoch_images, self._t_epoch = [], 0, now
        return record
