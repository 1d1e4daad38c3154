"""Reading and writing XCiT weights: official release files, timm state dicts, safetensors.

Files are read with ``torch.load(weights_only=True)`` (never arbitrary unpickling) or with
safetensors. The format is detected from the content; everything is converted to the official
layout (``pos_embeder.*``, fused class-attention ``qkv``) before loading.

Every file this project writes records :func:`content_digest` of everything it holds, tensors and
plain values alike (``DIGEST_KEY``: a top-level entry of ``.pth`` / ``.pt`` dicts; in safetensors
metadata it covers the tensors and every other metadata value); reading checks it, so a corrupted
file, a changed class name or preprocessing value included, is an error rather than silently
different weights or labels. Files written before (``LEGACY_DIGEST_KEY``: the tensors only) are
still checked as they were, and files without any digest still load. Weights that hold NaN or
infinity are refused when a model is built from them (:func:`check_finite`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from .mmpretrain import MMPRETRAIN_MARK, from_mmpretrain
from .names import MODELS, release_url, resolve_name

PathLike = str | os.PathLike
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
_DINO_KEYS = ("teacher", "student")  # DINO training checkpoints (official and `xcit dino`): teacher first
_BACKBONE_PREFIXES = ("module.backbone.", "backbone.body.", "backbone.", "encoder.")  # backbone.body.: our detectors
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_CA_QKV = re.compile(r"^(cls_attn_blocks\.\d+\.attn)\.([qkv])\.(weight|bias)$")
DIGEST_KEY = "content_sha256"  # content_digest: every value
LEGACY_DIGEST_KEY = "tensor_sha256"  # tensor_digest: the tensors only (files written before content_sha256)
_EXPECTED = "expected a PyTorch .pth/.pt file or a .safetensors file of model weights"


class CheckpointError(ValueError):
    """A weights file that cannot be read, or that does not fit the model."""


def tensor_digest(obj) -> str:
    """SHA-256 (hex) over the name, dtype, shape and bytes of every tensor in ``obj``, in name order.

    ``obj`` is a tensor dict or any nesting of dicts, lists and tuples (a training state); a tensor's
    name is its key path (``model/blocks.0.norm1.weight``). Other values are not covered: the digest of files
    written before :func:`content_digest`, which covers every value.
    """
    sha = hashlib.sha256()
    for name, tensor in sorted(_named_tensors(obj, ""), key=lambda item: item[0]):
        tensor = tensor.detach().cpu().contiguous()
        sha.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def _named_tensors(obj, prefix: str):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _named_tensors(value, f"{prefix}/{i}")


def content_digest(obj) -> str:
    """SHA-256 (hex) over every value in ``obj``: tensors by name, dtype, shape and bytes, and every other value
    (strings, numbers, booleans, None, bytes, the structure of dicts, lists and tuples) by type and value.

    Dict keys are taken in sorted order (by type and text), so the digest does not depend on insertion
    order; a float is hashed exactly (``float.hex``), so ``0.1`` and ``0.10000000000000002`` differ.
    """
    sha = hashlib.sha256()
    _feed(sha, obj)
    return sha.hexdigest()


def _feed(sha, value) -> None:
    """Hash ``value`` with a type tag and a length prefix for each part, so that no two values share a stream."""
    def part(tag: bytes, data: bytes) -> None:
        sha.update(tag + len(data).to_bytes(8, "little") + data)

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        part(b"T", f"{tensor.dtype}\0{tuple(tensor.shape)}".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        part(b"D", str(len(items)).encode())
        for key, item in items:
            _feed(sha, key)
            _feed(sha, item)
    elif isinstance(value, (list, tuple)):
        part(b"L" if isinstance(value, list) else b"U", str(len(value)).encode())
        for item in value:
            _feed(sha, item)
    elif isinstance(value, str):
        part(b"S", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        part(b"Y", bytes(value))
    elif isinstance(value, bool) or value is None:
        part(b"B", repr(value).encode())
    elif isinstance(value, int):
        part(b"I", str(value).encode())
    elif isinstance(value, float):
        part(b"F", value.hex().encode())
    else:  # other objects torch.load(weights_only=True) allows (torch.Size, dtypes, devices...)
        part(b"O", f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode())


def with_digest(payload: dict) -> dict:
    """``payload`` plus its :func:`content_digest` under ``DIGEST_KEY``, ready for ``torch.save``."""
    return {**payload, DIGEST_KEY: content_digest(payload)}


def verify_digest(obj, path: PathLike):
    """``obj`` (a loaded ``.pth`` / ``.pt`` object) without its digest entries, after checking the digest where one
    was recorded (:func:`content_digest`, or :func:`tensor_digest` in files written before it);
    :class:`CheckpointError` saying the file is corrupted otherwise."""
    if not isinstance(obj, dict) or not (DIGEST_KEY in obj or LEGACY_DIGEST_KEY in obj):
        return obj
    body = {k: v for k, v in obj.items() if k not in (DIGEST_KEY, LEGACY_DIGEST_KEY)}
    if DIGEST_KEY in obj:
        _check(obj[DIGEST_KEY], content_digest, body, path)
    else:
        _check(obj[LEGACY_DIGEST_KEY], tensor_digest, body, path)
    return body


def _check(recorded, digest, content, path: PathLike) -> None:
    if not isinstance(recorded, str) or recorded != digest(content):
        what = "tensor data" if digest is tensor_digest else "content (weights, names and settings)"
        raise CheckpointError(
            f"{path}: corrupted: its {what} does not match the SHA-256 recorded when it was written "
            "(the file was changed or damaged after saving; re-copy or re-create it)"
        )


def check_finite(state: dict[str, torch.Tensor], path: PathLike) -> None:
    """:class:`CheckpointError` naming the file and the first tensor (in ``state``'s order) that holds NaN or
    infinity: such weights (a diverged training run, a damaged export) would predict nothing but NaN."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor[~finite]
            nans = int(torch.isnan(bad).sum())
            raise CheckpointError(
                f"{path}: the weights hold non-finite values, first in {name!r} ({nans} NaN, {bad.numel() - nans} "
                f"infinite of {tensor.numel()}); expected finite weights (a diverged training run?)"
            )


def _safetensors_content(tensors: dict, metadata: dict) -> dict:
    """What :func:`content_digest` covers in a safetensors file: its tensors and its metadata (the digest aside)."""
    return {"tensors": tensors,
            "metadata": {k: v for k, v in metadata.items() if k not in (DIGEST_KEY, LEGACY_DIGEST_KEY)}}


def _reason(err: BaseException) -> str:
    """The first line of an exception, short enough for a one-line message."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 160 else text[:157] + "..."


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, in the official key layout, whatever format the file uses."""
    return _read(path)[0]


def _read(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(official-layout state dict, architecture metadata saved by :func:`save_checkpoint` or {})."""
    path = _existing_file(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except Exception as err:  # a damaged header can fail in many ways; all mean the same here
            raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(err)}; {_EXPECTED})") from err
        if DIGEST_KEY in meta:
            _check(meta[DIGEST_KEY], content_digest, _safetensors_content(raw, meta), path)
        elif LEGACY_DIGEST_KEY in meta:
            _check(meta[LEGACY_DIGEST_KEY], tensor_digest, raw, path)
        try:
            arch = json.loads(meta["arch"]) if "arch" in meta else {}
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: corrupted: its 'arch' metadata is not valid JSON ({err})") from err
    else:
        raw = load_file(path)
        arch = raw.get("arch") if isinstance(raw, dict) and isinstance(raw.get("arch"), dict) else {}
        task = TASK_FORMATS.get(raw.get("format")) if isinstance(raw, dict) else None
        if task is not None:
            arch = {**arch, "task": task}
    return to_official_layout(_unwrap(raw, path)), arch


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "does not exist or is not a file"
        raise CheckpointError(f"checkpoint {str(path)!r} {kind} ({_EXPECTED})")
    return path


def load_file(path: PathLike, *, what: str = "PyTorch checkpoint", map_location="cpu", mmap: bool = False,
              verify: bool = True):
    """The object saved in a ``.pth`` / ``.pt`` file, read with ``torch.load(weights_only=True)`` (tensors
    and plain containers only), its recorded :func:`tensor_digest` checked (and dropped) when ``verify``.

    Any failure to read (not a torch file, truncated, corrupted) is a one-line :class:`CheckpointError`
    naming the file and saying what was expected; ``what`` names the kind of file in that message.
    """
    path = _existing_file(path)
    try:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location=map_location, weights_only=True)  # legacy files cannot be mmapped
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # corrupt data, not a forbidden object
            raise CheckpointError(f"{path}: not a readable {what} (corrupt or truncated; {_EXPECTED})") from err
        raise CheckpointError(
            f"{path}: refused to load, the file holds Python objects beyond tensors and plain "
            "containers, and unpickling them could run arbitrary code. Re-save just the state "
            "dict (torch.save({'model': model.state_dict()}, path)) from a trusted environment."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable {what} ({_reason(err)}; {_EXPECTED})") from err
    except Exception as err:  # pickle internals (KeyError: 101 for a text file...) on damaged or foreign files
        raise CheckpointError(f"{path}: not a readable {what} (not a torch file, or damaged; {_EXPECTED})") from err
    return verify_digest(obj, path) if verify else obj


def read_metadata(path: PathLike) -> dict:
    """The plain entries saved beside the weights (``classes``, ``data``, ``arch``, ``metrics``...).

    ``.pth`` files are read with ``torch.load(weights_only=True)``; safetensors metadata values are
    decoded from JSON. Returns ``{}`` for a file holding a bare state dict.
    """
    path = _existing_file(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(err)}; {_EXPECTED})") from err
        raw = {k: v for k, v in raw.items() if k not in (DIGEST_KEY, LEGACY_DIGEST_KEY)}
        meta = {}
        for key, value in raw.items():
            try:
                meta[key] = json.loads(value)
            except (TypeError, json.JSONDecodeError):
                meta[key] = value
        return meta
    obj = load_file(path, mmap=True, verify=False)  # metadata only: the weights are checked when they are read
    if not isinstance(obj, dict):
        return {}
    skip = _WRAPPER_KEYS + ("model_ema", DIGEST_KEY, LEGACY_DIGEST_KEY)
    return {k: v for k, v in obj.items() if k not in skip and not _holds_tensors(v)}


def _holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return False


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not _looks_like_state_dict(obj):
            # DINO training checkpoints hold both networks: the teacher is the one to use.
            keys = _DINO_KEYS + _WRAPPER_KEYS
            inner = next((obj[k] for k in keys if isinstance(obj.get(k), dict) and obj[k]), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _looks_like_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict found (expected tensors, or one under 'model'); found {keys}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return strip_backbone_prefix(state)


def strip_backbone_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The XCiT weights of a wrapped state dict: ``module.`` (DDP) removed, and for DINO-style
    ``backbone.`` / ``encoder.`` wrappers only the backbone's keys, prefix removed (the DINO head dropped)."""
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


def _looks_like_state_dict(obj: dict) -> bool:
    return bool(obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def to_official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm keys to the official ones: ``pos_embed.`` -> ``pos_embeder.``, q/k/v -> fused qkv;
    mmpretrain classifiers (``backbone.xca_layers.*``) are renamed first (:mod:`xcit.models.mmpretrain`)."""
    if any(k.startswith(MMPRETRAIN_MARK) for k in state):
        state, unknown = from_mmpretrain(state)
        if unknown:
            raise CheckpointError(
                f"an mmpretrain XCiT checkpoint was expected (keys '{MMPRETRAIN_MARK}*'), but {len(unknown)} keys fit no "
                f"XCiT module: {', '.join(unknown[:8])}"
            )
    out: dict[str, torch.Tensor] = {}
    split: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("pos_embed."):
            key = "pos_embeder." + key[len("pos_embed."):]
        m = _CA_QKV.match(key)
        if m:
            split.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        out[key] = value
    for (prefix, kind), parts in split.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{prefix}: found only {sorted(parts)} of the separate q/k/v {kind}s")
        out[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def check_layout(
    expected: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], unknown: list[str], header: str
) -> None:
    """Raise :class:`CheckpointError` (``header`` then the keys) unless ``converted`` has exactly the keys and
    shapes of ``expected``; ``unknown`` lists source keys no conversion rule took."""
    missing = [k for k in expected if k not in converted]
    unexpected = list(unknown) + [k for k in converted if k not in expected]
    bad = [f"{k}: file {tuple(converted[k].shape)} vs expected {tuple(v.shape)}"
           for k, v in expected.items() if k in converted and converted[k].shape != v.shape]
    if missing or unexpected or bad:
        lines = [header]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", bad)):
            if keys:
                lines.append(f"{label} keys ({len(keys)}): " + "; ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
        raise CheckpointError("\n".join(lines))


def infer_architecture(state: dict[str, torch.Tensor]) -> dict:
    """Architecture hyper-parameters read off the tensor shapes of an official-layout state dict."""
    arch: dict = {}
    if "cls_token" in state:
        arch["embed_dim"] = state["cls_token"].shape[-1]
    stem = sorted(int(k.split(".")[2]) for k in state if re.match(r"^patch_embed\.proj\.\d+\.0\.weight$", k))
    if stem:
        arch["patch_size"] = 2 ** len(stem)
        arch["in_chans"] = state[f"patch_embed.proj.{stem[0]}.0.weight"].shape[1]
        arch.setdefault("embed_dim", state[f"patch_embed.proj.{stem[-1]}.0.weight"].shape[0])
    blocks = {int(m[1]) for k in state if (m := _BLOCK.match(k))}
    if blocks:
        arch["depth"] = max(blocks) + 1
    if "blocks.0.attn.temperature" in state:
        arch["num_heads"] = state["blocks.0.attn.temperature"].shape[0]
    if "head.weight" in state:
        arch["num_classes"] = state["head.weight"].shape[0]
    elif arch:
        arch["num_classes"] = 0
    name = next(
        (
            n for n, s in MODELS.items()
            if (s.embed_dim, s.depth, s.num_heads, s.patch_size)
            == (arch.get("embed_dim"), arch.get("depth"), arch.get("num_heads"), arch.get("patch_size"))
        ),
        None,
    )
    if name:
        arch["name"] = name
        arch["tokens_norm"] = MODELS[name].tokens_norm
    return arch


# Files of the dense tasks (a whole detector / segmenter): their backbone serves as --pretrained weights, the
# file itself is not a classifier for create_model.
TASK_FORMATS = {"xcit-detector-1": "detect", "xcit-segmenter-1": "segment"}


def inspect_checkpoint(path: PathLike) -> dict:
    """The architecture a checkpoint holds: saved metadata where present, else read off its shapes.

    A detection or segmentation checkpoint is a :class:`CheckpointError` that says which commands take it.
    """
    state, saved = _read(path)
    task = saved.pop("task", None)
    if task is not None:
        what = {"detect": "detection", "segment": "segmentation"}[task]
        raise CheckpointError(
            f"{path} is a {what} checkpoint (a whole {'detector' if task == 'detect' else 'segmenter'}, written by "
            f"`xcit {task} train`), not an XCiT classifier: use it with `xcit {task} eval` / `xcit {task} predict`, "
            f"or give it as --pretrained to `xcit {task} train` to start from its backbone")
    return {**infer_architecture(state), **saved}


TRUNK_PREFIXES = ("patch_embed.", "pos_embeder.", "blocks.")  # what a dense backbone keeps of a classifier


def read_trunk(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(trunk weights, architecture) of any XCiT checkpoint, for a dense backbone.

    Reads what :func:`read_state_dict` reads (official release, timm, bare state dicts, safetensors,
    DINO checkpoints, whose teacher is used, and segmentation checkpoints written by this project,
    ``backbone.`` prefix) and keeps the ``patch_embed`` / ``pos_embeder`` / ``blocks`` weights;
    the architecture is the one :func:`inspect_checkpoint` reports.
    """
    state, saved = _read(path)
    trunk = {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIXES)}
    if not any(k.startswith("blocks.") for k in trunk):
        raise CheckpointError(f"{path}: no XCiT blocks found (expected keys like 'blocks.0.attn.qkv.weight')")
    check_finite(trunk, path)
    return trunk, {**infer_architecture(state), **{k: v for k, v in saved.items() if k != "task"}}


def _describe(arch: dict) -> str:
    if not arch:
        return "no recognisable XCiT weights"
    shape = ", ".join(f"{k}={arch[k]}" for k in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "num_classes") if k in arch)
    return f"{arch['name']} ({shape})" if "name" in arch else f"an unnamed XCiT ({shape})"


def load_checkpoint(
    model: nn.Module, path: PathLike, *, skip_head: bool = False, strict: bool = True
) -> dict[str, list[str]]:
    """Load weights from ``path`` into an XCiT ``model``.

    Args:
        skip_head: leave the model's classifier head as it is (fine-tuning to other classes).
        strict: raise on any missing, unexpected or mis-shaped key. With ``strict=False`` the
            matching keys load and the others are reported in the returned dict.
    Returns:
        ``{"missing": [...], "unexpected": [...], "mismatched": [...]}``.
    Raises:
        CheckpointError: listing every problem and naming the architecture the file holds; naming the first
            tensor that holds NaN or infinity (:func:`check_finite`).
    """
    state = read_state_dict(path)
    if skip_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    if skip_head:
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and state[k].shape != own[k].shape
    ]
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        lines = [
            f"{path} does not fit this model: the file holds {_describe(infer_architecture(state))}, "
            f"the model is {_describe(infer_architecture(model.state_dict()))}."
        ]
        for label, keys in report.items():
            if keys:
                shown = keys[:12] + ([f"... and {len(keys) - 12} more"] if len(keys) > 12 else [])
                lines.append(f"{label} keys ({len(keys)}): " + "; ".join(shown))
        only_head = not missing and not unexpected and all(m.startswith("head.") for m in mismatched)
        if only_head:
            lines.append("Only the classifier head differs: pass skip_head=True to fine-tune to new classes.")
        raise CheckpointError("\n".join(lines))
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    check_finite(loadable, path)
    model.load_state_dict(loadable, strict=False)
    return report


