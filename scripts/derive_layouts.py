"""Derive the exact key names and shapes of the released XCiT checkpoints in other libraries' layouts.

Writes ``reference/layouts/*.json`` (see ``reference/layouts/README.md``). Run:

    python scripts/derive_layouts.py --xcit /path/to/facebookresearch/xcit [--out reference/layouts]

``--xcit`` is a clone of facebookresearch/xcit (a git directory or a work tree). The configs under
``detection/configs`` and ``semantic_segmentation/configs`` are read as data (a small evaluator for
their ``dict(...)`` literals, ``_base_`` inheritance merged as mmcv 1.3's ``Config`` does); the
module structure that turns a config into keys is written out below from the sources of the
official backbone (``detection/backbone/xcit.py``), mmdetection 2.11 (FPN, RPNHead,
Shared2FCBBoxHead, FCNMaskHead), mmsegmentation 0.11 (FPN, FPNHead, UPerHead, FCNHead) and
mmpretrain 1.x (``mmpretrain/models/backbones/xcit.py``). Nothing here imports this project's
models: the layouts are an independent statement that tests compare our converters against.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import subprocess
from pathlib import Path

XCIT_COMMIT_NOTE = "facebookresearch/xcit @ {commit} (last upstream commit, July 2021)"
SIZES = {  # name: (embed_dim, depth, heads), the official model table
    "nano_12": (128, 12, 4), "tiny_12": (192, 12, 4), "tiny_24": (192, 24, 4), "small_12": (384, 12, 8),
    "small_24": (384, 24, 8), "medium_24": (512, 24, 8), "large_24": (768, 24, 16),
}


# ----------------------------------------------------------------------------- reading configs


class Repo:
    """Files of a clone, read through git (works on bare mirrors) or from the work tree."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commit = self._git("rev-parse", "HEAD").strip()

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True).stdout

    def read(self, file: str) -> str:
        return self._git("show", f"HEAD:{file}")

    def list(self, folder: str) -> list[str]:
        return sorted(self._git("ls-tree", "-r", "--name-only", "HEAD", folder).split())


