"""The :class:`Dataset` container and helpers shared by the loaders.

Every loader returns float32 features already normalized with *train*
statistics only (the test split never leaks into the normalization) and int64
labels, so models and partitioners never care where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcfl.errors import ConfigError, DataError

__all__ = ["Dataset", "standardize", "stratified_split", "find_file", "data_dirs"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test data set in memory.

    ``eq=False``: instances compare and hash by identity, since element-wise
    array comparison has no single truth value.
    """

    name: str
    x_train: np.ndarray  # float32, (N, *input_shape), normalized
    y_train: np.ndarray  # int64, (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]  # (C, H, W) for images, (D,) for vectors
    n_classes: int
    natural_clients: tuple[np.ndarray, ...] | None = None  # synthetic only: train indices per device

    def __post_init__(self) -> None:
        # Catch loader bugs here, once, instead of as shape errors deep in training.
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.float32 or y.dtype != np.int64:
                raise TypeError(f"{self.name} {split}: want float32/int64, got {x.dtype}/{y.dtype}")
            if x.shape[1:] != tuple(self.input_shape) or y.shape != x.shape[:1]:
                raise ValueError(f"{self.name} {split}: x {x.shape} / y {y.shape} do not match "
                                 f"input_shape {self.input_shape}")
            if y.size and (y.min() < 0 or y.max() >= self.n_classes):
                raise ValueError(f"{self.name} {split}: labels outside [0, {self.n_classes})")

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])


def standardize(train: np.ndarray, test: np.ndarray, keep: tuple[int, ...] = ()) -> None:
    """Standardize float32 ``train`` and ``test`` in place with train statistics.

    ``keep`` lists the axes that get their own mean/std (``()``: one scalar,
    ``(1,)``: per channel of (N, C, H, W) or per feature of (N, D)).
    Statistics are computed in float64; a zero std is treated as 1 so constant
    pixels (MNIST borders) stay finite.
    """
    axes = tuple(a for a in range(train.ndim) if a not in keep)
    mean = train.mean(axis=axes, dtype=np.float64, keepdims=True)
    std = train.std(axis=axes, dtype=np.float64, keepdims=True)
    std[std < 1e-12] = 1.0
    for x in (train, test):
        x -= mean.astype(np.float32)
        x /= std.astype(np.float32)


def stratified_split(labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices with ``round(n_c * test_fraction)`` test samples per class.

    Each class keeps at least one training sample, so no class vanishes from
    training; an empty test set is a config error.
    """
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(int(round(idx.size * test_fraction)), idx.size - 1)
        test.append(idx[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    if test_idx.size == 0:
        raise ConfigError("data.test_fraction", f"{test_fraction} leaves no test samples")
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


def find_file(dataset: str, dirs: Sequence[Path], name: str, expected: Sequence[str],
              gz: bool = True) -> Path:
    """The first of ``dir/name`` (or ``dir/name.gz``) over ``dirs``.

    The error names every expected file and every directory searched, so a
    user with a wrong ``data.path`` sees at once what should be there.
    """
    for d in dirs:
        for cand in (name, name + ".gz") if gz else (name,):
            if (d / cand).is_file():
                return d / cand
    suffix = " (each optionally .gz)" if gz else ""
    where = ", ".join(str(d) for d in dirs)
    state = "" if any(d.is_dir() for d in dirs) else " (no such directory)"
    raise DataError(f"{dataset}: missing {name}; expected {', '.join(expected)}{suffix} "
                    f"in {where}{state}; set data.path")


def data_dirs(path: str, dataset: str, *subdirs: str) -> list[Path]:
    """``path`` and ``path/<sub>`` for each sub-layout; empty path is an error."""
    if not path:
        raise DataError(f"{dataset}: data.path is empty; set it to the directory holding the files")
    root = Path(path).expanduser()
    return [root, *(root / s for s in subdirs)]
