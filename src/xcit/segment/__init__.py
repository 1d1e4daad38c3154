"""Semantic segmentation on the XCiT pyramid: Semantic FPN and UperNet heads, data, metrics, training.

See docs/segmentation.md; the command line is ``xcit segment prepare | train | eval | predict``.
"""
from .data import DatasetInfo, SegmentationFolder, TrainTransform, infer
from .heads import PPM, FCNHead, FPNNeck, Segmenter, SemanticFPNHead, UperNetHead
from .metrics import ConfusionMatrix, format_metrics, metrics_from_confusion
from .model import build_segmenter, load_segmenter, save_segmenter

__all__ = [
    "PPM",
    "ConfusionMatrix",
    "DatasetInfo",
    "FCNHead",
    "FPNNeck",
    "SegmentationFolder",
    "Segmenter",
    "SemanticFPNHead",
    "TrainTransform",
    "UperNetHead",
    "build_segmenter",
    "format_metrics",
    "infer",
    "load_segmenter",
    "metrics_from_confusion",
    "save_segmenter",
]
