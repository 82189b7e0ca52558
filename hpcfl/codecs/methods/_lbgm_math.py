"""The look-back test of LBGM (Azam et al., ICLR 2022), as pure tensor maths.

Kept apart from the codec so tests and analyses can call it directly. The
authors' ``calc_projection`` (shams-sam/FedOptim, ``src/models/model_op.py``)
computes, for the vector ``g`` about to be sent and the look-back gradient
``l``::

    rho   = <g, l> / <l, l>                      # look-back coefficient (LBC)
    cos   = CosineSimilarity(eps=1e-6)(g, l)     # <g, l> / (max(|g|, eps) max(|l|, eps))
    alpha = 1 - cos^2                            # look-back phase error (LBP), sin^2 of the angle

We compute the three dot products in float64 (float32 squares overflow for
entries above ~1e19 and lose digits on large tensors) and clamp alpha into
[0, 1] where the authors assert it. The decision is the client's alone: the
root only ever sees the outcome (a flag and rho), so no bit-exact agreement on
alpha is needed between the two sides.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["lookback", "recycle_decision"]


def lookback(g: torch.Tensor, lbg: torch.Tensor, eps: float = 1e-6) -> tuple[float, float]:
    """``(rho, alpha)`` of ``g`` against the look-back gradient ``lbg``.

    ``alpha`` is 1.0 (nothing to recycle) when ``lbg`` is zero or anything is
    non-finite; ``rho`` is then NaN.
    """
    a = g.detach().reshape(-1).double()
    b = lbg.detach().reshape(-1).double()
    ab = float(torch.dot(a, b))
    bb = float(torch.dot(b, b))
    aa = float(torch.dot(a, a))
    if not (math.isfinite(ab) and math.isfinite(aa) and math.isfinite(bb)) or bb == 0.0:
        return math.nan, 1.0
    rho = ab / bb
    cos = ab / (max(math.sqrt(aa), eps) * max(math.sqrt(bb), eps))
    alpha = min(1.0, max(0.0, 1.0 - cos * cos))
    return rho, alpha


def recycle_decision(g: torch.Tensor, lbg: torch.Tensor | None, delta: float,
                     eps: float = 1e-6) -> tuple[bool, np.float32, float]:
    """``(recycle, rho as sent, alpha)``: recycle iff a look-back gradient exists,
    ``delta > 0``, ``alpha <= delta`` and rho is a finite float32.

    ``delta = 0`` never recycles (the authors' ``alpha <= 0`` would fire only on
    exactly parallel vectors, or when rounding makes ``cos^2`` reach 1), so
    LBGM with ``delta = 0`` is its inner codec bit for bit.
    """
    if lbg is None:
        return False, np.float32(np.nan), 1.0
    rho, alpha = lookback(g, lbg, eps)
    with np.errstate(over="ignore", invalid="ignore"):
        rho32 = np.float32(rho)
    ok = delta > 0.0 and alpha <= delta and bool(np.isfinite(rho32))
    return ok, rho32, alpha
