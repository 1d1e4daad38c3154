"""Inference: loading a classifier with its class names and preprocessing, batched prediction."""
from ..data.images import collect_images
from ..models.weights import read_metadata
from .loading import InferenceModel, class_names, load_for_inference
from .predict import Prediction, PredictionWriter, Predictor, format_table

__all__ = [
    "InferenceModel", "Prediction", "PredictionWriter", "Predictor", "class_names", "collect_images",
    "format_table", "load_for_inference", "read_metadata",
]
