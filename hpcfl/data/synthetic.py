"""The synthetic(alpha, beta) federated data set of FedProx (Li et al., 2020), as in LEAF.

For device k::

    u_k ~ N(0, alpha)          W_k ~ N(u_k, 1)  (classes x dim)   b_k ~ N(u_k, 1)  (classes)
    B_k ~ N(0, beta)           v_k ~ N(B_k, 1)  (dim)
    x   ~ N(v_k, Sigma),  Sigma = diag(j^-1.2), j = 1..dim
    y   = argmax(W_k x + b_k)
    n_k = int(lognormal(4, synthetic_sigma)) + 50

As in the reference generator (``np.random.normal(0, alpha)``), alpha and beta
are standard deviations. Note that u_k shifts every logit of device k by the
same amount, so with this generator ``alpha`` leaves the distribution of
(x, y) unchanged; label skew across devices comes from ``beta`` (a shared
offset of x that some classes' weights favour) and from W_k itself.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hpcfl.data.base import Dataset, standardize
from hpcfl.errors import ConfigError
from hpcfl.seeding import numpy_rng

__all__ = ["load_synthetic", "generate_device"]

_MAX_DEVICE_SAMPLES = 2_000_000


def generate_device(seed: int, k: int, *, alpha: float, beta: float, dim: int, n_classes: int,
                    sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Samples (x float64 (n_k, dim), y int64 (n_k,)) of device ``k``.

    Each device draws from its own stream ``numpy_rng(seed, "data", "synthetic", k)``,
    so device k's data does not depend on how many devices there are.
    """
    rng = numpy_rng(seed, "data", "synthetic", k)
    n = int(min(rng.lognormal(4.0, sigma), 1e12)) + 50
    if n > _MAX_DEVICE_SAMPLES:  # a heavy lognormal tail must not exhaust memory
        raise ConfigError("data.synthetic_sigma", f"device {k} would get {n} samples "
                          f"(limit {_MAX_DEVICE_SAMPLES}); lower synthetic_sigma")
    u = rng.normal(0.0, alpha)
    w = rng.normal(u, 1.0, size=(n_classes, dim))
    b = rng.normal(u, 1.0, size=n_classes)
    big_b = rng.normal(0.0, beta)
    v = rng.normal(big_b, 1.0, size=dim)
    scale = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
    x = v + rng.standard_normal((n, dim)) * scale
    y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
    return x, y


def load_synthetic(cfg: Mapping[str, Any], seed: int) -> Dataset:
    """One device per client (``data.n_clients`` devices), pooled into one train and one test set.

    Each device's first ``n_k - t_k`` samples go to train and the last
    ``t_k = round(n_k * test_fraction)`` (clipped to [1, n_k - 1], so every
    device is in both splits) to the global test set; samples within a device
    are i.i.d., so taking the tail is as good as a random subset.
    ``natural_clients[k]`` holds device k's (contiguous) train indices.
    Features are standardized per feature with the pooled train statistics.
    """
    n_dev = int(cfg["n_clients"])
    dim, n_classes = int(cfg["synthetic_dim"]), int(cfg["synthetic_classes"])
    if n_classes < 2:
        raise ConfigError("data.synthetic_classes", f"need at least 2 classes, got {n_classes}")
    frac = float(cfg["test_fraction"])
    xs_tr, ys_tr, xs_te, ys_te, natural = [], [], [], [], []
    start = 0
    for k in range(n_dev):
        x, y = generate_device(seed, k, alpha=float(cfg["synthetic_alpha"]), beta=float(cfg["synthetic_beta"]),
                               dim=dim, n_classes=n_classes, sigma=float(cfg["synthetic_sigma"]))
        n = y.shape[0]
        n_test = min(max(int(round(n * frac)), 1), n - 1)
        n_train = n - n_test
        xs_tr.append(x[:n_train])
        ys_tr.append(y[:n_train])
        xs_te.append(x[n_train:])
        ys_te.append(y[n_train:])
        natural.append(np.arange(start, start + n_train, dtype=np.int64))
        start += n_train
    x_train = np.concatenate(xs_tr).astype(np.float32)
    x_test = np.concatenate(xs_te).astype(np.float32)
    standardize(x_train, x_test, keep=(1,))
    return Dataset("synthetic", x_train, np.concatenate(ys_tr), x_test, np.concatenate(ys_te),
                   input_shape=(dim,), n_classes=n_classes, natural_clients=tuple(natural))
