"""Split training samples among virtual clients: iid, dirichlet, shards, natural.

:func:`partition` is pure: the same arguments give the same split on every
rank, so no rank has to ship index lists around. Every sample goes to exactly
one client and every client gets at least one sample; configurations where
that is impossible raise :class:`ConfigError` naming the key to change.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from hpcfl.data.base import Dataset
from hpcfl.errors import ConfigError, DataError
from hpcfl.seeding import numpy_rng

__all__ = ["partition", "client_indices", "SCHEMES"]

SCHEMES = ("iid", "dirichlet", "shards", "natural")
DIRICHLET_TRIES = 10  # fresh draws before falling back to the deterministic fix-up


def partition(labels: np.ndarray, n_clients: int, scheme: str, *, seed: int, alpha: float = 0.5,
              classes_per_client: int = 2, natural: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """One sorted int64 index array per client (indices into ``labels``).

    * ``iid``: a seeded permutation cut into ``n_clients`` parts whose sizes
      differ by at most one.
    * ``dirichlet``: label skew. For each class, proportions over the clients
      are drawn from Dir(alpha) and the class's shuffled samples are dealt out
      by a multinomial draw with those proportions (smaller alpha, more skew).
      If a client ends up empty, the whole split is redrawn from a fresh
      derived seed, up to ``DIRICHLET_TRIES`` times; if clients are still
      empty, each empty client in turn takes one seeded-random sample from the
      currently largest client (lowest index on ties).
    * ``shards``: LBGM's "c classes per client". Classes are put in a seeded
      random order ``perm`` and client k owns ``perm[(k*c + j) mod C]`` for
      j < c, so each client has exactly c distinct classes and each class has
      floor or ceil of ``n_clients*c/C`` owners; each class's shuffled samples
      are split into near-equal parts among its owners. Needs c <= C,
      ``n_clients*c >= C`` (no class left unowned) and at least as many
      samples in each class as it has owners. C counts the labels present.
    * ``natural``: the given per-device index arrays (synthetic data only).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if isinstance(n_clients, bool) or int(n_clients) != n_clients or n_clients < 1:
        raise ConfigError("data.n_clients", f"must be a positive integer, got {n_clients!r}")
    n_clients, n = int(n_clients), labels.shape[0]
    if scheme == "natural":
        return _natural(n, n_clients, natural)
    if scheme not in SCHEMES:
        raise ConfigError("data.partition", f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if n_clients > n:
        raise ConfigError("data.n_clients", f"{n_clients} clients but only {n} training samples; "
                          "every client needs at least one")
    if scheme == "iid":
        owner = np.empty(n, dtype=np.int64)
        owner[numpy_rng(seed, "partition", "iid").permutation(n)] = np.arange(n) * n_clients // n
    elif scheme == "dirichlet":
        owner = _dirichlet(labels, n_clients, alpha, seed)
    else:
        owner = _shards(labels, n_clients, classes_per_client, seed)
    parts = _group(owner, n_clients)
    assert all(p.size for p in parts), "partition left a client empty"  # guaranteed above
    return parts


def client_indices(dataset: Dataset, cfg: Mapping[str, Any], seed: int) -> list[np.ndarray]:
    """The partition of ``dataset.y_train`` the job's ``[data]`` section asks for."""
    return partition(dataset.y_train, int(cfg["n_clients"]), str(cfg["partition"]), seed=seed,
                     alpha=float(cfg["alpha"]), classes_per_client=int(cfg["classes_per_client"]),
                     natural=dataset.natural_clients)


def _group(owner: np.ndarray, n_clients: int) -> list[np.ndarray]:
    """Sorted sample indices per client from an owner-per-sample array."""
    order = np.argsort(owner, kind="stable").astype(np.int64)  # stable: ascending within each client
    counts = np.bincount(owner, minlength=n_clients)
    return np.split(order, np.cumsum(counts)[:-1])


def _dirichlet(labels: np.ndarray, n_clients: int, alpha: float, seed: int) -> np.ndarray:
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError("data.alpha", f"Dirichlet concentration must be > 0, got {alpha!r}")
    classes, inv = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inv == c) for c in range(classes.size)]
    clients = np.arange(n_clients)
    owner = np.empty(labels.shape[0], dtype=np.int64)
    for attempt in range(DIRICHLET_TRIES):
        rng = numpy_rng(seed, "partition", "dirichlet", attempt)
        for idx in members:
            p = rng.dirichlet(np.full(n_clients, alpha))
            counts = rng.multinomial(idx.size, p / p.sum())
            owner[rng.permutation(idx)] = np.repeat(clients, counts)
        sizes = np.bincount(owner, minlength=n_clients)
        if sizes.min() > 0:
            return owner
    rng = numpy_rng(seed, "partition", "dirichlet", "fixup")
    for k in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))  # has >= 2 samples, since n >= n_clients
        owner[rng.choice(np.flatnonzero(owner == donor))] = k
        sizes[donor] -= 1
        sizes[k] += 1
    return owner


def _shards(labels: np.ndarray, n_clients: int, c: int, seed: int) -> np.ndarray:
    classes, inv = np.unique(labels, return_inverse=True)
    n_cls = classes.size
    if isinstance(c, bool) or int(c) != c or c < 1:
        raise ConfigError("data.classes_per_client", f"must be a positive integer, got {c!r}")
    if c > n_cls:
        raise ConfigError("data.classes_per_client", f"{c} classes per client, but the data has only "
                          f"{n_cls} classes")
    if n_clients * c < n_cls:
        raise ConfigError("data.classes_per_client", f"{n_clients} clients x {c} classes cover only "
                          f"{n_clients * c} of {n_cls} classes; raise it or data.n_clients")
    rng = numpy_rng(seed, "partition", "shards")
    perm = rng.permutation(n_cls)
    own = perm[(np.arange(n_clients)[:, None] * c + np.arange(c)[None, :]) % n_cls]  # (clients, c)
    owner = np.empty(labels.shape[0], dtype=np.int64)
    for cls in range(n_cls):
        owners = np.flatnonzero((own == cls).any(axis=1))
        idx = rng.permutation(np.flatnonzero(inv == cls))
        if idx.size < owners.size:
            raise ConfigError("data.n_clients", f"class {classes[cls]} has {idx.size} samples but "
                              f"{owners.size} clients own it; use fewer clients or classes per client")
        owner[idx] = owners[np.arange(idx.size) * owners.size // idx.size]
    return owner


def _natural(n: int, n_clients: int, natural: Sequence[np.ndarray] | None) -> list[np.ndarray]:
    if natural is None:
        raise ConfigError("data.partition", "'natural' needs a data set with natural clients (synthetic)")
    if len(natural) != n_clients:
        raise ConfigError("data.n_clients", f"{n_clients} clients but the data set has {len(natural)} "
                          "natural clients")
    parts = [np.sort(np.asarray(a, dtype=np.int64).ravel()) for a in natural]
    flat = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if any(p.size == 0 for p in parts) or flat.size != n or not np.array_equal(np.sort(flat), np.arange(n)):
        raise DataError(f"natural clients must be non-empty and hold each of the {n} training "
                        "samples exactly once")
    return parts
