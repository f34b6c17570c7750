"""Datasets of (image, mask) pairs, few-shot episodes, paired augmentation and a prefetching loader."""

from .augment import Augment
from .datasets import DataError, Dataset, FolderDataset, FSS1000Dataset, Sample, resize_valid
from .episodes import Episode, class_episodes, fold_classes, sample_episodes
from .loader import Prefetcher

__all__ = ["Augment", "DataError", "Dataset", "Episode", "FSS1000Dataset", "FolderDataset", "Prefetcher", "Sample",
           "class_episodes", "fold_classes", "resize_valid", "sample_episodes"]
