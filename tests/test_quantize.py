"""int8 post-training quantisation (``xcit.quantize``, PT2E + x86 Inductor quantizer): a digits model
trained for a few seconds keeps its predictions, bad inputs are refused with clear errors, and the
``xcit export --int8`` / ``xcit eval --int8`` routes work end to end. Needs torchao (``xcit[int8]``)."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import xcit
from conftest import tiny_model
from xcit.cli import main
from xcit.data import BatchEvalTransform, build_dataset
from xcit.inference import load_for_inference
from xcit.models import QuantizationError, QuantizedXCiT, is_quantized, optimize, quantize
from xcit.models.quantize import agreement, native_bf16


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 2-block digits XCiT trained for 3 epochs (seconds), its calibration and held-out images."""
    from xcit.classify import train

    run = train(data="digits", output=str(tmp_path_factory.mktemp("q") / "digits"), epochs=3, threads=1,
                progress=False, tensorboard=False, plot=False)
    inf = load_for_inference(run.model_path)
    tf = BatchEvalTransform(8, crop_pct=1.0, mean=inf.mean, std=inf.std)
    cal = tf(build_dataset("digits", "train").images[:128])
    val = build_dataset("digits", "val")
    return run.model_path, inf.model.eval(), cal, tf(val.images), val.targets


@pytest.fixture(scope="module")
def uncompiled(digits):
    _, model, cal, _, _ = digits
    return quantize(model, cal, compile=False)


def test_the_int8_graph_agrees_with_fp32_on_real_digits(digits, uncompiled):
    _, model, _, x, y = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref, got = model(x), uncompiled(x)
    assert F.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99
    assert agreement(ref, got) >= 97.0
    top1 = lambda logits: (logits.argmax(1) == y).float().mean().item() * 100
    assert top1(got) >= top1(ref) - 2.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the argument is untouched
    assert is_quantized(uncompiled) and not is_quantized(model) and not uncompiled.training
    # int8 weights for every Linear / Conv2d but the stem's first convolution; no BatchNorm left in the graph
    targets = [str(n.target) for n in uncompiled.program.graph.nodes if n.op == "call_function"]
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert sum("dequantize_per_channel" in t for t in targets) == layers - 1
    assert not any("batch_norm" in t for t in targets)


@pytest.mark.parametrize("float_dtype", [torch.float32, torch.bfloat16])
def test_compiled_int8_model(digits, uncompiled, float_dtype):
    """One Inductor compile (int8 kernels), with float32 or bf16 between the int8 products: close to the Q/DQ
    graph, float32 logits, freezing and autocast not left on, then a second shape (symbolic sizes) runs too."""
    import torch._inductor.config as inductor_config

    _, model, cal, x, _ = digits
    freezing = inductor_config.freezing
    # compiled (and warmed up) at the batch size used below
    compiled = quantize(model, cal, batch_size=len(x), float_dtype=float_dtype)
    assert inductor_config.freezing == freezing and not torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        got, qdq, ref = compiled(x), uncompiled(x), model(x)
    assert got.dtype == torch.float32 and compiled.float_dtype == float_dtype
    close = 0.999 if float_dtype == torch.float32 else 0.995
    assert F.cosine_similarity(got.flatten(), qdq.flatten(), dim=0) > close and agreement(ref, got) >= 97.0
    assert compiled.compiled and not uncompiled.compiled
    with torch.no_grad():
        other = compiled(x[:7])
    assert F.cosine_similarity(other.flatten(), got[:7].flatten(), dim=0) > 0.999


def test_float_dtype_follows_the_cpu(digits):
    _, model, cal, _, _ = digits
    expected = torch.bfloat16 if native_bf16() else torch.float32
    assert quantize(model, cal[:8], compile=False).float_dtype == expected


