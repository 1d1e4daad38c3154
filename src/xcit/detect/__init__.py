"""Detection and instance segmentation on the XCiT pyramid: torchvision's Mask R-CNN / Faster R-CNN with an FPN.

See docs/detection.md; the command line is ``xcit detect prepare | train | eval | predict``.
"""
from .coco import CocoDetection, CocoFormatError, ValidationReport, clean_coco
from .config import OPTIONS, DetectConfig, resolve_config
from .evaluation import coco_eval, evaluate_results, format_metrics
from .model import XCiTFPN, build_detector, detector_from_config, load_detector, set_test_size
from .train import Detection, train

__all__ = [
    "OPTIONS",
    "CocoDetection",
    "CocoFormatError",
    "DetectConfig",
    "Detection",
    "ValidationReport",
    "XCiTFPN",
    "build_detector",
    "clean_coco",
    "coco_eval",
    "detector_from_config",
    "evaluate_results",
    "format_metrics",
    "load_detector",
    "resolve_config",
    "set_test_size",
    "train",
]
