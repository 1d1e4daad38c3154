"""Self-supervised XCiT: DINO pretraining (:func:`pretrain`) and frozen-feature evaluation
(:func:`knn_evaluate`, :func:`linear_probe`)."""
from .augment import BatchMultiCrop, MultiCropSpec, PILMultiCrop
from .config import OPTIONS, PRESETS, DinoConfig, resolve_config
from .head import DINOHead, MultiCropNet
from .knn import extract_features, knn_classify, knn_evaluate, load_feature_model
from .linear import linear_probe
from .loss import DINOLoss, koleo_loss
from .schedules import DinoSchedules, build_schedules
from .train import Dino, build_networks, pretrain, train, update_teacher

__all__ = [
    "OPTIONS",
    "PRESETS", "BatchMultiCrop", "DINOHead", "DINOLoss", "Dino", "DinoConfig", "DinoSchedules", "MultiCropNet",
    "MultiCropSpec", "PILMultiCrop", "build_networks", "build_schedules", "extract_features", "knn_classify",
    "knn_evaluate", "koleo_loss", "linear_probe", "load_feature_model", "pretrain", "resolve_config", "train", "update_teacher",
]
