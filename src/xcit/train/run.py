"""The run engine's parts: what every training run has around its loop (:mod:`xcit.train.loop`).

* :func:`run_process` - process set-up and teardown (``torchrun`` groups, threads, a SIGTERM that
  unwinds like Ctrl-C so no half-written file is left behind);
* :class:`Run` - the run folder (refusing another run's files unless resuming or told to overwrite,
  locked while a process trains in it), logging through :mod:`logging`, ``metrics.jsonl`` (and
  TensorBoard), atomic checkpoints, ``config.yaml``, ``result.json`` and ``curves.png``;
* :class:`OptimStep` - the optimiser step (autocast loss in; gradient scaler, clipping and the
  non-finite check the same way everywhere).

Run folder files, the same for every task: ``config.yaml`` (resolved options and derived values),
``train.log``, ``metrics.jsonl``, ``last.pt`` (resumable state), ``best.pt`` (where evaluated),
``result.json`` (status, final metrics, files), ``curves.png``, the task's model file, and ``run.lock``
while a process trains.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from .checkpoint import save_state
from .options import AMP_MODES, CLIP_MODES
from .metrics import MetricsWriter, close_logging, setup_logging

log = logging.getLogger("xcit.train")


# Files a run writes into its folder; a folder holding any of them belongs to another run.
RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl", "last.pt", "best.pt", "result.json", "curves.png",
             "model.pth", "teacher.pth", "tensorboard")
# Files of runs written before the one dialect (detection / segmentation), also another run's.
LEGACY_RUN_FILES = ("summary.json", "config.json")
_TMP_FILE = re.compile(r"^\.(last|best|model|teacher)\.(pt|pth)\..*\.tmp$")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class RunFolderError(ValueError):
    """The run folder cannot be used: a file, not writable, or holding another run's files."""


