"""XCiT models (depends on torch alone)."""
from .layers import LPI, XCA, ClassAttention, ClassAttentionBlock, ConvPatchEmbed, DropPath, FourierPositionalEncoding, Mlp, XCABlock
from .optimize import is_optimized, optimize
from .params import param_groups
from .quantize import QuantizationError, QuantizedXCiT, is_quantized, quantize
from .registry import MODELS, ModelSpec, create_model, create_pyramid, list_models, release_url, resolve_name
from .xcit import XCiT, XCiTPyramid, XCiTTrunk, convert_sync_batchnorm, default_out_indices, revert_sync_batchnorm

__all__ = [
    "LPI", "XCA", "ClassAttention", "ClassAttentionBlock", "ConvPatchEmbed", "DropPath", "FourierPositionalEncoding",
    "Mlp", "XCABlock", "is_optimized", "is_quantized", "optimize", "quantize", "QuantizationError", "QuantizedXCiT", "MODELS", "ModelSpec", "XCiT", "XCiTPyramid", "XCiTTrunk", "convert_sync_batchnorm",
    "create_model", "create_pyramid", "default_out_indices", "list_models", "param_groups", "release_url",
    "resolve_name", "revert_sync_batchnorm",
]
