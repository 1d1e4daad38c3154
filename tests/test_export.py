"""Export: ONNX (onnxruntime) and torch.export programs agree with PyTorch at several input sizes."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from xcit import export as ex
from xcit.cli import main
from xcit.inference import Predictor, load_for_inference
from xcit.models import XCiT
from xcit.models.weights import save_checkpoint


ATOL = 1e-4


def _model() -> XCiT:
    torch.manual_seed(0)
    model = XCiT(patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and weights
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


SIZES = ex.check_sizes((28, 28), 4)


def test_check_sizes_cover_square_rectangular_and_non_multiple():
    assert [s[0] for s in SIZES] == [1, 2, 3]  # three batch sizes too
    (_, h0, w0), (_, h1, w1), (_, h2, w2) = SIZES
    assert h0 == w0 and h1 != w1 and h1 % 4 == w1 % 4 == 0 and h2 % 4 and w2 % 4


def _dynamic_dims(path) -> list:
    graph = onnx.load(str(path)).graph
    return [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]


def test_onnx_parity_at_three_sizes(tmp_path):
    """The torch.export-based exporter; the TorchScript one is checked through the CLI test below."""
    model = _model()
    path = ex.export_onnx(model, tmp_path / "m.onnx", example_size=(28, 28), exporter="dynamo")
    dims = _dynamic_dims(path)
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    rows = ex.check_onnx(model, path, SIZES)
    assert [(r["batch"], r["height"], r["width"]) for r in rows] == SIZES
    assert max(r["max_abs_diff"] for r in rows) < ATOL, rows


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_xca_attention_times_values_is_one_einsum_node(tmp_path, exporter):
    """Each XCA block's attn @ v is exported as an ONNX Einsum (NNCF leaves it in float; as a MatMul on the
    transposed v, OpenVINO's int8 graph transposed int8 data slowly), while PyTorch keeps the matmul."""
    model = _model()
    path = ex.export_onnx(model, tmp_path / "m.onnx", example_size=(28, 28), exporter=exporter)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Einsum") == len(model.blocks), ops
    assert max(r["max_abs_diff"] for r in ex.check_onnx(model, path, SIZES[:2])) < ATOL
    traced = torch.fx.symbolic_trace(model.blocks[0].attn)
    assert any(n.target is torch.matmul for n in traced.graph.nodes)
    assert not any(n.target is torch.einsum for n in traced.graph.nodes)


def test_exported_attention_splits_qkv_and_projects_the_cls_query_alone(monkeypatch):
    """Under ONNX export, XCA unbinds q, k, v (one Split, not a Slice OpenVINO runs on its reference kernel) and
    class attention projects the cls token's query alone: the same values. A hooked or replaced qkv still runs
    as a module (its hook fires)."""
    from xcit.models import layers

    model = _model()
    block, cls_attn = model.blocks[0], model.cls_attn_blocks[0].attn
    x = torch.randn(2, 17, model.embed_dim)
    with torch.no_grad():
        ref_block, ref_cls = block(x[:, 1:], 4, 4), cls_attn(x)
        monkeypatch.setattr(layers, "_onnx_exporting", lambda: True)
        calls = []
        run = torch.nn.Linear.forward
        monkeypatch.setattr(cls_attn.qkv, "forward", lambda t: calls.append(1) or run(cls_attn.qkv, t))
        torch.testing.assert_close(block(x[:, 1:], 4, 4), ref_block, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cls_attn(x), ref_cls, atol=1e-6, rtol=1e-5)
        assert calls == []  # the weights' rows, not the module over every token
        cls_attn.qkv.register_forward_hook(lambda m, i, o: calls.append(2))
        torch.testing.assert_close(cls_attn(x), ref_cls, atol=1e-6, rtol=1e-5)
        assert calls == [1, 2]


def test_prepare_for_export_optimize_gives_the_same_logits():
    model = _model()
    optimized = ex.prepare_for_export(_model(), optimize=True)
    x = torch.randn(2, 3, 28, 20)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), atol=1e-4, rtol=1e-4)