def _eval(node: ast.AST, names: dict):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_eval(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_eval(k, names): _eval(v, names) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        out: dict = {}
        for kw in node.keywords:  # `**other` has arg None
            out.update(_eval(kw.value, names) if kw.arg is None else {kw.arg: _eval(kw.value, names)})
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, names)
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, names), _eval(node.right, names)
        ops = {ast.Add: lambda a, b: a + b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
        return ops[type(node.op)](left, right)
    raise ValueError(f"unsupported config expression: {ast.dump(node)[:80]}")


def _merge(base: dict, new: dict) -> dict:
    """mmcv 1.x Config merge: dicts merge recursively unless the new one says ``_delete_=True``."""
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_delete_", False):
            out[k] = _merge(out[k], v)
        else:
            out[k] = {a: b for a, b in v.items() if a != "_delete_"} if isinstance(v, dict) else v
    return out


def read_config(repo: Repo, file: str) -> dict:
    tree = ast.parse(repo.read(file))
    names: dict = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            names[stmt.targets[0].id] = _eval(stmt.value, names)
    merged: dict = {}
    for base in names.pop("_base_", []):
        merged = _merge(merged, read_config(repo, _norm_path(f"{Path(file).parent.as_posix()}/{base}")))
    return _merge(merged, names)


def _norm_path(file: str) -> str:
    parts: list[str] = []
    for p in file.split("/"):
        if p == "..":
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


# ----------------------------------------------------------------------------- module structure -> keys


def conv(prefix: str, cout: int, cin: int, k: int, bias: bool = True, groups: int = 1) -> list:
    keys = [[f"{prefix}weight", [cout, cin // groups, k, k]]]
    return keys + ([[f"{prefix}bias", [cout]]] if bias else [])


def bn(prefix: str, c: int) -> list:
    return [[f"{prefix}{n}", [c]] for n in ("weight", "bias", "running_mean", "running_var")] + [[f"{prefix}num_batches_tracked", []]]


def ln(prefix: str, c: int) -> list:
    return [[f"{prefix}weight", [c]], [f"{prefix}bias", [c]]]


def linear(prefix: str, cout: int, cin: int) -> list:
    return [[f"{prefix}weight", [cout, cin]], [f"{prefix}bias", [cout]]]


def stem_widths(patch: int, dim: int) -> list[int]:
    """ConvPatchEmbed: 3x3 stride-2 convs 3 -> C/8 -> C/4 -> C/2 -> C (p16) or 3 -> C/4 -> C/2 -> C (p8)."""
    return [3, dim // 8, dim // 4, dim // 2, dim] if patch == 16 else [3, dim // 4, dim // 2, dim]


def official_dense_backbone(patch: int, dim: int, depth: int, heads: int) -> list:
    """``detection/backbone/xcit.py`` (= ``semantic_segmentation/backbone/xcit.py``): ConvPatchEmbed
    (Sequential: conv3x3 = Sequential(Conv2d no bias, SyncBN), GELU, ...), XCABlocks, Fourier
    positional encoding, fpn1..fpn4; no cls token, class attention, final norm or head."""
    keys: list = []
    w = stem_widths(patch, dim)
    for i in range(len(w) - 1):
        keys += conv(f"patch_embed.proj.{2 * i}.0.", w[i + 1], w[i], 3, bias=False) + bn(f"patch_embed.proj.{2 * i}.1.", w[i + 1])
    for b in range(depth):
        p = f"blocks.{b}."
        keys += [[p + "gamma1", [dim]], [p + "gamma2", [dim]], [p + "gamma3", [dim]]]
        keys += ln(p + "norm1.", dim) + [[p + "attn.temperature", [heads, 1, 1]]]
        keys += linear(p + "attn.qkv.", 3 * dim, dim) + linear(p + "attn.proj.", dim, dim) + ln(p + "norm2.", dim)
        keys += linear(p + "mlp.fc1.", 4 * dim, dim) + linear(p + "mlp.fc2.", dim, 4 * dim) + ln(p + "norm3.", dim)
        keys += conv(p + "local_mp.conv1.", dim, dim, 3, groups=dim) + bn(p + "local_mp.bn.", dim)
        keys += conv(p + "local_mp.conv2.", dim, dim, 3, groups=dim)
    keys += [["pos_embeder.token_projection.weight", [dim, 64, 1, 1]], ["pos_embeder.token_projection.bias", [dim]]]
    deconv = lambda p: [[p + "weight", [dim, dim, 2, 2]], [p + "bias", [dim]]]  # ConvTranspose2d: (in, out, k, k)
    if patch == 16:  # fpn1: ConvT, SyncBN, GELU, ConvT; fpn2: ConvT; fpn3 Identity; fpn4 MaxPool
        keys += deconv("fpn1.0.") + bn("fpn1.1.", dim) + deconv("fpn1.3.") + deconv("fpn2.0.")
    else:  # fpn1: ConvT; fpn2 Identity; fpn3, fpn4 MaxPool
        keys += deconv("fpn1.0.")
    return keys


def mmdet_mask_rcnn(cfg: dict) -> list:
    """mmdet 2.11 MaskRCNN: backbone, neck (FPN), rpn_head (RPNHead), roi_head (StandardRoIHead)."""
    m = cfg["model"]
    bb = m["backbone"]
    keys = [["backbone." + k, s] for k, s in official_dense_backbone(bb["patch_size"], bb["embed_dim"], bb["depth"], bb["num_heads"])]
    neck = m["neck"]
    out = neck["out_channels"]
    for i, cin in enumerate(neck["in_channels"]):  # ConvModule(norm_cfg=None, act_cfg=None) -> .conv with bias
        keys += conv(f"neck.lateral_convs.{i}.conv.", out, cin, 1) + conv(f"neck.fpn_convs.{i}.conv.", out, out, 3)
    rpn = m["rpn_head"]
    ag = rpn["anchor_generator"]
    anchors = len(ag["ratios"]) * len(ag["scales"])
    keys += conv("rpn_head.rpn_conv.", rpn["feat_channels"], rpn["in_channels"], 3)
    keys += conv("rpn_head.rpn_cls.", anchors * 1, rpn["feat_channels"], 1)  # use_sigmoid: one channel per anchor
    keys += conv("rpn_head.rpn_reg.", anchors * 4, rpn["feat_channels"], 1)
    bh = m["roi_head"]["bbox_head"]
    fc, n = bh["fc_out_channels"], bh["num_classes"]
    keys += linear("roi_head.bbox_head.shared_fcs.0.", fc, bh["in_channels"] * bh["roi_feat_size"] ** 2)
    keys += linear("roi_head.bbox_head.shared_fcs.1.", fc, fc)
    keys += linear("roi_head.bbox_head.fc_cls.", n + 1, fc)  # background is the last class
    keys += linear("roi_head.bbox_head.fc_reg.", 4 * n, fc)  # reg_class_agnostic=False: 4 per class, none for background
    mh = m["roi_head"]["mask_head"]
    c = mh["conv_out_channels"]
    for i in range(mh["num_convs"]):
        keys += conv(f"roi_head.mask_head.convs.{i}.conv.", c, mh["in_channels"] if i == 0 else c, 3)
    keys += [["roi_head.mask_head.upsample.weight", [c, c, 2, 2]], ["roi_head.mask_head.upsample.bias", [c]]]  # deconv x2
    keys += conv("roi_head.mask_head.conv_logits.", mh["num_classes"], c, 1)
    return keys


def mmseg_model(cfg: dict) -> list:
    """mmseg 0.11 EncoderDecoder: backbone, neck (FPN, Semantic FPN only), decode_head, auxiliary_head."""
    m = cfg["model"]
    bb = m["backbone"]
    keys = [["backbone." + k, s] for k, s in official_dense_backbone(bb["patch_size"], bb["embed_dim"], bb["depth"], bb["num_heads"])]
    cm = lambda p, cout, cin, k: conv(p + "conv.", cout, cin, k, bias=False) + bn(p + "bn.", cout)  # ConvModule + SyncBN
    if "neck" in m:
        neck = m["neck"]
        out = neck["out_channels"]
        for i, cin in enumerate(neck["in_channels"]):
            keys += conv(f"neck.lateral_convs.{i}.conv.", out, cin, 1) + conv(f"neck.fpn_convs.{i}.conv.", out, out, 3)
    dh = m["decode_head"]
    ch, n = dh["channels"], dh["num_classes"]
    if dh["type"] == "FPNHead":
        fs = dh["feature_strides"]
        for i, cin in enumerate(dh["in_channels"]):
            length = max(1, int(math.log2(fs[i]) - math.log2(fs[0])))
            step = 2 if fs[i] != fs[0] else 1  # an Upsample module follows each conv above level 0
            for k in range(length):
                keys += cm(f"decode_head.scale_heads.{i}.{k * step}.", ch, cin if k == 0 else ch, 3)
    else:  # UPerHead
        *low, top = dh["in_channels"]
        for j, _ in enumerate(dh["pool_scales"]):  # Sequential(AdaptiveAvgPool2d, ConvModule)
            keys += cm(f"decode_head.psp_modules.{j}.1.", ch, top, 1)
        keys += cm("decode_head.bottleneck.", ch, top + len(dh["pool_scales"]) * ch, 3)
        for i, cin in enumerate(low):
            keys += cm(f"decode_head.lateral_convs.{i}.", ch, cin, 1)
        for i, _ in enumerate(low):
            keys += cm(f"decode_head.fpn_convs.{i}.", ch, ch, 3)
        keys += cm("decode_head.fpn_bottleneck.", ch, len(dh["in_channels"]) * ch, 3)
    keys += conv("decode_head.conv_seg.", n, ch, 1)
    aux = m.get("auxiliary_head")
    if aux:
        for k in range(aux["num_convs"]):
            keys += cm(f"auxiliary_head.convs.{k}.", aux["channels"], aux["in_channels"] if k == 0 else aux["channels"], 3)
        keys += conv("auxiliary_head.conv_seg.", aux["num_classes"], aux["channels"], 1)
    return keys


def mmpretrain_classifier(patch: int, dim: int, depth: int, heads: int, classes: int = 1000) -> list:
    """mmpretrain ImageClassifier(XCiT backbone, LinearClsHead): ``backbone.*`` and ``head.fc.*``.

    ConvPatchEmbed is a Sequential of ConvModules (conv + bn + GELU in one module: consecutive
    indices); the positional encoding's projection is a ConvModule (``.conv``); XCA blocks are
    ``xca_layers``, class-attention blocks ``ca_layers`` with separate q / k / v; LPI's conv1 is a
    ConvModule with the BatchNorm inside (order conv, act, norm); FFN is mmcv's (``layers.0.0``, ``layers.1``).
    """
    keys: list = []
    w = stem_widths(patch, dim)
    for i in range(len(w) - 1):
        keys += conv(f"patch_embed.proj.{i}.conv.", w[i + 1], w[i], 3, bias=False) + bn(f"patch_embed.proj.{i}.bn.", w[i + 1])
    keys += [["cls_token", [1, 1, dim]], ["pos_embed.token_projection.conv.weight", [dim, 64, 1, 1]],
             ["pos_embed.token_projection.conv.bias", [dim]]]
    ffn = lambda p: linear(p + "ffn.layers.0.0.", 4 * dim, dim) + linear(p + "ffn.layers.1.", dim, 4 * dim)
    for b in range(depth):
        p = f"xca_layers.{b}."
        keys += ln(p + "norm1.", dim) + [[p + "attn.temperature", [heads, 1, 1]]]
        keys += linear(p + "attn.qkv.", 3 * dim, dim) + linear(p + "attn.proj.", dim, dim) + ln(p + "norm3.", dim)
        keys += conv(p + "local_mp.conv1.conv.", dim, dim, 3, groups=dim) + bn(p + "local_mp.conv1.bn.", dim)
        keys += conv(p + "local_mp.conv2.conv.", dim, dim, 3, groups=dim) + ln(p + "norm2.", dim) + ffn(p)
        keys += [[p + "gamma1", [dim]], [p + "gamma3", [dim]], [p + "gamma2", [dim]]]
    for b in range(2):
        p = f"ca_layers.{b}."
        keys += ln(p + "norm1.", dim)
        for q in "qkv":
            keys += linear(f"{p}attn.{q}.", dim, dim)
        keys += linear(p + "attn.proj.", dim, dim) + ln(p + "norm2.", dim) + ffn(p) + [[p + "gamma1", [dim]], [p + "gamma2", [dim]]]
    keys += ln("norm.", dim)
    return [["backbone." + k, s] for k, s in keys] + linear("head.fc.", classes, dim)


# ----------------------------------------------------------------------------- the families


def _settings(cfg: dict, keys: tuple[str, ...]) -> dict:
    return {k: cfg["model"][k] for k in keys if k in cfg["model"]}


def derive_mmdet(repo: Repo) -> dict:
    configs = {}
    for file in repo.list("detection/configs/xcit"):
        name = Path(file).stem.replace("mask_rcnn_", "").replace("_3x_coco", "")
        cfg = read_config(repo, file)
        test = cfg["data"]["test"]["pipeline"][1]
        bb = cfg["model"]["backbone"]
        configs[name] = {
            "config": file,
            "url": f"https://dl.fbaipublicfiles.com/xcit/coco/maskrcnn_{name}.pth",
            "backbone": {k: bb[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "eta", "out_indices")},
            "model": {k: cfg["model"][k] for k in ("neck", "rpn_head", "roi_head", "test_cfg")},
            "test_pipeline": {"img_scale": test["img_scale"], "transforms": test["transforms"]},
            "state_dict": mmdet_mask_rcnn(cfg),
        }
    return {
        "source": XCIT_COMMIT_NOTE.format(commit=repo.commit) + ", detection/configs/xcit/*.py; module "
        "structure: detection/backbone/xcit.py, mmdet 2.11.0 (FPN, RPNHead, Shared2FCBBoxHead, FCNMaskHead)",
        "layout": "{'meta': {'mmdet_version', 'CLASSES', 'config', ...}, 'state_dict': {key: tensor}} (mmcv save_checkpoint)",
        "configs": configs,
    }


def derive_mmseg(repo: Repo) -> dict:
    configs = {}
    for file in repo.list("semantic_segmentation/configs/xcit"):
        stem = Path(file).stem
        name = stem.replace("_80k_ade20k", "").replace("_160k_ade20k", "")
        cfg = read_config(repo, file)
        test = cfg["data"]["test"]["pipeline"][1]
        bb = cfg["model"]["backbone"]
        configs[name] = {
            "config": file,
            "url": f"https://dl.fbaipublicfiles.com/xcit/ade/{name}.pth",
            "backbone": {k: bb[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "eta", "out_indices")},
            "model": {k: cfg["model"][k] for k in ("neck", "decode_head", "auxiliary_head", "test_cfg") if k in cfg["model"]},
            "test_pipeline": {"img_scale": test["img_scale"], "transforms": test["transforms"]},
            "state_dict": mmseg_model(cfg),
        }
    return {
        "source": XCIT_COMMIT_NOTE.format(commit=repo.commit) + ", semantic_segmentation/configs/xcit/**.py; module "
        "structure: semantic_segmentation/backbone/xcit.py, mmseg 0.11.0 (FPN, FPNHead, UPerHead, FCNHead)",
        "layout": "{'meta': {'mmseg_version', 'CLASSES', 'PALETTE', 'config', ...}, 'state_dict': {key: tensor}}",
        "configs": configs,
    }


def derive_mmpretrain() -> dict:
    configs = {}
    for size, (dim, depth, heads) in SIZES.items():
        for patch in (16, 8):
            name = f"xcit-{size.replace('_', '-')}-p{patch}"
            configs[name] = {
                "config": f"configs/xcit/{name}_8xb128_in1k.py",
                "arch": f"xcit_{size}_p{patch}",
                "state_dict": mmpretrain_classifier(patch, dim, depth, heads),
            }
    return {
        "source": "open-mmlab/mmpretrain @ ee7f2e88 mmpretrain/models/backbones/xcit.py, mmpretrain/models/heads/cls_head.py, "
        "mmcv 2.x ConvModule / FFN; converted weights listed in configs/xcit/metafile.yml "
        "(https://download.openmmlab.com/mmclassification/v0/xcit/<name>_3rdparty[-dist]_in1k[-384px]_<date>-<hash>.pth)",
        "layout": "{'meta': {...}, 'state_dict': {'backbone.*', 'head.fc.*'}} (mmengine checkpoint)",
        "configs": configs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--xcit", required=True, type=Path, help="a clone (or bare mirror) of facebookresearch/xcit")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reference" / "layouts")
    args = ap.parse_args()
    repo = Repo(args.xcit)
    args.out.mkdir(parents=True, exist_ok=True)
    for file, data in (("mmdet_coco_mask_rcnn.json", derive_mmdet(repo)), ("mmseg_ade20k.json", derive_mmseg(repo)),
                       ("mmpretrain_xcit.json", derive_mmpretrain())):
        text = json.dumps(data, indent=None, separators=(",", ":"))
        (args.out / file).write_text(text.replace(',"configs":', ',\n"configs":').replace('},"', '},\n"') + "\n")
        print(f"wrote {args.out / file}: {len(data['configs'])} configs")


if __name__ == "__main__":
    main()
