"""Data: in-memory dataset readers and on-device batch augmentation.

Public API:
    load_dataset, DATASET_NAMES     read "embedded" (offline MNIST digits), CIFAR-10/100, Tiny-ImageNet, ImageFolder
    ImageDataset, AugmentSpec       uint8 images + int64 labels + mean/std + the dataset's augmentation recipe
    sample_params, apply_augment    random crop / flip / rotation of a uint8 batch in one gather, on its device
    augment_batch, AugmentParams
    augment_reference_numpy         the numpy spec of that augmentation (tests compare byte for byte)
    normalize                       uint8 → (x/255 − mean)/std in the model's dtype

Also (import them from their modules): pipeline (batch plans and their rendering), window (the tiered replay
window), producer (the prefetch thread), dali (DALI renderers; DALI itself is optional), files (streamed JPEG
folders and the random-resized-crop parameters).
"""

from spacedkd_fast.data.augment import (
    AugmentParams,
    apply_augment,
    augment_batch,
    augment_reference_numpy,
    normalize,
    sample_params,
)
from spacedkd_fast.data.datasets import DATASET_NAMES, AugmentSpec, ImageDataset, load_dataset

__all__ = [
    "DATASET_NAMES",
    "AugmentParams",
    "AugmentSpec",
    "ImageDataset",
    "apply_augment",
    "augment_batch",
    "augment_reference_numpy",
    "load_dataset",
    "normalize",
    "sample_params",
]
