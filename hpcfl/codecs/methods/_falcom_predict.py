"""FalCom's predictor: kernel sign consistency, normalized-EMA magnitudes, two-level bitmap.

Everything the root recomputes is elementwise IEEE float32 arithmetic, integer
counting, or a numpy float64 reduction, so client and root get the same bits
from the same inputs (no torch reductions, whose order depends on the CPU's
vector width). The names follow methods.md §3.4 (authors' ``FalCom.py``).
"""

from __future__ import annotations

import numpy as np

from hpcfl.codecs.base import PartError

__all__ = ["kernel_signs", "abs_stats", "predict", "pack_levels", "unpack_levels"]

SIGMA_FLOOR = 1e-8  # the authors skip the normalisation by sigma_prev (sigma_c) below this


def kernel_signs(g: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per kernel (row of ``g``, shape K x m): (predictable, dominant sign is +).

    With p/q/z the positive/negative/zero counts, the majority is ``p + z`` if
    ``p >= q`` else ``q + z``; kappa = 2 * majority / m - 1, predictable iff
    kappa >= tau (integer arithmetic: 2 * majority - m >= tau * m).
    """
    m = g.shape[1]
    p = np.count_nonzero(g > 0, axis=1)
    q = np.count_nonzero(g < 0, axis=1)
    positive = p >= q
    majority = np.where(positive, p, q) + (m - p - q)
    kappa = (2.0 * majority - m) / m
    return kappa >= tau, positive


def abs_stats(a: np.ndarray) -> tuple[np.float32, np.float32]:
    """mean and std of |a| (float64 accumulation, rounded to float32)."""
    m = np.abs(a)
    if m.size == 0:
        return np.float32(0), np.float32(0)
    return np.float32(m.mean(dtype=np.float64)), np.float32(m.std(dtype=np.float64))


def predict(prev: np.ndarray, mem: np.ndarray, predictable: np.ndarray, positive: np.ndarray, m: int,
            mu_c: np.float32, sd_c: np.float32, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, new EMA memory), both flat float32.

    N_prev = (|prev| - mu_p) / sd_p (no division when sd_p <= 1e-8); on the
    predictable kernels Mem <- (1 - beta) Mem + beta N_prev and the prediction
    is s * |Mem * sd_c + mu_c| (no product when sd_c <= 1e-8) with s the kernel's
    dominant sign; 0 elsewhere.
    """
    mu_p, sd_p = abs_stats(prev)
    with np.errstate(over="ignore", invalid="ignore"):  # inf predictions make the caller fall back
        norm = np.abs(prev) - mu_p
        if sd_p > SIGMA_FLOOR:
            norm /= sd_p
        mask = np.repeat(predictable, m)
        new_mem = np.where(mask, np.float32(1.0 - beta) * mem + np.float32(beta) * norm, mem)
        mag = np.abs((new_mem * sd_c if sd_c > SIGMA_FLOOR else new_mem) + mu_c)
        sign = np.where(np.repeat(positive, m), np.float32(1), np.float32(-1))
        pred = np.where(mask, sign * mag, np.float32(0))
    return pred.astype(np.float32, copy=False), new_mem.astype(np.float32, copy=False)


def pack_levels(predictable: np.ndarray, positive: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Level 1: one bit per kernel (predictable); level 2: one bit per predictable kernel,
    its dominant sign (1 = +), or with ``reference`` whether it differs from it (temporal
    prediction). Each level is packed MSB first and padded with zeros to a byte."""
    lv2 = positive[predictable]
    if reference is not None:
        lv2 = lv2 != reference[predictable]
    return np.concatenate([np.packbits(predictable), np.packbits(lv2)])


def unpack_levels(b: np.ndarray, k: int, reference: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_levels` (``k`` kernels); rejects wrong lengths and non-zero padding."""
    n1 = (k + 7) // 8
    if b.size < n1:
        raise PartError("bits", f"{b.size} bytes, the level-1 bitmap alone needs {n1}")
    predictable = np.unpackbits(b[:n1], count=k).astype(bool)
    p = int(np.count_nonzero(predictable))
    if b.size != n1 + (p + 7) // 8:
        raise PartError("bits", f"{b.size} bytes but {k} kernels with {p} predictable need {n1 + (p + 7) // 8}")
    lv2 = np.unpackbits(b[n1:], count=p).astype(bool)
    if _pad_bits(b[:n1], k) or _pad_bits(b[n1:], p):
        raise PartError("bits", "non-zero padding bits")
    positive = np.zeros(k, dtype=bool)
    positive[predictable] = lv2 if reference is None else lv2 != reference[predictable]
    return predictable, positive


def _pad_bits(b: np.ndarray, count: int) -> bool:
    r = count % 8
    return bool(r) and bool(b[-1] & ((1 << (8 - r)) - 1))
