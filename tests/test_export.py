"""Export: ONNX (onnxruntime) and torch.export programs agree with PyTorch at several input sizes."""
from __future__ import annotations

import json

import pytest
import torch

from xcit import export as ex
from xcit.cli import main
from xcit.models import XCiT
from xcit.models.weights import save_checkpoint

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

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


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_parity_at_three_sizes(tmp_path, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    model = _model()
    path = ex.export_onnx(model, tmp_path / "m.onnx", example_size=(28, 28), exporter=exporter)
    dims = _dynamic_dims(path)
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    rows = ex.check_onnx(model, path, SIZES)
    assert [(r["batch"], r["height"], r["width"]) for r in rows] == SIZES
    assert max(r["max_abs_diff"] for r in rows) < ATOL, rows


def test_torch_export_program_parity(tmp_path):
    model = _model()
    path = ex.export_program(model, tmp_path / "m.pt2", example_size=(28, 28))
    rows = ex.check_program(model, path, SIZES + [(1, 5, 9)])  # the least size: patch + 1
    assert max(r["max_abs_diff"] for r in rows) < 1e-5, rows


def test_fuse_is_offered_only_when_the_model_has_it():
    model = _model()
    if hasattr(model, "fuse"):
        fused = ex.prepare_for_export(_model(), fuse=True)
        x = torch.randn(2, 3, 28, 20)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(ValueError, match="fuse"):
            ex.prepare_for_export(model, fuse=True)


def test_cli_export_writes_models_and_sidecar(tmp_path, capsys):
    ckpt = save_checkpoint(_model(), tmp_path / "toy.pth", extra={
        "classes": [f"k{i}" for i in range(10)],
        "data": {"img_size": 28, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0},
    })
    out = tmp_path / "exported"
    code = main(["export", "--checkpoint", str(ckpt), "-o", str(out), "--exporter", "torchscript"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.count(" ok") == 6  # 3 sizes x 2 formats
    assert sorted(p.name for p in out.iterdir()) == ["toy.json", "toy.onnx", "toy.pt2"]
    meta = json.loads((out / "toy.json").read_text())
    assert meta["classes"][3] == "k3" and meta["mean"] == [0.5] * 3 and meta["img_size"] == [28, 28]
    assert meta["input"] == "image" and meta["output"] == "logits" and meta["onnx_exporter"] == "torchscript"
    assert all(r["max_abs_diff"] < ATOL for r in meta["parity"]["onnx"] + meta["parity"]["pt2"])
