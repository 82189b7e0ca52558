"""MNIST and Fashion-MNIST from their IDX files, parsed with numpy alone.

IDX layout: two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension, then the big-endian data. Files may be
gzipped (detected by the gzip magic, not the name). The torchvision layout
``<path>/MNIST/raw/`` (``FashionMNIST/raw``) is searched after ``<path>``.
"""

from __future__ import annotations

import gzip
import zlib
from math import prod
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hpcfl.data.base import Dataset, data_dirs, find_file, standardize
from hpcfl.errors import DataError

__all__ = ["read_idx", "load_idx_dataset", "IDX_FILES"]

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read: {e}") from e
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (plain or gzipped), in native byte order.

    Raises :class:`DataError` naming the file on a bad magic number, a header
    that does not fit, or a length other than the header's dimensions imply.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = header + prod(dims) * dtype.itemsize
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "trailing bytes"
        raise DataError(f"{path}: {what}: {len(raw)} bytes, but dims {dims} need {want}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _load_pair(ipath: Path, lpath: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(ipath), read_idx(lpath)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"{ipath}: want uint8 images (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise DataError(f"{lpath}: want uint8 labels (N,), got {y.dtype} {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{lpath}: {y.shape[0]} labels but {ipath.name} holds {x.shape[0]} images")
    if y.size and y.max() > 9:
        raise DataError(f"{lpath}: label {int(y.max())} outside 0..9")
    return x, y


def load_idx_dataset(cfg: Mapping[str, Any], seed: int, dataset: str) -> Dataset:
    """``mnist`` or ``fashion_mnist`` from ``data.path``: 1xHxW float32 /255, standardized.

    H and W come from the files (28x28 for the real data sets); train and test
    must agree. Standardization uses the train split's scalar mean/std.
    ``seed`` is unused: the files fix both splits.
    """
    dirs = data_dirs(str(cfg["path"]), dataset, f"{_TORCHVISION_DIR[dataset]}/raw")
    paths = [find_file(dataset, dirs, name, IDX_FILES) for name in IDX_FILES]  # all, before parsing
    xtr, ytr = _load_pair(paths[0], paths[1])
    xte, yte = _load_pair(paths[2], paths[3])
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{dataset}: train images are {xtr.shape[1:]} but test images {xte.shape[1:]}")
    x_train = xtr[:, None].astype(np.float32) / np.float32(255.0)
    x_test = xte[:, None].astype(np.float32) / np.float32(255.0)
    standardize(x_train, x_test)
    return Dataset(dataset, x_train, ytr.astype(np.int64), x_test, yte.astype(np.int64),
                   input_shape=tuple(x_train.shape[1:]), n_classes=10)
