"""Data sets (all offline) and their split among virtual clients.

``load_dataset(cfg, seed)`` takes the job's ``[data]`` section; every random
choice (digits' test split, the synthetic generator, partitions) is derived
from the job seed through :func:`hpcfl.seeding.numpy_rng`, so every rank
rebuilds the same data and the same client split without communication.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from hpcfl.data.base import Dataset
from hpcfl.data.cifar import load_cifar10
from hpcfl.data.digits import load_digits
from hpcfl.data.idx import load_idx_dataset
from hpcfl.data.partition import client_indices, partition
from hpcfl.data.synthetic import load_synthetic
from hpcfl.errors import ConfigError

__all__ = ["Dataset", "load_dataset", "partition", "client_indices", "LOADERS", "check_files"]

LOADERS: dict[str, Callable[[Mapping[str, Any], int], Dataset]] = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "mnist": lambda cfg, seed: load_idx_dataset(cfg, seed, "mnist"),
    "fashion_mnist": lambda cfg, seed: load_idx_dataset(cfg, seed, "fashion_mnist"),
    "cifar10": load_cifar10,
}


def load_dataset(cfg: Mapping[str, Any], seed: int) -> Dataset:
    """The data set named by ``cfg["dataset"]``, normalized with train statistics.

    Missing or malformed files raise :class:`~hpcfl.errors.DataError`.
    """
    name = cfg["dataset"]
    try:
        loader = LOADERS[name]
    except (KeyError, TypeError):
        raise ConfigError("data.dataset", f"unknown data set {name!r}; known: {', '.join(LOADERS)}") from None
    return loader(cfg, seed)


def check_files(dataset: str, path: str) -> None:
    """Raise DataError unless every file of an on-disk data set is present (nothing is parsed)."""
    from hpcfl.data.base import data_dirs, find_file
    from hpcfl.data.cifar import CIFAR_FILES
    from hpcfl.data.idx import _TORCHVISION_DIR, IDX_FILES

    if dataset == "cifar10":
        dirs = data_dirs(path, dataset, "cifar-10-batches-py")
        for name in CIFAR_FILES:
            find_file(dataset, dirs, name, CIFAR_FILES, gz=False)
    elif dataset in _TORCHVISION_DIR:
        dirs = data_dirs(path, dataset, f"{_TORCHVISION_DIR[dataset]}/raw")
        for name in IDX_FILES:
            find_file(dataset, dirs, name, IDX_FILES)
