"""Images in, tensors out: loading, the official evaluation preprocessing, datasets and loaders."""
from .calibration import calibration_images
from .datasets import (
    FASHION_MNIST_CLASSES,
    DataError,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    collate_skipping,
    fashion_mnist_dir,
    read_idx,
)
from .images import IMAGENET_MEAN, IMAGENET_STD, eval_transform, imagenet_class_names, load_image
from .loader import EpochSampler, SeededItems, ShardSampler, TensorBatchLoader, build_loader, seeded_rng
from .preprocessing import DataConfig, ToChannels, create_transform, resolve_data_config
from .transforms import BatchEvalTransform, BatchTrainTransform, folder_eval_transform, folder_train_transform

__all__ = [
    "FASHION_MNIST_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "BatchEvalTransform", "BatchTrainTransform", "DataConfig",
    "DataError", "EpochSampler", "ImageFolderDataset", "SeededItems", "ShardSampler", "TensorBatchLoader",
    "TensorImageDataset", "ToChannels", "build_dataset", "build_loader", "calibration_images", "collate_skipping",
    "create_transform", "eval_transform", "fashion_mnist_dir", "folder_eval_transform", "folder_train_transform",
    "imagenet_class_names", "load_image", "read_idx", "resolve_data_config", "seeded_rng",
]