def test_optimized_export_is_dynamic_and_exact(tmp_path):
    """The inference transform (`xcit export --optimize`) exports with dynamic batch, height and width
    under torch.export and both ONNX exporters (a fixed-size trace would fail the parity check at the
    other sizes) and matches PyTorch."""
    optimized = ex.prepare_for_export(_model(), optimize=True)
    for name, export, check in (
        ("f.pt2", ex.export_program, ex.check_program),
        ("t.onnx", lambda m, p, **kw: ex.export_onnx(m, p, exporter="torchscript", **kw), ex.check_onnx),
        ("d.onnx", lambda m, p, **kw: ex.export_onnx(m, p, exporter="dynamo", **kw), ex.check_onnx),
    ):
        path = export(optimized, tmp_path / name, example_size=(28, 28))
        assert max(r["max_abs_diff"] for r in check(optimized, path, SIZES)) < ATOL, name


@pytest.mark.filterwarnings("ignore")
def test_a_fixed_size_onnx_file_is_refused(tmp_path):
    """The dynamo exporter can fall back to a trace that bakes in the example's size instead of
    failing: such a file must be removed and reported, never shipped."""
    path = tmp_path / "static.onnx"
    model = _model()
    torch.onnx.export(model, (torch.randn(1, 3, 28, 28),), path, dynamo=False, input_names=["image"])
    with pytest.raises(ex.ExportError, match="fixed batch, height, width"):
        ex._check_dynamic_onnx(path, "dynamo")
    assert not path.exists()


def test_cli_export_and_the_docs_snippet_without_this_package(tmp_path, capsys):
    """`xcit export` writes ONNX, .pt2 and the sidecar JSON; the README's "without this package" code then
    runs as written on them, with xcit made unimportable, and agrees with the package's predictions."""
    ckpt = save_checkpoint(_model(), tmp_path / "model.pth", extra={
        "classes": [f"k{i}" for i in range(10)],
        "data": {"img_size": 28, "in_chans": 3, "mean": [0.5, 0.45, 0.4], "std": [0.25, 0.2, 0.3], "crop_pct": 0.875},
    })
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(ckpt), "-o", str(out), "--exporter", "torchscript"]) == 0
    assert capsys.readouterr().out.count(" ok") == 6  # 3 sizes x 2 formats
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.pt2"]  # the names the doc uses
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"][3] == "k3" and meta["mean"] == [0.5, 0.45, 0.4] and meta["img_size"] == [28, 28]
    assert meta["input"] == "image" and meta["output"] == "logits" and meta["onnx_exporter"] == "torchscript"
    assert all(r["max_abs_diff"] < ATOL for r in meta["parity"]["onnx"] + meta["parity"]["pt2"])
    # the program's least input: patch + 1 pixels a side
    assert ex.check_program(load_for_inference(ckpt).model, out / "model.pt2", [(1, 5, 9)])[0]["max_abs_diff"] < 1e-5

    doc = (Path(__file__).resolve().parents[1] / "docs" / "attention_export_predict.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    snippet = next(b for b in blocks if "onnxruntime" in b)
    snippet += "\nonnx_logits = logits\n" + next(b for b in blocks if "torch.export.load" in b)  # the .pt2 snippet
    snippet += "\nassert abs(logits.detach().numpy() - onnx_logits).max() < 1e-4\n"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype="uint8")).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 33, 3), dtype="uint8")).save(tmp_path / "b.jpg", quality=95)
    (tmp_path / "snippet.py").write_text(snippet)
    code = "import sys; sys.modules['xcit'] = None; exec(open('snippet.py').read())"
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = [ast.literal_eval(line) for line in result.stdout.splitlines()]
    expected = list(Predictor.load(ckpt).predict([tmp_path / "a.png", tmp_path / "b.jpg"], top_k=3))
    for got, want in zip(printed, expected, strict=True):
        assert [label for label, _ in got] == want.labels
        np.testing.assert_allclose([p for _, p in got], want.probs, atol=0.02)


@pytest.mark.parametrize("optimize", [False, True])
def test_openvino_ir_is_dynamic_and_exact(tmp_path, optimize):
    """ONNX -> OpenVINO IR (fp32), run by OpenVINO's CPU plugin at three sizes: parity with PyTorch."""
    model = ex.prepare_for_export(_model(), optimize=optimize)
    onnx_path = ex.export_onnx(model, tmp_path / "m.onnx", example_size=(28, 28), exporter="torchscript")
    xml = ex.export_openvino(onnx_path, tmp_path / "m.xml")
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    rows = ex.check_openvino(model, xml, SIZES)
    assert [(r["batch"], r["height"], r["width"]) for r in rows] == SIZES
    assert max(r["max_abs_diff"] for r in rows) < ATOL, rows
