"""The catalogue of official XCiT architectures: their shapes, the paper's numbers, name resolution
and release-file addresses. Plain data and string handling: every other module of
:mod:`xcit.models` may import it, and it imports none of them."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

RELEASE_URL = "https://dl.fbaipublicfiles.com/xcit/{file}.pth"


@dataclass(frozen=True)
class ModelSpec:
    """One official architecture: shape hyper-parameters and the paper's numbers."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    tokens_norm: bool
    num_params: int
    gmacs_224: float
    top1: tuple[float, float, float]  # ImageNet-1k: 224, 224 distilled, 384 distilled
    drop_path_rate: float = 0.0  # the official fine-tuning / dense configs' choice

    def kwargs(self) -> dict:
        return dict(
            patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, tokens_norm=self.tokens_norm,
        )


# size: (embed_dim, depth, heads, tokens_norm, params p16, params p8, GMACs p16, GMACs p8, drop path)
_SIZES = {
    "nano_12": (128, 12, 4, False, 3_053_224, 3_049_016, 0.55, 2.13, 0.0),
    "tiny_12": (192, 12, 4, True, 6_716_272, 6_706_504, 1.23, 4.77, 0.0),
    "tiny_24": (192, 24, 4, True, 12_116_896, 12_107_128, 2.32, 9.14, 0.05),
    "small_12": (384, 12, 8, True, 26_253_304, 26_213_032, 4.80, 18.62, 0.05),
    "small_24": (384, 24, 8, True, 47_671_384, 47_631_112, 9.06, 35.68, 0.1),
    "medium_24": (512, 24, 8, True, 84_395_752, 84_323_624, 16.08, 63.34, 0.15),
    "large_24": (768, 24, 16, True, 189_096_136, 188_932_648, 35.79, 140.95, 0.25),
}
# Official README top-1 (224 / 224 distilled / 384 distilled), patch 16 then patch 8.
_TOP1 = {
    "nano_12": ((69.9, 72.2, 75.4), (73.8, 76.3, 77.8)),
    "tiny_12": ((77.1, 78.6, 80.9), (79.7, 81.2, 82.4)),
    "tiny_24": ((79.4, 80.4, 82.6), (81.9, 82.6, 83.7)),
    "small_12": ((82.0, 83.3, 84.7), (83.4, 84.2, 85.1)),
    "small_24": ((82.6, 83.9, 85.1), (83.9, 84.9, 85.6)),
    "medium_24": ((82.7, 84.3, 85.4), (83.7, 85.1, 85.8)),
    "large_24": ((82.9, 84.9, 85.8), (84.4, 85.4, 86.0)),
}

MODELS: dict[str, ModelSpec] = {}
for _size, (_dim, _depth, _heads, _tn, _p16, _p8, _g16, _g8, _dpr) in _SIZES.items():
    for _patch, _params, _gmacs, _top1 in ((16, _p16, _g16, _TOP1[_size][0]), (8, _p8, _g8, _TOP1[_size][1])):
        _name = f"xcit_{_size}_p{_patch}"
        MODELS[_name] = ModelSpec(_name, _dim, _depth, _heads, _patch, _tn, _params, _gmacs, _top1, _dpr)

# Release weights per tag: timm's pretrained tags map onto the official file names.
WEIGHT_TAGS = {"in1k": "_224", "dist_in1k": "_224_dist", "dist_in1k_384": "_384_dist"}

_ALIAS = re.compile(r"^(?P<base>xcit_[a-z]+_\d+_p\d+)(?:_(?P<res>224|384))?(?:\.fb_(?P<tag>in1k|dist_in1k))?$")


@dataclass(frozen=True)
class ResolvedName:
    arch: str  # official architecture name
    weights: str  # key of WEIGHT_TAGS
    img_size: int


def resolve_name(name: str) -> ResolvedName:
    """Map an official or timm-style name to (architecture, release weights, default resolution).

    ``xcit_small_12_p16``, ``xcit_small_12_p16_224``, ``xcit_small_12_p16_224.fb_dist_in1k`` and
    ``xcit_small_12_p16_384.fb_dist_in1k`` are all accepted.
    """
    match = _ALIAS.match(name.strip().lower()) if isinstance(name, str) else None
    if match is None or match["base"] not in MODELS:
        raise ValueError(f"unknown model {name!r}; known architectures: {', '.join(MODELS)} (see xcit.list_models())")
    res = int(match["res"] or 224)
    tag = match["tag"] or ("dist_in1k" if res == 384 else "in1k")
    if res == 384 and tag != "dist_in1k":
        raise ValueError(f"{name!r}: only distilled weights (.fb_dist_in1k) exist at 384")
    return ResolvedName(match["base"], "dist_in1k_384" if res == 384 else tag, res)


def list_models(pattern: str = "*", aliases: bool = False) -> list[str]:
    """Official architecture names matching a glob ``pattern``; with ``aliases`` also timm's names."""
    import fnmatch

    names = list(MODELS)
    if aliases:
        names += [f"{n}_{r}" for n in MODELS for r in (224, 384)]
        names += [f"{n}_224.fb_in1k" for n in MODELS] + [f"{n}_{r}.fb_dist_in1k" for n in MODELS for r in (224, 384)]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def release_url(name: str) -> str:
    """Download address of the official release file that ``name`` refers to.

    The base can be redirected with the ``XCIT_WEIGHTS_URL`` environment variable (a mirror or a
    ``file://`` folder), for machines without access to dl.fbaipublicfiles.com.
    """
    resolved = resolve_name(name)
    file = resolved.arch + WEIGHT_TAGS[resolved.weights]
    base = os.environ.get("XCIT_WEIGHTS_URL")
    return f"{base.rstrip('/')}/{file}.pth" if base else RELEASE_URL.format(file=file)
