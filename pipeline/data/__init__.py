"""Datasets and preprocessing shared by all experiments."""

from pipeline.data.preprocessing import dequantize, epoch_batches, iterate_batches, pad_images
from pipeline.data.registry import DATASETS, DataFileError, DatasetNotFoundError, ImageDataset, ImageSplit, load_dataset

__all__ = [
    "DATASETS",
    "DataFileError",
    "DatasetNotFoundError",
    "ImageDataset",
    "ImageSplit",
    "dequantize",
    "epoch_batches",
    "iterate_batches",
    "load_dataset",
    "pad_images",
]