# ------------------------------------------------------------------------------------ precision


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` mode (auto, bf16, fp16, none) on ``device``; None means fp32."""
    if mode not in AMP_MODES:
        raise ValueError(f"expected amp in {AMP_MODES}, got {mode!r}")
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if mode == "none":
        return None
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("amp fp16 needs a CUDA device (it uses a gradient scaler); on CPU use --amp bf16 or none")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --amp fp16")
    return torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ------------------------------------------------------------------------------------- process


def set_threads(threads: int | None, env: dist_utils.DistEnv) -> str:
    """Set torch's CPU threads: ``threads``, else this process's share of the cores.

    On a machine already busy with other work (load average >= cores), OpenMP threads that
    spin-wait for each other slow training down many times over; unless OMP_WAIT_POLICY=PASSIVE
    is set, one thread per process is used then. Returns a note for the log.
    """
    if threads is not None:
        torch.set_num_threads(threads)
        return ""
    if env.device.type != "cpu":
        return ""
    cores = os.cpu_count() or 1
    count = max(1, cores // env.local_world_size)
    note = ""
    if count > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load >= cores:
            note = (f"this machine is busy (load {load:.1f} on {cores} cores): using 1 thread per process instead of "
                    f"{count}, as spinning OpenMP threads would slow down; set OMP_WAIT_POLICY=PASSIVE or --threads")
            count = 1
    torch.set_num_threads(count)
    return note


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def run_process(device: str = "auto", backend: str | None = None) -> Iterator[dist_utils.DistEnv]:
    """This process's place in the ``torchrun`` group (or a single process) for the length of a run.

    SIGTERM (a scheduler's cancel, ``kill``) is turned into ``KeyboardInterrupt`` while the run
    lasts, so checkpoint writes in progress remove their temporary files and logs are closed.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    env = dist_utils.setup(device, backend)
    try:
        yield env
    finally:
        close_logging()
        dist_utils.cleanup(env)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


# ---------------------------------------------------------------------------------- run folder


def prepare_run_dir(output: str | os.PathLike | None, default: str | os.PathLike, env: dist_utils.DistEnv, *,
                    resuming: bool = False, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = (),
                    need_bytes: int = 0) -> Path:
    """The run folder (``output``, else ``default``), made on rank 0 and checked before anything is written.

    A folder that holds another run's files (``RUN_FILES``) is refused unless the run resumes it
    or ``overwrite`` is set; with ``overwrite`` those files are removed first, so logs and metrics
    never mix two runs, but never a file the run reads (``inputs``: fine-tuning weights, a teacher, the
    checkpoint probed). Temporary files left by a killed run are removed. A path that is a file, a folder
    that cannot be written, or a disk with less free space than ``need_bytes`` (what the run's checkpoints
    take) is a :class:`RunFolderError`, before anything is written.
    """
    path = Path(dist_utils.broadcast_object(str(output or default), env))
    error = _claim_run_dir(path, resuming, overwrite, [Path(p) for p in inputs if p], need_bytes) if env.is_main \
        else None
    error = dist_utils.broadcast_object(error, env)  # every process stops with rank 0's reason
    if error is not None:
        raise RunFolderError(error)
    return path


LOCK_FILE = "run.lock"


def _claim_run_dir(path: Path, resuming: bool, overwrite: bool, inputs: list[Path], need_bytes: int) -> str | None:
    """Check, make and lock the run folder on rank 0; the reason it cannot be used, or None."""
    for source in inputs:
        if _same_file(path, source):
            return (f"--output {path} is the command's input {source}: writing a run there would replace what is "
                    "being read; choose another --output")
    if path.exists() and not path.is_dir():
        return f"expected --output to be a folder, got {path}, which is a file"
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot write the run folder {path}: {ancestor} is a file, not a folder"
    free = shutil.disk_usage(ancestor).free
    if free < need_bytes:
        return (f"cannot write the run folder {path}: No space left on device ({free / 2**20:.1f} MiB free on its "
                f"disk; the run's checkpoints take about {need_bytes / 2**20:.0f} MiB)")
    locked = in_use(path)
    if locked is not None:
        return locked
    held = sorted(p.name for p in path.iterdir() if p.name in RUN_FILES + LEGACY_RUN_FILES) if path.is_dir() else []
    if held and not resuming:
        if not overwrite:
            return (f"{path} holds another run's files ({', '.join(held)}); continue that run with --resume, "
                    "replace it with --overwrite, or choose another --output")
        read = [source for source in inputs for name in held if _same_file(path / name, source)]
        if read:
            return (f"{path} holds the command's input {read[0]}, which --overwrite would delete with the earlier "
                    "run's files; choose another --output")
        for name in held:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot write the run folder {path}: {err.strerror or err}"
    for stale in path.iterdir():
        if _TMP_FILE.match(stale.name):
            stale.unlink()
    try:
        fd = os.open(path / LOCK_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # a stale lock (its process is gone, lock_holder said so): take it over
        (path / LOCK_FILE).unlink()
        fd = os.open(path / LOCK_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return None


def in_use(path: Path) -> str | None:
    """Why ``path`` cannot take a run: another process is training in it; None when it is free."""
    holder = lock_holder(path)
    if holder is None:
        return None
    return (f"{path} is in use by a run still training ({holder}); wait for it to end or stop it, or choose another "
            f"--output (a lock left by a run known to be dead can be removed: {path / LOCK_FILE})")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the same path, or the same inode through links)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def lock_holder(path: Path) -> str | None:
    """Who holds ``path``'s run lock: "process PID on HOST" for a live process, None for no lock or a stale one
    (its process gone on this host). A lock of another host cannot be checked and counts as held."""
    try:
        pid_text, _, host = (path / LOCK_FILE).read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if host == socket.gethostname():
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return f"process {pid} on {host or 'an unknown host'}"


def release_lock(path: Path) -> None:
    """Remove ``path``'s run lock if this process holds it."""
    lock = path / LOCK_FILE
    try:
        pid_text, _, host = lock.read_text().strip().partition(" ")
        if int(pid_text) == os.getpid() and host == socket.gethostname():
            lock.unlink()
    except (OSError, ValueError):
        pass


def resume_target(resume: str, output: str | None) -> Path:
    """The run folder or state file ``--resume`` names (bare ``--resume``: ``--output``)."""
    if resume == "auto":
        if not output:
            raise ValueError("expected --output RUN_DIR with a bare --resume (or give --resume RUN_DIR)")
        return Path(output)
    return Path(resume)


def resume_file(resume: str, output: str | None) -> Path:
    """The state file ``--resume`` names: ``last.pt`` of a run folder, or the file given."""
    target = resume_target(resume, output)
    return target / "last.pt" if target.is_dir() else target


def default_run_name(*parts: str) -> Path:
    """``runs/<part>-<part>-<time>``: a new folder name for a run given no ``--output``."""
    names = [Path(p).name or str(p) for p in parts if p]
    return Path("runs") / "-".join([*names, f"{datetime.now():%Y%m%d-%H%M%S}"])


class Run:
    """A training run's folder, log, metrics and files; only rank 0 writes.

    ``elapsed_before`` is the training time of the run being resumed, so budgets and schedules that
    follow time continue where they stopped.
    """

    def __init__(self, path: Path, env: dist_utils.DistEnv, *, tensorboard: bool = False, progress: bool = True,
                 elapsed_before: float = 0.0) -> None:
        import time

        self.path, self.env, self.progress = Path(path), env, progress
        self._t0, self.elapsed_before = time.time(), elapsed_before
        setup_logging(self.path, env.is_main)
        self.metrics = MetricsWriter(self.path, env.is_main, tensorboard)
        self.files: dict[str, Path] = {"log": self.path / "train.log", "metrics": self.path / "metrics.jsonl",
                                       "config": self.path / "config.yaml"}

    @classmethod
    def open(cls, cfg: Any, env: dist_utils.DistEnv, default: str | os.PathLike, *, resuming: bool = False,
             output: str | os.PathLike | None = None, elapsed_before: float = 0.0,
             inputs: Sequence[str | os.PathLike] = (), need_bytes: int = 0) -> Run:
        """The run of ``cfg`` (its ``output``, ``overwrite``, ``tensorboard`` and ``progress`` options);
        ``output`` overrides ``cfg.output`` (a resumed run's own folder); ``inputs`` are files the run reads;
        ``need_bytes`` the free space its files need."""
        path = prepare_run_dir(output or cfg.output, default, env, resuming=resuming,
                               overwrite=getattr(cfg, "overwrite", False), inputs=inputs, need_bytes=need_bytes)
        return cls(path, env, tensorboard=getattr(cfg, "tensorboard", False), progress=cfg.progress,
                   elapsed_before=elapsed_before)

    def elapsed(self) -> float:
        """Seconds of training so far, resumed runs included."""
        import time

        return self.elapsed_before + time.time() - self._t0

    def write(self, kind: str, step: int, **values: Any) -> None:
        """One record of ``metrics.jsonl`` (``kind``: step, epoch, eval, stop, ...)."""
        self.metrics.write(kind, step, **values)

    def save_config(self, options: dict, derived: dict | None = None) -> None:
        """``config.yaml``: the resolved options, and the values derived from them under ``_derived``."""
        if self.env.is_main:
            import yaml

            data = {**options, "_derived": derived} if derived else dict(options)
            (self.path / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))

    def save(self, name: str, state: dict | Callable[[], dict]) -> Path:
        """Write a checkpoint atomically (rank 0; ``state`` may be a function, called on rank 0 only)."""
        path = self.path / name
        if self.env.is_main:
            try:
                save_state(path, state() if callable(state) else state)
            except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
                reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
                free = shutil.disk_usage(self.path).free
                raise RunFolderError(f"could not write the checkpoint {path}: {reason} ({free / 2**20:.0f} MiB free "
                                     f"on its disk); the previous {path.name}, if any, is unchanged") from None
            self.files[path.stem] = path
        return path

    def copy(self, name: str, to: str) -> None:
        """Copy one checkpoint of the run to another name (``last.pt`` -> ``best.pt``), atomically."""
        if self.env.is_main:
            tmp = self.path / f".{to}.copy.tmp"
            shutil.copyfile(self.path / name, tmp)
            os.replace(tmp, self.path / to)
            self.files[Path(to).stem] = self.path / to

    def plot(self, draw: Callable[[Path], Path | None]) -> Path | None:
        """``curves.png`` by ``draw(run folder)`` on rank 0; a failed figure is a warning, never a failed run."""
        if not self.env.is_main:
            return None
        try:
            path = draw(self.path)
        except (ValueError, OSError, RuntimeError, KeyError) as err:
            log.warning("could not draw the curves: %s", err)
            return None
        if path is not None:
            self.files["plot"] = Path(path)
        return path

    def finish(self, status: str, **result: Any) -> dict:
        """Write ``result.json`` (status, the task's numbers, elapsed time, files) and close the metrics."""
        record = {"status": status, **result, "wall_time": round(self.elapsed(), 1),
                  "files": {k: str(v) for k, v in self.files.items() if v.exists()}}
        if self.env.is_main:
            (self.path / "result.json").write_text(json.dumps(_plain(record), indent=2))
        self.close()
        return record

    def close(self) -> None:
        """Close the metrics and release the run folder's lock (idempotent)."""
        self.metrics.close()
        if self.env.is_main:
            release_lock(self.path)


def _plain(value: Any) -> Any:
    """JSON-ready: NaN / infinity become null, paths and tensors plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------ optimiser step


class OptimStep:
    """One optimiser step, the same in every task: the loss goes in, the weights come out updated.

    Under fp16 autocast (CUDA) a gradient scaler is used; bf16 and fp32 need none. The loss is
    averaged over processes and checked before the update: a NaN or infinite loss raises
    :class:`NonFiniteLossError` with the weights untouched. Gradients are clipped per ``clip_mode``
    (``global``: one norm over ``params``; ``per-param``: each parameter separately, as DINO).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], env: dist_utils.DistEnv,
                 amp_dtype: torch.dtype | None, *, clip_grad: float | None = None, clip_mode: str = "global",
                 hint: str = "Try a lower --lr, a longer warm-up, --clip-grad 1.0 or --amp none.") -> None:
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"expected clip mode in {CLIP_MODES}, got {clip_mode!r}")
        self.optimizer, self.params, self.env = optimizer, list(params), env
        self.clip_grad, self.clip_mode, self.hint = clip_grad, clip_mode, hint
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.steps = 0

    def __call__(self, loss: torch.Tensor, *, weight: float = 1.0, parts: dict[str, torch.Tensor] | None = None,
                 before_update: Callable[[], None] | None = None) -> float:
        """Back-propagate ``loss`` and update; returns the loss averaged over processes.

        ``weight`` 0 marks a batch that only keeps the processes in step (it adds no gradient and
        is left out of the average); ``parts`` (named loss terms) are named in the error message.
        """
        totals = dist_utils.all_reduce_sum(
            torch.stack([loss.detach().double().cpu() * weight, torch.tensor(float(weight), dtype=torch.float64)]),
            self.env)
        value = float(totals[0] / totals[1].clamp_min(1))
        if not math.isfinite(value):
            detail = f" ({', '.join(f'{k} {float(v.detach()):.4g}' for k, v in parts.items())})" if parts else ""
            raise NonFiniteLossError(f"the training loss is {value}{detail} at step {self.steps + 1}; stopping (the "
                                     f"weights were not updated with it). {self.hint}")
        self.optimizer.zero_grad(set_to_none=True)
        scaled = loss * weight
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            if self.clip_mode == "global":
                nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            else:
                from .optim import clip_grad_per_param_

                clip_grad_per_param_(self.params, self.clip_grad)
        if before_update is not None:
            before_update()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.steps += 1
        return value

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state.get("steps", 0))
