"""Deterministic gradient-like test tensors for the codec benchmarks.

Every tensor is float32, a pure function of ``(kind, n, seed)``, and shaped as
a matrix (:func:`matrix_shape`) so that low-rank codecs (PowerSGD, ATOMO) see
a real matrix while element-wise codecs do not care.

Kinds:

* ``gaussian`` -- N(0, 1) scaled by 1e-3 (the stand-in of landscape.md §4.2);
* ``heavy``    -- Student-t with 3 degrees of freedom, scaled by 1e-3;
* ``lowrank``  -- rank-4 matrix plus 10% Gaussian noise, scaled to std ~1e-3;
* ``real``     -- one backward pass of ``cnn2`` on the digits data set
  (131,080 gradient entries), tiled or truncated to ``n`` entries.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from hpcfl.seeding import numpy_rng

__all__ = ["KINDS", "make_tensor", "matrix_shape", "real_gradient"]

KINDS = ("gaussian", "heavy", "lowrank", "real")


def matrix_shape(n: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols == n`` and ``rows`` the largest divisor <= sqrt(n)."""
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    r = math.isqrt(n)
    while n % r:
        r -= 1
    return r, n // r


def make_tensor(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """A read-only float32 array of shape :func:`matrix_shape` ``(n)`` (cached)."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {', '.join(KINDS)}")
    return _make(kind, int(n), int(seed))


@functools.lru_cache(maxsize=8)
def _make(kind: str, n: int, seed: int) -> np.ndarray:
    shape = matrix_shape(n)
    rng = numpy_rng(seed, "bench-data", kind, n)
    if kind == "gaussian":
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(1e-3)
    elif kind == "heavy":
        a = (rng.standard_t(3, size=shape) * 1e-3).astype(np.float32)
    elif kind == "lowrank":
        r, c = shape
        u = rng.standard_normal((r, 4), dtype=np.float32)
        v = rng.standard_normal((4, c), dtype=np.float32)
        a = u @ v
        a *= np.float32(0.5)  # rank-4 part has std 2: scale to std 1 before the noise
        a += rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        a *= np.float32(1e-3)
    else:
        g = real_gradient(seed)
        a = np.resize(g, n).reshape(shape)  # tiles (or truncates) the model gradient
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=2)
def real_gradient(seed: int = 0, batch: int = 256) -> np.ndarray:
    """Flat float32 gradient of one backward pass of cnn2 ('same' padding) on digits.

    The model initialisation and the batch (the first ``batch`` training
    samples of the seeded split) depend only on ``seed``.
    """
    import torch

    from hpcfl.data import load_dataset
    from hpcfl.models import build_model

    ds = load_dataset({"dataset": "digits", "test_fraction": 0.2}, seed)
    model = build_model({"name": "cnn2", "cnn_padding": "same"}, ds.input_shape, ds.n_classes, seed)
    x = torch.from_numpy(ds.x_train[:batch])
    y = torch.from_numpy(ds.y_train[:batch])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    g = torch.cat([t.reshape(-1) for t in grads]).detach().numpy().astype(np.float32)
    g.setflags(write=False)
    return g
