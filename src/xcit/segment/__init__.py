"""Semantic segmentation on the XCiT pyramid: Semantic FPN and UperNet heads, data, metrics, training.

See docs/segmentation.md; the command line is ``xcit segment prepare | train | eval | predict``.
"""
from .config import OPTIONS, EvalSettings, SegmentConfig, resolve_config
from .data import DatasetInfo, SegmentationFolder, TrainTransform, infer
from .heads import PPM, FCNHead, FPNNeck, Segmenter, SemanticFPNHead, UperNetHead
from .metrics import ConfusionMatrix, format_metrics, metrics_from_confusion
from .evaluate import evaluate, evaluate_checkpoint
from .model import build_segmenter, load_segmenter, save_segmenter
from .tiled import TiledSegmenter, segment_large
from .train import Segmentation, train
from .whole_slide import segment_file

__all__ = [
    "OPTIONS",
    "PPM",
    "ConfusionMatrix",
    "DatasetInfo",
    "EvalSettings",
    "FCNHead",
    "FPNNeck",
    "SegmentConfig",
    "Segmentation",
    "SegmentationFolder",
    "Segmenter",
    "SemanticFPNHead",
    "TiledSegmenter",
    "TrainTransform",
    "UperNetHead",
    "build_segmenter",
    "evaluate",
    "evaluate_checkpoint",
    "format_metrics",
    "infer",
    "load_segmenter",
    "metrics_from_confusion",
    "resolve_config",
    "save_segmenter",
    "segment_file",
    "segment_large",
    "train",
]
