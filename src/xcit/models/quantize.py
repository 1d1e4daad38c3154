"""Post-training int8 quantisation: ``quantize(model, images)`` returns an int8 inference copy.

The path is PT2E static quantisation with the x86 Inductor quantizer, the one PyTorch maintains for
int8 on x86 CPUs. In torch 2.14 it lives in **torchao** (``torchao.quantization.pt2e``): the copy
that used to ship as ``torch.ao.quantization.quantize_pt2e`` has been removed from torch, and the
eager-mode / FX-graph-mode ``torch.ao.quantization`` flows are deprecated. torchao is an optional
dependency (``pip install 'xcit[int8]'``), imported only when this transform runs.

Steps, on a deep copy of the plain model (the argument is not modified):

1. LPI's BatchNorm (after a GELU, not after a convolution, so PT2E cannot fold it into one) becomes
   the per-channel affine it computes in eval mode, ``x * s + t`` (folded in float64). Without this
   ``convert_pt2e`` spends about a minute searching the graph for QAT conv-BN patterns that are not
   there; the stem's conv-BN pairs are folded by ``prepare_pt2e`` itself.
   Each XCA block's LayerScale gammas are folded into the layer that ends their branch (``attn.proj``,
   ``local_mp.conv2``, ``mlp.fc2``: exact, and the per-channel int8 weight scales absorb them), so the
   residual sums are plain additions, which Inductor fuses into the int8 product before them.
2. ``torch.export`` with a dynamic batch, height and width (calibrated at one size, the int8 model
   runs at any size from ``patch_size + 1`` to :data:`MAX_SIDE` pixels a side: large images too).
3. ``prepare_pt2e`` with ``X86InductorQuantizer`` and its default static config: uint8 activations
   (per tensor, affine, histogram observers), int8 weights (per output channel, symmetric). It
   quantises every ``Linear`` and ``Conv2d``; the small d x d products of XCA and class attention
   (``aten.matmul``, which the default recipe leaves alone), LayerNorm, softmax, GELU, the L2
   normalisation of XCA and the residual sums stay floating point (step 7). So does the stem's first convolution (raw pixels, 3 or 1 input channels, well
   under 1 % of the multiply-adds), as usual for a first layer; and with one input channel its
   int8 kernel trips an Inductor layout check under a dynamic batch.
4. Calibration: the images run through the observed graph in batches of ``batch_size``.
5. ``convert_pt2e``: a graph of quantize / dequantize ops around float ops (the "Q/DQ" form that
   Inductor pattern-matches); this is what ``xcit export --int8`` saves as a ``.pt2`` program.
6. ``torch.compile`` (Inductor) with ``freezing`` on, only while this model compiles and runs: the
   Q/DQ patterns become oneDNN int8 kernels (VNNI, AMX where the CPU exposes it) with prepacked
   weights. Without compiling, the Q/DQ graph runs in float32 emulation and is slower than fp32.
7. ``float_dtype``: what runs between the int8 products. Where the CPU has bf16 instructions
   (AVX512-BF16 or AMX) it is bf16 by default: the graph compiles and runs under bf16 autocast
   (PyTorch's "int8-mixed-bf16" recipe), so the int8 products write bf16, and the XCA products,
   the first convolution and the elementwise work between layers move half the bytes. Measured
   1.11x the float32 variant at 224 px batch 16 on an AMD EPYC (Zen 4), with the same cosine to
   the fp32 logits. Elsewhere float32 (bf16 without those instructions is slower). Logits are
   float32 either way.

The result accepts any image size (the scales are per tensor, so they carry over; a size far from
the calibration images is best calibrated at, e.g. crops of large images at their own scale) and
refuses training mode. The first input shape compiles for that shape exactly (the fastest code:
about 5 % faster than code for symbolic sizes); the first other shape compiles once more (a minute)
a graph with symbolic sizes that then serves every shape. ``quantize`` compiles on a calibration
batch of ``batch_size`` images: make that the batch you will run. It needs the plain model: :func:`xcit.optimize`'s fused kernels hide the ``Linear``
layers the quantizer looks for, and compiled int8 is faster than the optimised model anyway.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
from torch import nn

from .layers import LPI, XCABlock
from .optimize import bn_scale_shift, fold_scale_into_layer, is_optimized

__all__ = ["QuantizationError", "QuantizedXCiT", "is_quantized", "native_bf16", "quantize"]

#: Calibration images by default (``xcit export --int8`` / ``xcit eval --int8``).
DEFAULT_CALIBRATION_IMAGES = 512
BACKENDS = ("x86",)
#: What may run between the int8 products (``None``: bf16 where the CPU has bf16 instructions).
FLOAT_DTYPES = (None, torch.float32, torch.bfloat16)
#: The largest image side the int8 graph accepts (its height and width are symbolic up to this).
MAX_SIDE = 16384


class QuantizationError(ValueError):
    """A model or calibration set that could not be quantised, or a missing optional dependency."""


class _ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as ``x * scale + shift`` (per channel), folded in float64."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise QuantizationError("cannot quantise a BatchNorm without running statistics")
        s, t = bn_scale_shift(bn)
        dtype = bn.running_var.dtype
        self.register_buffer("scale", s.to(dtype)[:, None, None])
        self.register_buffer("shift", t.to(dtype)[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class _ScaleFoldedXCABlock(XCABlock):
    """An XCA block whose gammas are folded into its branches' last layers (:func:`_fold_layer_scales`)."""

    def forward(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.local_mp(self.norm3(x), hp, wp)
        return x + self.mlp(self.norm2(x))


def _fold_layer_scales(model: nn.Module) -> None:
    """In place, on the working copy: gamma * layer(z) becomes layer'(z) in every plain XCA block."""
    for block in model.modules():
        if type(block) is not XCABlock:
            continue
        branches = ((block.gamma1, block.attn.proj), (block.gamma3, block.local_mp.conv2), (block.gamma2, block.mlp.fc2))
        if not all(type(layer) in (nn.Linear, nn.Conv2d) for _, layer in branches):
            continue  # a replaced layer (LoRA, pruning): leave the block as it is
        with torch.no_grad():
            for gamma, layer in branches:
                w, b = fold_scale_into_layer(gamma, layer)
                layer.weight.copy_(w)
                if layer.bias is not None:
                    layer.bias.copy_(b)
                gamma.fill_(1.0)
        block.__class__ = _ScaleFoldedXCABlock


@contextlib.contextmanager
def _freezing():
    """Inductor's ``freezing`` on for this block only (the earlier value is restored on exit)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


class QuantizedXCiT(nn.Module):
    """An int8 inference model made by :func:`quantize`: the converted PT2E program, compiled.

    Attributes:
        program: the converted Q/DQ ``torch.fx.GraphModule`` (exportable with ``torch.export``).
        img_size: the (H, W) it was calibrated at (it accepts any size; see :meth:`check_input`).
        compiled: whether forward runs the Inductor-compiled program (int8 kernels) or the Q/DQ
            graph as is (float emulation, for checking only).
        float_dtype: what the compiled program runs between its int8 products (bf16 autocast or float32).
    """

    def __init__(self, program: nn.Module, *, in_chans: int, img_size: tuple[int, int], patch_size: int,
                 num_classes: int | None, compiled: bool, calibration_images: int,
                 float_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.program = program
        self.in_chans = in_chans
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.calibration_images = calibration_images
        self.compiled = compiled
        self.float_dtype = float_dtype
        # Not a submodule: the compiled wrapper shares ``program``'s weights and must not appear twice.
        # Automatic dynamic: the first shape compiles as it is, the first other one a graph with symbolic sizes.
        object.__setattr__(self, "_run", torch.compile(program) if compiled else program)
        self.training = False

    def train(self, mode: bool = True) -> QuantizedXCiT:
        if mode:
            raise RuntimeError("an int8 model (xcit.quantize) is inference-only: train the original model and quantise it again")
        self.training = False  # not passed on: the exported program has no train / eval modes
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the expectation if ``x`` is not a batch this model accepts."""
        least = self.patch_size + 1
        expected = (f"a float32 tensor of shape (B, {self.in_chans}, H, W) with B >= 1 and {least} <= H, W <= "
                    f"{MAX_SIDE}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected {expected}, got {type(x).__name__}")
        if (x.ndim != 4 or x.shape[0] < 1 or x.shape[1] != self.in_chans
                or not all(least <= s <= MAX_SIDE for s in x.shape[2:])):
            raise ValueError(f"expected {expected}, got shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise ValueError(f"expected {expected}, got dtype {x.dtype}; convert with x.float()")
        if x.device.type != "cpu":
            raise ValueError(f"expected {expected} on the CPU (the x86 int8 kernels), got device {x.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        with torch.no_grad(), _freezing(), warnings.catch_warnings():
            # a lowering in torchao copy-constructs a tensor while compiling: harmless, and not the caller's to fix
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            if not (self.compiled and self.float_dtype == torch.bfloat16):
                return self._run(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._run(x).float()

    def extra_repr(self) -> str:
        return (f"in_chans={self.in_chans}, img_size={self.img_size}, compiled={self.compiled}, "
                f"float_dtype={self.float_dtype}, calibration_images={self.calibration_images}")


def dynamic_dims(patch_size: int) -> dict:
    """Symbolic batch, height and width of the int8 graph: sizes 0 and 1 are special-cased by the tracer,
    so the least side is ``patch_size + 1`` (one more than a single patch)."""
    dim = torch.export.Dim
    least = patch_size + 1
    return {0: dim("batch", min=1, max=65536), 2: dim("height", min=least, max=MAX_SIDE),
            3: dim("width", min=least, max=MAX_SIDE)}


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles), where bf16 is faster than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without these queries
        return False


def _strip_dtype_asserts(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove export's ``_assert_tensor_metadata`` checks (dtype float32 at each cast), which would fail under
    bf16 autocast; they check, they compute nothing."""
    target = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    if target is None:  # pragma: no cover - older torch
        return graph
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target == target.default and not node.users:
            graph.graph.erase_node(node)
    graph.recompile()
    return graph


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` was made by :func:`quantize`."""
    return isinstance(model, QuantizedXCiT)


def _import_pt2e():
    import logging

    pytree_log = logging.getLogger("torch.utils._pytree")  # torchao's import warns there about an Enum registration
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as err:
        raise QuantizationError(
            f"int8 quantisation needs torchao ({err}): pip install torchao (or 'xcit[int8]')"
        ) from err
    finally:
        pytree_log.setLevel(level)
    return prepare_pt2e, convert_pt2e, xiq


def _check_arguments(model: nn.Module, images: torch.Tensor, backend: str, batch_size: int,
                     float_dtype: torch.dtype | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module (xcit.create_model), got {type(model).__name__}")
    if is_quantized(model):
        raise QuantizationError("the model is already quantised (xcit.quantize returns a new model; quantise the original)")
    if is_optimized(model):
        raise QuantizationError(
            "xcit.quantize takes the plain model (xcit.create_model / load_checkpoint), not xcit.optimize's output: "
            "the optimised model's fused kernels hide the Linear layers the int8 quantizer rewrites"
        )
    if not hasattr(model, "in_chans") or not hasattr(model, "patch_size"):
        raise QuantizationError(f"expected an XCiT model (xcit.create_model), got {type(model).__name__}")
    if model.training:
        raise QuantizationError("expected a model in eval mode (BatchNorm statistics and dropout are frozen "
                                "by quantisation): call model.eval() first")
    if backend not in BACKENDS:
        raise QuantizationError(f"expected backend one of {BACKENDS}, got {backend!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QuantizationError(f"expected batch_size >= 1, got {batch_size!r}")
    if float_dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"expected float_dtype one of {FLOAT_DTYPES}, got {float_dtype!r}")
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    if devices - {"cpu"}:
        raise QuantizationError(f"the x86 int8 path runs on the CPU: move the model with model.cpu() (it is on {sorted(devices)})")
    expected = f"calibration images as a float tensor (N, {model.in_chans}, H, W), normalised like the model's inputs, N >= 1"
    if not isinstance(images, torch.Tensor):
        raise QuantizationError(f"expected {expected}, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != model.in_chans:
        raise QuantizationError(f"expected {expected}, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise QuantizationError(f"expected {expected}, got dtype {images.dtype}; normalise uint8 pixels first")
    if images.shape[0] < 1:
        raise QuantizationError(f"expected {expected}, got no images (shape {tuple(images.shape)})")
    h, w = images.shape[-2:]
    if min(h, w) <= model.patch_size:
        raise QuantizationError(f"expected calibration images larger than the patch size {model.patch_size}, got {h}x{w}")
    if not torch.isfinite(images).all():
        raise QuantizationError("the calibration images hold NaN or infinite values")


def quantize(
    model: nn.Module,
    calibration_images: torch.Tensor,
    *,
    backend: str = "x86",
    batch_size: int = 32,
    compile: bool = True,
    float_dtype: torch.dtype | None = None,
) -> QuantizedXCiT:
    """An int8 copy of ``model`` calibrated on ``calibration_images`` (PT2E, x86 Inductor quantizer).

    Args:
        model: a plain XCiT classifier in eval mode on the CPU (not modified).
        calibration_images: float tensor (N, C, H, W), preprocessed exactly as inputs will be; a few
            hundred representative images are enough (:data:`DEFAULT_CALIBRATION_IMAGES`). The int8
            model then runs at any size (H, W is where its activation ranges were measured).
        backend: ``"x86"`` (the only one: oneDNN int8 kernels through Inductor).
        batch_size: calibration batch size.
        compile: compile with Inductor (int8 kernels) and warm it up on one calibration batch, which
            takes one to three minutes; ``False`` leaves the Q/DQ graph running in float emulation
            (slower than fp32: for inspecting or exporting the program). The warm-up batch's shape
            gets code for that shape exactly: pass the ``batch_size`` you will run.
        float_dtype: what runs between the int8 products once compiled: ``torch.bfloat16``,
            ``torch.float32``, or ``None`` (default): bf16 where the CPU has bf16 instructions
            (:func:`native_bf16`), else float32.

    Raises :class:`QuantizationError` (a ``ValueError``) for bad arguments or a missing torchao.
    """
    _check_arguments(model, calibration_images, backend, batch_size, float_dtype)
    if float_dtype is None:
        float_dtype = torch.bfloat16 if native_bf16() else torch.float32
    prepare_pt2e, convert_pt2e, xiq = _import_pt2e()
    images = calibration_images.detach().float()
    work = copy.deepcopy(model).eval()
    for module in work.modules():
        if isinstance(module, LPI) and isinstance(module.bn, nn.BatchNorm2d):
            module.bn = _ChannelAffine(module.bn)
    _fold_layer_scales(work)
    first_conv = next((name for name, m in work.named_modules() if isinstance(m, nn.Conv2d)), None)
    example = images[:1].expand(2, *images.shape[1:]).contiguous()  # batch 2: a batch of 1 would be specialised
    with torch.no_grad():
        try:
            graph = torch.export.export(work, (example,), dynamic_shapes=(dynamic_dims(model.patch_size),)).module()
        except Exception as err:
            raise QuantizationError(f"torch.export could not trace the model: {type(err).__name__}: {str(err)[:800]}") from err
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        if first_conv is not None:
            quantizer.set_module_name_qconfig(first_conv, None)
        prepared = prepare_pt2e(graph, quantizer)
        for start in range(0, len(images), batch_size):
            prepared(images[start:start + batch_size])
        converted = _strip_dtype_asserts(convert_pt2e(prepared))
    out = QuantizedXCiT(
        converted, in_chans=model.in_chans, img_size=tuple(images.shape[-2:]), patch_size=model.patch_size,
        num_classes=getattr(model, "num_classes", None), compiled=compile, calibration_images=len(images),
        float_dtype=float_dtype,
    )
    if compile:
        out(images[:min(len(images), batch_size)])  # compile now, not at the caller's first batch
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percentage of rows whose top-1 class is the same in logits ``a`` and ``b``."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (N, classes) logit tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return 100.0 * float((a.argmax(1) == b.argmax(1)).float().mean()) if len(a) else math.nan