def save_checkpoint(model: nn.Module, path: PathLike, *, extra: dict | None = None) -> Path:
    """Save ``model``'s weights in the official layout: ``{'model': state_dict}`` or ``.safetensors``.

    ``.pth`` files load with the official code, timm's converter and :func:`load_checkpoint`;
    ``extra`` (plain Python values) is stored beside ``'model'`` (or as safetensors metadata), with
    the :func:`content_digest` that loading checks. The model's preprocessing (``model.data_config``, e.g. from
    the checkpoint it was created from) is stored as ``data`` unless ``extra`` gives one. The file is written
    to a temporary name and renamed, so a crash never leaves half a file; it gets the umask's permissions; a
    write that fails (a full disk) is an ``OSError`` naming ``path``.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch = getattr(model, "arch_config", None)
    extra = {**preprocessing_entry(model), **(extra or {})}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {str(k): json.dumps(v) for k, v in {**({"arch": arch} if arch else {}), **extra}.items()}
        write = lambda tmp: save_file(  # noqa: E731
            state, tmp, metadata={**meta, DIGEST_KEY: content_digest(_safetensors_content(state, meta))})
    else:
        payload = {"model": state, **({"arch": dict(arch)} if arch else {}), **extra}
        write = lambda tmp: torch.save(with_digest(payload), tmp)  # noqa: E731
    return write_atomically(path, write)


def write_atomically(path: PathLike, write) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then renamed onto it: never half a file, and the file gets
    the umask's permissions. Any failure to write (torch's and safetensors' writers report a full disk as
    ``RuntimeError`` / ``SafetensorError``) is an ``OSError`` naming ``path``, the temporary file removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temporary_file(path)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err
    mode = os.stat(tmp).st_mode & 0o777  # the umask's; safetensors re-creates the file 0600
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err
    except Exception as err:  # noqa: BLE001 - torch's and safetensors' writer errors: say what happened, and where
        if not isinstance(err, RuntimeError) and type(err).__name__ != "SafetensorError":
            raise
        full = shutil.disk_usage(path.parent).free < (1 << 20)
        reason = "No space left on device" if full else f"could not write the file ({_reason(err)})"
        raise OSError(errno.ENOSPC if full else errno.EIO, reason, os.fspath(path)) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def preprocessing_entry(model: nn.Module) -> dict:
    """``{"data": ...}``: the preprocessing ``model`` records (``data_config``, its ``in_chans``), or ``{}``."""
    data = getattr(model, "data_config", None)
    if not isinstance(data, dict) or not data:
        return {}
    chans = getattr(model, "in_chans", None)
    return {"data": {**data, **({"in_chans": chans} if isinstance(chans, int) else {})}}


def new_temporary_file(path: Path, suffix: str = ".tmp") -> str:
    """A new empty file beside ``path`` (``.NAME.<random>.tmp``), to be renamed onto it, created with the
    permissions any new file gets (0666 less the umask; ``tempfile.mkstemp`` would make it, and so ``path``, 0600)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)


def download_release(name: str, *, timeout: float = 15.0) -> Path:
    """Fetch the official release file for ``name`` into the torch hub cache (once) and return it."""
    return download_file(release_url(name), f"the weights of {resolve_name(name).arch}", timeout=timeout)


def download_file(url: str, what: str, *, timeout: float = 15.0) -> Path:
    """``url`` saved once under the torch hub cache (``checkpoints/<file name>``); the cached file when present.

    Without network access this fails at once with a message naming the file, where to put it and
    the ``XCIT_WEIGHTS_URL`` mirror option.
    """
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temporary_file(target, ".part")
    try:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise RuntimeError(
            f"could not download {what} from {url} ({err}). "
            "Without network access, download the file elsewhere and pass checkpoint=PATH, "
            f"or place it at {target}, or point XCIT_WEIGHTS_URL at a mirror."
        ) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
