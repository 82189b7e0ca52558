"""CIFAR-10 from the python-pickle batches, read with a restricted unpickler.

Pickle can run arbitrary code, so :class:`_Unpickler` resolves only the
globals the real batches (and numpy re-pickles of them) need: a few builtin
containers, ``_codecs.encode`` (how Python 3 writes bytes at protocol 2, a pure
string transform) and numpy's array reconstruction helpers. Anything else,
e.g. ``os.system``, is refused with a :class:`DataError`.
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hpcfl.data.base import Dataset, data_dirs, find_file, standardize
from hpcfl.errors import DataError

__all__ = ["load_cifar10", "load_batch", "CIFAR_FILES"]

CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

try:  # numpy >= 2 (and 1.26's alias); fall back to the old location
    from numpy._core.multiarray import _reconstruct
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core.multiarray import _reconstruct
    from numpy.core import numeric as _numeric


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): codecs.encode}
    for mod in ("builtins", "__builtin__"):  # Python 3 / Python 2 name
        for name in ("dict", "list", "bytes", "str", "bytearray"):
            allowed[(mod, name)] = getattr(builtins, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _reconstruct
    frombuffer = getattr(_numeric, "_frombuffer", None)  # protocol-5 pickles of arrays
    if frombuffer is not None:
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


_ALLOWED = _allowed()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def load_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) of one CIFAR-10 batch file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _Unpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a CIFAR-10 batch: {e}") from e
    except Exception as e:  # malformed pickles raise anything from EOFError to TypeError
        raise DataError(f"{path}: not a CIFAR-10 batch: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: want a dict, got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be a uint8 (N, 3072) array, got {got}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: b'labels' is not a list of ints") from e
    if y.shape != (data.shape[0],):
        raise DataError(f"{path}: {y.size} labels for {data.shape[0]} images")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return data, y


def load_cifar10(cfg: Mapping[str, Any], seed: int) -> Dataset:
    """3x32x32 float32 /255, standardized per channel with train statistics.

    Looks in ``data.path`` then ``data.path/cifar-10-batches-py``. ``seed`` is
    unused: the files fix both splits.
    """
    dirs = data_dirs(str(cfg["path"]), "cifar10", "cifar-10-batches-py")
    paths = [find_file("cifar10", dirs, name, CIFAR_FILES, gz=False) for name in CIFAR_FILES]  # all, first
    batches = [load_batch(p) for p in paths]

    def images(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32).astype(np.float32)
        x /= np.float32(255.0)
        return x, np.concatenate([y for _, y in parts])

    x_train, y_train = images(batches[:5])
    x_test, y_test = images(batches[5:])
    standardize(x_train, x_test, keep=(1,))
    return Dataset("cifar10", x_train, y_train, x_test, y_test, input_shape=(3, 32, 32), n_classes=10)
