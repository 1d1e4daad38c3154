"""Batched top-k classification of image files, streamed to CSV or JSON Lines.

Images of any size are brought to the model's evaluation size by its eval transform, so they batch;
unreadable files become rows with an ``error`` and are skipped, never fatal.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import display_path, load_image
from ..data.outputs import atomic_write, claim_file
from .loading import InferenceModel, load_for_inference


@dataclass
class Prediction:
    """Top-k classes of one image, best first; ``error`` is set (and the lists empty) if it was unreadable."""

    path: str
    labels: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str | None = None


class ImageFiles(Dataset):
    """(index, tensor or None, error or None) per path; never raises on a bad file."""

    def __init__(self, paths: Sequence[str], transform, in_chans: int) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i], self.in_chans)), None
        except ValueError as err:
            return i, None, str(err)
        except Exception as err:  # noqa: BLE001 - a decoder failure on one file must not end a batch job
            return i, None, f"cannot read image {display_path(self.paths[i])!r}: {type(err).__name__}: {err}"


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _, _ in items], [i for i, _ in good], batch, {i: e for i, _, e in items if e is not None}


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (None or 0: unchanged)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Predictor:
    """Top-k predictions of a classifier over image files, in input order, in batches."""

    def __init__(self, inf: InferenceModel, device: str | torch.device = "cpu", optimize: bool = True) -> None:
        """``optimize`` runs the inference transform (:func:`xcit.optimize`: same outputs, faster)."""
        from ..models import optimize as optimize_model

        self.inf = inf
        self.device = torch.device(device)
        model = inf.model.eval().to(self.device)
        self.model = optimize_model(model) if optimize else model

    @classmethod
    def load(cls, checkpoint=None, model_name: str | None = None, device: str | torch.device = "cpu", **kwargs) -> Predictor:
        """From a checkpoint (class names and preprocessing from its metadata) and/or a model name."""
        return cls(load_for_inference(checkpoint, model_name, device=device, **kwargs), device)

    @torch.inference_mode()
    def predict_tensor(self, x: torch.Tensor, top_k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, class indices), each (B, k), for a preprocessed batch."""
        probs = self.model(x.to(self.device)).float().softmax(dim=-1)
        return probs.topk(min(top_k, probs.shape[-1]), dim=-1)

    def predict(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        top_k: int = 5,
        batch_size: int = 32,
        threads: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Yield one :class:`Prediction` per path, in order, as batches complete.

        ``threads`` sets torch's intra-op threads for the model and, when above 1, as many
        DataLoader worker processes for decoding and resizing.
        """
        if top_k < 1:
            raise ValueError(f"expected top_k >= 1, got {top_k}")
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"expected threads >= 1, got {threads}")
        paths = [os.fspath(p) for p in paths]
        dataset = ImageFiles(paths, self.inf.transform(), self.inf.in_chans)
        workers = threads if threads and threads > 1 else 0
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        from tqdm.auto import tqdm

        classes = self.inf.classes
        unreadable = 0
        with torch_threads(threads), tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
            for order, good, batch, errors in loader:
                results: dict[int, Prediction] = {}
                if batch is not None:
                    probs, idx = self.predict_tensor(batch, top_k)
                    for i, p, c in zip(good, probs.tolist(), idx.tolist()):
                        results[i] = Prediction(paths[i], [classes[j] for j in c], c, p)
                for i, err in errors.items():
                    results[i] = Prediction(paths[i], error=err)
                # the bar counts a batch before its predictions are handed out: a caller that stops after the last
                # one (or writes it and exits) never leaves the bar a batch short
                if errors:
                    unreadable += len(errors)
                    bar.set_postfix(unreadable=unreadable, refresh=False)
                bar.update(len(order))
                for i in order:
                    yield results[i]


class PredictionWriter:
    """Streams predictions to CSV (``path, label_1, prob_1, ..., label_k, prob_k, error``) or JSON Lines.

    The rows go to a temporary file beside ``path``, renamed onto it by :meth:`close`; :meth:`abort` (or an
    error inside a ``with`` block) removes it, so an earlier file is never replaced by a partial one. An existing
    ``path`` is refused unless ``overwrite``. Paths are written as valid UTF-8 (:func:`xcit.data.images.display_path`:
    the bytes of a name that is not UTF-8 as ``\\xNN``).
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None, top_k: int = 5, *,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(self.path.suffix.lower())
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"expected an output ending in .csv or .jsonl (or --format csv|jsonl), got {str(path)!r}")
        claim_file(self.path, overwrite=overwrite)
        self.format = fmt
        self.top_k = top_k
        self._output = atomic_write(self.path)
        tmp = self._output.begin()
        self._file = open(tmp, "w", newline="" if fmt == "csv" else None, encoding="utf-8")  # noqa: SIM115 - close()
        self._csv = None
        if fmt == "csv":
            self._csv = csv.writer(self._file)
            self._row(["path"] + [f"{kind}_{r}" for r in range(1, top_k + 1) for kind in ("label", "prob")] + ["error"])

    def _row(self, cells: list) -> None:
        try:
            if self._csv is not None:
                self._csv.writerow(cells)
            else:
                self._file.write(json.dumps(cells[0], ensure_ascii=False) + "\n")
        except OSError as err:  # a full disk: name the file the user asked for, and leave no partial file
            self.abort()
            raise OSError(err.errno, err.strerror or str(err), display_path(self.path)) from err

    def write(self, pred: Prediction) -> None:
        if self._csv is not None:
            cells: list = [display_path(pred.path)]
            for r in range(self.top_k):
                has = r < len(pred.labels)
                cells += [pred.labels[r] if has else "", f"{pred.probs[r]:.6f}" if has else ""]
            self._row(cells + [pred.error or ""])
        else:
            row = asdict(pred)
            row["path"] = display_path(pred.path)
            row["probs"] = [round(p, 6) for p in pred.probs]
            self._row([row])

    def close(self) -> None:
        """Finish the file and put it in place."""
        if self._file.closed:
            return
        try:
            self._file.close()
        except OSError as err:
            self._output.discard()
            raise OSError(err.errno, err.strerror or str(err), display_path(self.path)) from err
        self._output.commit()

    def abort(self) -> None:
        """Drop what was written: ``path`` stays as it was."""
        try:
            self._file.close()
        except OSError:
            pass
        self._output.discard()

    def __enter__(self) -> PredictionWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _short(path: str, max_path: int) -> str:
    return path if len(path) <= max_path else "..." + path[-(max_path - 3):]


def table_width(paths: Sequence[str], max_path: int = 48) -> int:
    """Width of the path column of :func:`format_row` for these paths."""
    return max([len(_short(display_path(p), max_path)) for p in paths] + [5])


def table_header(width: int, top_k: int) -> str:
    return f"{'image'.ljust(width)}  top-{top_k} (probability)\n{'-' * width}  {'-' * 40}"


def format_row(pred: Prediction, width: int, max_path: int = 48) -> str:
    """One table line: the path, then ``label (prob%)`` for each of the top-k, or the error."""
    if pred.error:
        body = f"ERROR {pred.error}"
    else:
        body = ", ".join(f"{label} ({100 * prob:.1f}%)" for label, prob in zip(pred.labels, pred.probs))
    return f"{_short(display_path(pred.path), max_path).ljust(width)}  {body}"


def format_table(preds: Sequence[Prediction], top_k: int = 5, max_path: int = 48) -> str:
    """A human-readable table: one line per image with its top-k ``label (prob%)``."""
    width = table_width([p.path for p in preds], max_path)
    return "\n".join([table_header(width, top_k)] + [format_row(p, width, max_path) for p in preds])
