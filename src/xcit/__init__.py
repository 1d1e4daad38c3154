"""xcit: Cross-Covariance Image Transformers (El-Nouby et al., NeurIPS 2021) in PyTorch."""
from .data.preprocessing import DataConfig, create_transform, resolve_data_config
from .inference.dense import stream_pyramid
from .inference.streaming import streaming
from .models import MODELS, XCiT, XCiTPyramid, create_model, create_pyramid, list_models, optimize, param_groups, quantize
from .models.weights import CheckpointError, inspect_checkpoint, load_checkpoint, read_state_dict, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "MODELS", "XCiT", "XCiTPyramid", "CheckpointError", "DataConfig", "create_model", "create_pyramid",
    "create_transform", "inspect_checkpoint", "list_models", "load_checkpoint", "optimize", "param_groups", "quantize",
    "read_state_dict", "resolve_data_config", "save_checkpoint", "stream_pyramid", "streaming",
    "__version__",
]
