"""sklearn's 8x8 digits: the small offline image data set (1797 samples, 10 classes)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hpcfl.data.base import Dataset, standardize, stratified_split
from hpcfl.seeding import numpy_rng

__all__ = ["load_digits"]


def load_digits(cfg: Mapping[str, Any], seed: int) -> Dataset:
    """1x8x8 images scaled to [0, 1], then standardized with the train split's scalar mean/std.

    The train/test split is stratified by class (``data.test_fraction``) and
    seeded from the job seed, since digits ships without a test split.
    """
    from sklearn.datasets import load_digits as sk_load_digits  # deferred: sklearn imports scipy

    bunch = sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = stratified_split(y, float(cfg["test_fraction"]), numpy_rng(seed, "data", "digits", "split"))
    x_train, x_test = x[train], x[test]
    standardize(x_train, x_test)
    return Dataset("digits", x_train, y[train], x_test, y[test], input_shape=(1, 8, 8), n_classes=10)
