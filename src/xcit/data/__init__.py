"""Images in, tensors out: loading and the official evaluation preprocessing."""
from .images import IMAGENET_MEAN, IMAGENET_STD, eval_transform, imagenet_class_names, load_image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "imagenet_class_names", "load_image"]
