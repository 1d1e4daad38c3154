"""Files a command writes: nothing the user has is replaced unless asked, and nothing is left half-written.

One rule for every command that writes (``--overwrite``, one name and one meaning everywhere):

* :func:`claim_file` / :func:`claim_files` / :func:`claim_folder` check the outputs before any work:
  an output that already exists is refused unless ``overwrite``; an output that is one of the
  command's inputs is refused always (replacing what is being read would lose it if anything
  failed, and is never what was meant); an output whose folder cannot be made or written is
  refused at once, not after an hour of work. Each refusal is one line naming the file and the option;
* :func:`atomic_write` writes through a temporary file beside the target and renames it into place,
  so a full disk or an interruption leaves the earlier file (or none), never half a file, and its
  ``OSError`` names the file;
* :func:`staged_folder` does the same for a whole dataset folder (``prepare`` commands);
* :func:`unique_stems` gives the per-image outputs of several inputs distinct names, also when two
  inputs share a stem (``a.png`` and ``a.jpg``).
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .images import display_path

_HINT = "give --overwrite to replace {it}, or choose another {option}"


def _writable_folder(folder: Path, option: str, target: Path) -> None:
    """``ValueError`` naming ``target`` unless ``folder`` exists and can be written, or can be made (its nearest
    existing ancestor is a folder that can be written)."""
    ancestor = folder
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot write {option} {display_path(target)}: {display_path(ancestor)} is a file, "
                         "not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {option} {display_path(target)}: the folder {display_path(ancestor)} is not "
                         "writable (permissions, or a read-only file system)")


def claim_file(path: str | os.PathLike, *, overwrite: bool = False, option: str = "--output",
               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` as a file the command may write; checked before any work (module docstring)."""
    path = Path(path)
    try:
        target = os.stat(path)
    except (OSError, ValueError):
        target = None
    for source in inputs:
        if source is None:
            continue
        same = os.path.abspath(path) == os.path.abspath(source)
        if not same and target is not None:
            try:
                found = os.stat(source)
                same = (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino)
            except (OSError, ValueError):
                pass
        if same:
            raise ValueError(f"{option} {display_path(path)} is the command's input {display_path(source)}: writing "
                             f"it would replace what is being read; choose another {option}")
    if path.is_dir():
        raise ValueError(f"expected {option} to be a file, got {display_path(path)}, which is a folder")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{option} {display_path(path)} already exists; " + _HINT.format(it="it", option=option))
    _writable_folder(path.parent, option, path)
    return path


def claim_folder(path: str | os.PathLike, *, option: str = "--output") -> Path:
    """``path`` as a folder the command may write into (it may exist, or be made); checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"expected {option} to be a folder, got {display_path(path)}, which is a file")
    _writable_folder(path, option, path)
    return path


def claim_files(folder: str | os.PathLike, names: Iterable[str], *, overwrite: bool = False,
                option: str = "--output") -> list[Path]:
    """The files ``folder/name`` a command will write, checked together before any work: the folder as by
    :func:`claim_folder`, and any of them that exists is refused unless ``overwrite`` (naming the first few)."""
    folder = claim_folder(folder, option=option)
    paths = [folder / name for name in names]
    if not overwrite:
        existing = [p for p in paths if p.exists() or p.is_symlink()]
        if existing:
            shown = ", ".join(display_path(p.name) for p in existing[:3]) + (
                f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            raise FileExistsError(f"{option} {display_path(folder)} already holds {shown}; "
                                  + _HINT.format(it="them" if len(existing) > 1 else "it", option=option))
    return paths


def _named(err: OSError, path: Path, temporary: Path) -> OSError:
    """A write error ``err`` naming ``path`` (what the user asked for) where it names none or only ``temporary``;
    other errors (a missing input, with its own message) as they are."""
    if err.errno is None or (err.filename is not None and not os.fspath(err.filename).startswith(os.fspath(temporary))):
        return err
    named = OSError(err.errno, err.strerror or str(err), display_path(path))
    named.__cause__ = err
    return named


def _temporary_name(path: Path) -> Path:
    # the suffix is kept: writers (PIL, matplotlib, numpy) choose the format by it
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


class atomic_write:  # noqa: N801 - used like a function: `with atomic_write(path) as tmp:`
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without error,
    removed otherwise (the earlier file, if any, stays as it was). An ``OSError`` names ``path``.

    Also usable step by step (a file written over a long run): :meth:`begin`, then :meth:`commit` or :meth:`discard`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = _temporary_name(self.path)

    def begin(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies (not 0600)
        except OSError as err:
            raise _named(err, self.path, self.tmp) from err
        return self.tmp

    def commit(self) -> Path:
        try:
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.discard()
            raise _named(err, self.path, self.tmp) from err
        return self.path

    def discard(self) -> None:
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Path:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError):
            named = _named(exc, self.path, self.tmp)
            if named is not exc:
                raise named from exc


@contextmanager
def staged_folder(out: str | os.PathLike, entries: Sequence[str], *, overwrite: bool = False,
                  option: str = "--output") -> Iterator[Path]:
    """A temporary folder beside ``out`` to write a dataset into; when the block ends without error, its
    ``entries`` (paths relative to the folder, such as ``images/train`` or ``annotations/train.json``) are moved
    into ``out``. Before anything is written, ``out`` is refused if it is a file, cannot be written, or already
    holds one of ``entries`` (unless ``overwrite``: those are removed just before the new ones move in, so an
    earlier dataset never mixes with the new one). On any error the temporary folder is removed and ``out``
    is as it was. An ``OSError`` names ``out``."""
    out = claim_folder(out, option=option)
    existing = [e for e in entries if (out / e).exists() or (out / e).is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(f"{option} {display_path(out)} already holds {', '.join(existing)} (an earlier dataset); "
                              + _HINT.format(it="it", option=option))
    stage = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
        yield stage
        out.mkdir(exist_ok=True)
        for entry in entries:
            source, target = stage / entry, out / entry
            if not source.exists():
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    except OSError as err:
        named = _named(err, out, stage)
        if named is err:
            raise
        raise named from err
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def unique_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A distinct output name stem for each input path, in order: the file's stem where no other input shares it
    (ignoring case, for case-insensitive file systems), else its name with the extension (``a.png`` / ``a.jpg``),
    else with as many parent folders as tell the inputs apart (``x_a.png`` / ``y_a.png``), else numbered
    (``a.png_2``: the same file given twice)."""
    parts = [Path(p) for p in paths]

    def candidate(path: Path, level: int) -> str:  # 0: the stem, 1: the name, 2...: with parent folders
        if level == 0:
            return path.stem
        parents = [q.name for q in path.parents if q.name][:level - 1]
        return "_".join([*reversed(parents), path.name])

    names = [p.stem for p in parts]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.casefold(), []).append(i)
    for group in (g for g in groups.values() if len(g) > 1):
        deepest = 1 + max(len([q for q in parts[i].parents if q.name]) for i in group)
        chosen = 1
        for level in range(1, deepest + 1):
            if len({candidate(parts[i], level).casefold() for i in group}) == len(group):
                chosen = level
                break
        for i in group:
            names[i] = candidate(parts[i], chosen)
    taken: set[str] = set()
    unique = []
    for name in names:  # what the rules above could not tell apart, and new names that meet other stems
        numbered, k = name, 1
        while numbered.casefold() in taken:
            k += 1
            numbered = f"{name}_{k}"
        taken.add(numbered.casefold())
        unique.append(numbered)
    return unique
