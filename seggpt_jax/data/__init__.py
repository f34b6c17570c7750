"""Datasets of (image, mask) pairs, few-shot episodes, the standard benchmarks, paired augmentation and a
prefetching loader."""

from .augment import Augment
from .benchmarks import (BAD_SAMPLE_POLICIES, CocoBenchmark, FSS1000Benchmark, PascalBenchmark, Screened,
                         describe_episode, screen_episodes)
from .datasets import DataError, Dataset, FolderDataset, FSS1000Dataset, Problem, Sample, resize_valid
from .episodes import (Episode, class_episodes, fold_classes, hsnet_coco_stream, hsnet_fss_stream,
                       hsnet_pascal_stream, random_subset, sample_episodes)
from .loader import Prefetcher
from .splits import HsnetSplits, fss1000_classes

__all__ = ["Augment", "BAD_SAMPLE_POLICIES", "CocoBenchmark", "DataError", "Dataset", "Episode", "FSS1000Benchmark",
           "FSS1000Dataset", "FolderDataset", "HsnetSplits", "PascalBenchmark", "Prefetcher", "Problem", "Sample",
           "Screened", "class_episodes", "describe_episode", "fold_classes", "fss1000_classes", "hsnet_coco_stream",
           "hsnet_fss_stream", "hsnet_pascal_stream", "random_subset", "resize_valid", "sample_episodes",
           "screen_episodes"]
