"""Datasets of (image, mask) pairs, episodes, augmentation and loading."""

from .datasets import *  # noqa: F401,F403
from .datasets import _Dataset  # noqa: F401
