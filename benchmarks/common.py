"""Deterministic, cached inputs for the asv suites.

MUST NOT be changed -- only appended. asv compares results across commits, so
an input that changes silently breaks the history. Add a new function (or a
new ``kind``) instead of editing an existing one. Only numpy here: the suite
must import against old hpcfl commits too.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

# as the hpcfl command does (hpcfl.cli._environment): huge pages for torch's CPU allocator
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

try:  # preimported once by asv's forkserver (asv.conf.json), so forked benchmarks start in ms, not s
    import torch  # noqa: F401

    import hpcfl.codecs  # noqa: F401
    import hpcfl.codecs.catalog  # noqa: F401
    import hpcfl.results.writer  # noqa: F401
except ImportError:  # an old commit without one of them: its benchmarks fail on their own
    pass

__all__ = ["matrix_shape", "gradient", "model_table", "Benchmark"]


class Benchmark:
    """Base class of every suite (numpy style): one-thread torch, a roomy timeout."""

    timeout = 120

    @staticmethod
    def one_thread() -> None:
        import torch

        torch.set_num_threads(1)


def matrix_shape(n: int) -> tuple[int, int]:
    """(rows, cols) with rows the largest divisor of n that is <= sqrt(n)."""
    r = math.isqrt(n)
    while n % r:
        r -= 1
    return r, n // r


@functools.lru_cache(maxsize=16)
def gradient(n: int, kind: str = "gaussian", seed: int = 0) -> np.ndarray:
    """Read-only float32 matrix of n gradient-like values.

    gaussian: N(0, 1) * 1e-3; heavy: Student-t (df 3) * 1e-3; lowrank: rank 4 + 10% noise, std ~1e-3.
    """
    rng = np.random.default_rng([seed, n, {"gaussian": 0, "heavy": 1, "lowrank": 2}[kind]])
    shape = matrix_shape(n)
    if kind == "gaussian":
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3)
    elif kind == "heavy":
        a = (rng.standard_t(3, size=shape) * 1e-3).astype(np.float32)
    else:
        a = rng.standard_normal((shape[0], 4), dtype=np.float32) @ rng.standard_normal((4, shape[1]),
                                                                                         dtype=np.float32)
        a = (a * np.float32(0.5) + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)) * np.float32(1e-3)
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=4)
def model_table(n_tensors: int) -> list[tuple[str, tuple[int, ...]]]:
    """A model-like parameter table: alternating conv weights (c, c, 3, 3) and biases (c,)."""
    out = []
    for i in range(n_tensors // 2):
        c = 8 << (i % 4)  # 8, 16, 32, 64 channels
        out += [(f"layer{i}.weight", (c, c, 3, 3)), (f"layer{i}.bias", (c,))]
    if n_tensors % 2:
        out.append(("head.bias", (10,)))
    return out
