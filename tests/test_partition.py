"""Client partitions: coverage, determinism, non-empty clients, and each scheme's shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcfl.config.schema import SCHEMA
from hpcfl.data import Dataset, client_indices, load_dataset, partition
from hpcfl.errors import ConfigError, DataError

SCHEMES = ("iid", "dirichlet", "shards")


def labels_imbalanced(n=1200, n_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    p = np.linspace(1, 3, n_classes)
    return rng.choice(n_classes, size=n, p=p / p.sum()).astype(np.int64)


def check_valid(parts, n, n_clients):
    assert len(parts) == n_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and p.size >= 1
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates within a client
    flat = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))  # disjoint and complete


def entropy(labels, n_classes):
    p = np.bincount(labels, minlength=n_classes) / labels.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_valid_and_deterministic(scheme):
    y = labels_imbalanced()
    a = partition(y, 17, scheme, seed=5, alpha=0.3, classes_per_client=3)
    check_valid(a, y.size, 17)
    b = partition(y, 17, scheme, seed=5, alpha=0.3, classes_per_client=3)
    c = partition(y, 17, scheme, seed=6, alpha=0.3, classes_per_client=3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(1, 20), n_classes=st.integers(1, 6),
       scheme=st.sampled_from(SCHEMES), alpha=st.floats(1e-3, 10), c=st.integers(1, 6), seed=st.integers(0, 99))
def test_property_valid_or_named_error(n, k, n_classes, scheme, alpha, c, seed):
    y = np.random.default_rng(seed).integers(0, n_classes, n)
    try:
        parts = partition(y, k, scheme, seed=seed, alpha=alpha, classes_per_client=c)
    except ConfigError as e:
        assert e.key in ("data.n_clients", "data.classes_per_client")
        assert k > n or scheme == "shards"
        return
    check_valid(parts, n, k)
    if scheme == "shards":
        assert all(np.unique(y[p]).size == c for p in parts)


def test_iid_balanced():
    y = labels_imbalanced(n=10_000)
    parts = partition(y, 7, "iid", seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    glob = np.bincount(y, minlength=10) / y.size
    for p in parts:  # each client's label mix is close to the global one
        assert np.abs(np.bincount(y[p], minlength=10) / p.size - glob).max() < 0.04


def test_dirichlet_skew_decreases_with_alpha():
    y = labels_imbalanced(n=5000)

    def mean_entropy(alpha):
        parts = [p for s in range(3) for p in partition(y, 20, "dirichlet", seed=s, alpha=alpha)]
        return np.mean([entropy(y[p], 10) for p in parts])

    lo, mid, hi = mean_entropy(0.05), mean_entropy(0.5), mean_entropy(100.0)
    assert lo < mid - 0.3 and mid < hi - 0.3
    assert hi > 0.95 * entropy(y, 10)  # large alpha approaches iid


def test_dirichlet_fixup_fills_empty_clients():
    # alpha this small sends each class to ~1 client, so the redraws fail and the fix-up must act
    y = np.repeat(np.arange(4), 30)
    parts = partition(y, 40, "dirichlet", seed=1, alpha=1e-4)
    check_valid(parts, y.size, 40)
    assert sum(p.size == 1 for p in parts) >= 30  # the fix-up moved single samples
    again = partition(y, 40, "dirichlet", seed=1, alpha=1e-4)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_dirichlet_bad_alpha():
    with pytest.raises(ConfigError, match="data.alpha"):
        partition(labels_imbalanced(), 5, "dirichlet", seed=0, alpha=0.0)


@pytest.mark.parametrize("c", [1, 3, 10])
def test_shards_exact_classes_and_uniform_split(c):
    y = labels_imbalanced(n=3000)
    k = 13
    parts = partition(y, k, "shards", seed=2, classes_per_client=c)
    check_valid(parts, y.size, k)
    owned = [np.unique(y[p]) for p in parts]
    assert all(o.size == c for o in owned)
    owners = np.bincount(np.concatenate(owned), minlength=10)
    assert owners.max() - owners.min() <= 1  # classes spread evenly over clients
    for cls in range(10):  # a class's samples are split near-equally among its owners
        shares = [np.sum(y[p] == cls) for p, o in zip(parts, owned) if cls in o]
        assert len(shares) == owners[cls] and max(shares) - min(shares) <= 1


def test_shards_impossible_configs():
    y = labels_imbalanced()
    with pytest.raises(ConfigError, match="data.classes_per_client: 11 classes per client, but the data has only 10"):
        partition(y, 20, "shards", seed=0, classes_per_client=11)
    with pytest.raises(ConfigError, match="data.classes_per_client: 4 clients x 2 classes cover only 8 of 10"):
        partition(y, 4, "shards", seed=0, classes_per_client=2)
    y_small = np.r_[np.zeros(50, np.int64), np.ones(2, np.int64)]  # class 1 has 2 samples, 5 owners
    with pytest.raises(ConfigError, match="data.n_clients: class 1 has 2 samples but 5 clients own it"):
        partition(y_small, 5, "shards", seed=0, classes_per_client=2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_more_clients_than_samples(scheme):
    with pytest.raises(ConfigError, match="data.n_clients: 11 clients but only 10 training samples"):
        partition(np.arange(10) % 2, 11, scheme, seed=0)


def test_bad_scheme_and_client_count():
    y = labels_imbalanced()
    with pytest.raises(ConfigError, match="data.partition: unknown scheme 'random'"):
        partition(y, 3, "random", seed=0)
    with pytest.raises(ConfigError, match="data.n_clients: must be a positive integer"):
        partition(y, 0, "iid", seed=0)


def test_natural():
    nat = (np.array([3, 0]), np.array([1]), np.array([2, 4, 5]))
    parts = partition(np.zeros(6, np.int64), 3, "natural", seed=0, natural=nat)
    check_valid(parts, 6, 3)
    np.testing.assert_array_equal(parts[0], [0, 3])
    with pytest.raises(ConfigError, match="data.n_clients: 4 clients but the data set has 3 natural"):
        partition(np.zeros(6, np.int64), 4, "natural", seed=0, natural=nat)
    with pytest.raises(ConfigError, match="data.partition: 'natural' needs"):
        partition(np.zeros(6, np.int64), 3, "natural", seed=0)
    with pytest.raises(DataError, match="exactly once"):
        partition(np.zeros(6, np.int64), 3, "natural", seed=0, natural=(nat[0], nat[0], nat[2]))


def _cfg(**kw):
    cfg = {k: f.default for k, f in SCHEMA["data"].items()}
    cfg.update(kw)
    return cfg


def test_client_indices_uses_cfg():
    cfg = _cfg(dataset="synthetic", n_clients=6, partition="natural")
    ds = load_dataset(cfg, seed=0)
    parts = client_indices(ds, cfg, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(parts, ds.natural_clients))
    cfg = _cfg(n_clients=6, partition="shards", classes_per_client=2)
    x = np.zeros((300, 2), np.float32)
    toy = Dataset("toy", x, labels_imbalanced(300), x[:1], np.zeros(1, np.int64), (2,), 10)
    parts = client_indices(toy, cfg, seed=4)
    expect = partition(toy.y_train, 6, "shards", seed=4, classes_per_client=2)
    assert all(np.array_equal(p, q) for p, q in zip(parts, expect))
    with pytest.raises(ConfigError, match="data.partition"):
        client_indices(toy, _cfg(partition="natural"), seed=0)
