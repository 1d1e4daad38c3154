"""Where released weights come from: the Hugging Face Hub (timm's repositories), and the DINO,
COCO and ADE20k release files, by name.

Names accepted wherever weights are asked for (``create_model(..., pretrained=True)``,
``create_pyramid``, the command line's ``--pretrained`` / ``--checkpoint``):

- ``hf-hub:timm/xcit_nano_12_p16_224.fb_in1k``: ``model.safetensors`` of that Hub repository, through
  the ``huggingface_hub`` client, so its cache (``HF_HOME`` / ``HF_HUB_CACHE``) and offline mode
  (``HF_HUB_OFFLINE=1``) apply;
- ``dino_xcit_small_12_p16`` (and small_12_p8, medium_24_p16, medium_24_p8): DINO's backbone-only files;
- ``maskrcnn_xcit_tiny_12_p16`` ...: the COCO Mask R-CNN files; ``sem_fpn_xcit_...`` /
  ``upernet_xcit_...``: the ADE20k files (used by :mod:`xcit.detect` and :mod:`xcit.segment`).

Release files land in the torch hub cache (:func:`xcit.models.weights.download_file`); with
``XCIT_WEIGHTS_URL`` set they are fetched from ``$XCIT_WEIGHTS_URL/<file name>`` instead.
No network is touched unless one of these names is used and the file is not cached.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

HF_PREFIX = "hf-hub:"
DINO_URL = "https://dl.fbaipublicfiles.com/dino/{name}_pretrain/{name}_pretrain.pth"
DENSE_URL = "https://dl.fbaipublicfiles.com/xcit/{folder}/{name}.pth"
DINO_MODELS = ("dino_xcit_small_12_p16", "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16", "dino_xcit_medium_24_p8")
_DENSE = re.compile(r"^(?P<kind>maskrcnn|sem_fpn|upernet)_(?P<arch>xcit_(?:tiny_12|small_12|small_24|medium_24)_p(?:16|8))$")


def release_file_url(name: str) -> str | None:
    """The download address of a DINO / COCO / ADE20k release ``name``, or None for other names."""
    if name in DINO_MODELS:
        url = DINO_URL.format(name=name)
    elif m := _DENSE.match(name):
        url = DENSE_URL.format(folder="coco" if m["kind"] == "maskrcnn" else "ade", name=name)
    else:
        return None
    base = os.environ.get("XCIT_WEIGHTS_URL")
    return f"{base.rstrip('/')}/{url.rsplit('/', 1)[-1]}" if base else url


def dense_release_arch(name: str) -> tuple[str, str] | None:
    """(``maskrcnn`` | ``sem_fpn`` | ``upernet``, architecture) for a dense release name, else None."""
    m = _DENSE.match(name)
    return (m["kind"], m["arch"]) if m else None


def hub_file(repo_id: str, filename: str = "model.safetensors") -> Path:
    """A file of a Hugging Face Hub model repository: from the hub's cache when it holds it (no network
    touched), else downloaded into that cache. Fails at once when the hub is unreachable or offline."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as err:
        raise ImportError(f"loading {HF_PREFIX}{repo_id} needs the huggingface_hub package: pip install 'xcit[hub]'") from err
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # not cached: fall through to the network
        pass
    try:
        if not constants.HF_HUB_OFFLINE:
            _reachable(constants.ENDPOINT)
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # offline, unreachable, unknown repository, HTTP errors: all mean "not available here"
        text = str(err).splitlines()[0] if str(err) else ""
        raise RuntimeError(
            f"could not get {filename} of the Hugging Face Hub repository {repo_id!r} ({type(err).__name__}: {text}). "
            f"{'Offline mode is on (HF_HUB_OFFLINE=1) and the' if constants.HF_HUB_OFFLINE else 'The'} hub cache "
            f"{constants.HF_HUB_CACHE} does not hold it. Without network access, run `huggingface-cli download {repo_id}` "
            "elsewhere and copy the cache folder here (set HF_HUB_CACHE to it), or download the file and pass checkpoint=PATH."
        ) from err


def _reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Raise ``OSError`` at once when ``endpoint``'s host cannot be reached (the hub client would retry for ~30 s)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
        pass


def hub_architecture(repo_id: str) -> str:
    """The XCiT name a Hub repository holds: its cached ``config.json``'s ``architecture``, else the repository name."""
    try:
        config = json.loads(hub_file(repo_id, "config.json").read_text())
        return str(config.get("architecture") or repo_id.rsplit("/", 1)[-1])
    except (RuntimeError, ImportError, OSError, ValueError):
        return repo_id.rsplit("/", 1)[-1]


def resolve_pretrained(name: str) -> tuple[str, Path]:
    """(architecture name, weights file) for a hub or DINO name; the file is fetched when not cached."""
    from .weights import download_file

    if name.startswith(HF_PREFIX):
        repo_id = name[len(HF_PREFIX):]
        path = hub_file(repo_id)
        return hub_architecture(repo_id), path
    url = release_file_url(name)
    if url is None or name not in DINO_MODELS:
        raise ValueError(f"{name!r} is not a hub (hf-hub:OWNER/REPO) or DINO ({', '.join(DINO_MODELS)}) name")
    return name[len("dino_"):], download_file(url, f"the DINO weights {name}")


def weights_file(spec: str | os.PathLike) -> Path:
    """``spec`` as a local file: an existing path as is, a hub / release / classification name fetched (or
    found in its cache). Raises :class:`CheckpointError` naming the accepted forms otherwise."""
    from .names import resolve_name
    from .weights import CheckpointError, download_file, download_release

    path = Path(spec)
    if path.is_file():
        return path
    name = os.fspath(spec)
    if name.startswith(HF_PREFIX) or name in DINO_MODELS:
        return resolve_pretrained(name)[1]
    url = release_file_url(name)
    if url is not None:
        return download_file(url, f"the released weights {name}")
    try:
        resolve_name(name)
    except ValueError:
        raise CheckpointError(
            f"checkpoint {name!r} {'is a directory' if path.is_dir() else 'does not exist or is not a file'}: expected a "
            "weights file or a known weights name (a classification name such as "
            f"xcit_small_12_p16_224.fb_in1k, hf-hub:OWNER/REPO, {DINO_MODELS[0]}, maskrcnn_xcit_tiny_12_p16, "
            "sem_fpn_xcit_tiny_12_p16, upernet_xcit_tiny_12_p16)"
        ) from None
    return download_release(name)