def test_the_int8_graph_runs_at_other_sizes(digits, uncompiled):
    """Calibrated at 8 x 8, the int8 graph runs at larger and non-square sizes and agrees with fp32 there."""
    _, model, _, x, _ = digits
    for size in ((16, 16), (12, 20)):
        big = F.interpolate(x[:64], size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            ref, got = model(big), uncompiled(big)
        assert got.shape == ref.shape
        assert F.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.98, size


def test_the_int8_model_checks_its_inputs_and_refuses_training(uncompiled):
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 2, 16\)"):
        uncompiled(torch.zeros(2, 1, 2, 16))  # below the least side (patch size 2, plus 1)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 8\)"):
        uncompiled(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="float32"):
        uncompiled(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(0, 1, 8, 8\)"):
        uncompiled(torch.zeros(0, 1, 8, 8))
    with pytest.raises(RuntimeError, match="inference-only"):
        uncompiled.train()
    assert uncompiled.eval() is uncompiled and not uncompiled.training


@pytest.mark.parametrize("case, error, match", [
    ("training mode", QuantizationError, "eval mode"),
    ("optimised", QuantizationError, "plain model"),
    ("quantised", QuantizationError, "already quantised"),
    ("not a module", TypeError, "nn.Module"),
    ("uint8 images", QuantizationError, "normalise uint8"),
    ("3-d images", QuantizationError, r"shape \(1, 8, 8\)"),
    ("wrong channels", QuantizationError, r"shape \(4, 3, 8, 8\)"),
    ("no images", QuantizationError, "no images"),
    ("too small", QuantizationError, "larger than the patch size"),
    ("nan", QuantizationError, "NaN"),
    ("backend", QuantizationError, "backend"),
    ("batch size", QuantizationError, "batch_size"),
    ("float dtype", QuantizationError, "float_dtype"),
])
def test_bad_arguments_are_refused_before_any_work(case, error, match, uncompiled):
    model = tiny_model(in_chans=1, patch_size=2).eval()
    images = torch.randn(4, 1, 8, 8)
    kwargs = {}
    if case == "training mode":
        model.train()
    elif case == "optimised":
        model = optimize(model)
    elif case == "quantised":
        model = uncompiled
    elif case == "not a module":
        model = lambda x: x
    elif case == "uint8 images":
        images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    elif case == "3-d images":
        images = torch.randn(1, 8, 8)
    elif case == "wrong channels":
        images = torch.randn(4, 3, 8, 8)
    elif case == "no images":
        images = torch.randn(0, 1, 8, 8)
    elif case == "too small":
        images = torch.randn(4, 1, 2, 2)
    elif case == "nan":
        images[0, 0, 0, 0] = float("nan")
    elif case == "backend":
        kwargs["backend"] = "arm"
    elif case == "batch size":
        kwargs["batch_size"] = 0
    elif case == "float dtype":
        kwargs["float_dtype"] = torch.float16
    with pytest.raises(error, match=match):
        xcit.quantize(model, images, **kwargs)


def test_cli_export_int8_writes_a_program_that_runs_without_this_package(digits, tmp_path, capsys):
    ckpt = digits[0]
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(ckpt), "--int8", "--calibration", "digits", "--calibration-images", "96",
                 "-o", str(out), "--name", "d8"]) == 0
    printed = capsys.readouterr().out
    assert "calibrating on 96 images" in printed and printed.count(" ok") == 3
    assert sorted(p.name for p in out.iterdir()) == ["d8.json", "d8.pt2"]
    meta = json.loads((out / "d8.json").read_text())
    assert meta["int8"]["images"] == 96 and meta["int8"]["dynamic"] == ["batch", "height", "width"] and meta["img_size"] == [8, 8]
    assert meta["int8"]["calibration_agreement"] >= 95.0
    # the saved Q/DQ program stands on torch + torchao (its quantize / dequantize ops), at any batch size, and
    # matches the in-memory int8 graph
    inf = load_for_inference(ckpt)
    qmodel = quantize(inf.model, inf.calibration_images("digits", 96), compile=False)
    inputs = [torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(b)) for b in (1, 5)]
    torch.save(inputs, tmp_path / "inputs.pt")
    code = textwrap.dedent(f"""
        import sys, torch, torchao
        sys.modules["xcit"] = None
        program = torch.export.load({str(out / "d8.pt2")!r}).module()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save([program(x) for x in inputs], {str(tmp_path / "outputs.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        for x, y in zip(inputs, torch.load(tmp_path / "outputs.pt", weights_only=True), strict=True):
            assert (qmodel.program(x) - y).abs().max() < 1e-5


@pytest.mark.parametrize("argv, message", [
    (["--int8"], "--calibration DATA"),
    (["--int8", "--calibration", "digits", "--formats", "onnx", "pt2"], "pt2) only, not onnx"),
    (["--int8", "--calibration", "digits", "--optimize"], "drop --optimize"),
    (["--calibration", "digits"], "add --int8"),
    (["--int8", "--calibration", "digits", "--calibration-images", "0"], "--calibration-images >= 1"),
    (["--int8", "--calibration", "/nonexistent/folder"], "neither a known dataset"),
])
def test_cli_int8_mistakes_are_one_line(digits, tmp_path, capsys, argv, message):
    assert main(["export", "--checkpoint", str(digits[0]), "-o", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_eval_int8(digits, capsys, monkeypatch):
    ckpt = digits[0]
    assert main(["eval", str(ckpt), "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    # the route, with the Q/DQ graph: test_compiled_int8_model pays for the one Inductor compile of this file
    monkeypatch.setattr(xcit.models, "quantize", functools.partial(quantize, compile=False))
    assert main(["eval", str(ckpt), "--int8", "--calibration-images", "364", "--batch-size", "364", "--json"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["n"] == fp32["n"] == 364 and int8["int8"]["calibration_images"] == 364
    assert abs(int8["top1"] - fp32["top1"]) <= 2.0
    assert int8["int8"]["between_products"] == "float32"  # --amp none means no reduced-precision floats
    assert main(["eval", str(ckpt), "--int8", "--amp", "bf16", "--calibration-images", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["int8"]["between_products"] == "bfloat16"
    assert main(["eval", str(ckpt), "--int8", "--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "between the int8 products" in err and "fp16" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(ckpt), "--int8", "--device", "cuda"]) == 2
    assert "one CPU process" in capsys.readouterr().err


def test_quantized_model_is_exported_at_the_top_level():
    assert xcit.quantize is quantize and issubclass(QuantizationError, ValueError) and QuantizedXCiT.__doc__


def test_calibration_images_feed_a_colour_model_from_grey_data():
    """A 3-channel model calibrates on a grey dataset the way it reads grey image files: the channel repeated."""
    from xcit.data import calibration_images

    tf = BatchEvalTransform(8, crop_pct=1.0, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    images = calibration_images("digits", 5, in_chans=3, batch_transform=tf, image_transform=None)
    assert images.shape == (5, 3, 8, 8)
    # the same pixels in every channel, each normalised with its own mean / std
    torch.testing.assert_close(images[:, 0] * 0.2 + 0.5, images[:, 2] * 0.2 + 0.3)
