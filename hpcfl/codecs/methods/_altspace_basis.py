"""Orthogonal per-layer bases for the alternative-space codec (``altspace``): build, map, invert, sum.

A layer update, viewed as an ``m x n`` matrix X (out x in; conv: out x in*kh*kw), is mapped to
``Y = Q_u^T X Q_v`` with orthogonal ``Q_u`` (m x m) and ``Q_v`` (n x n); ``X = Q_u Y Q_v^T`` is the
exact inverse, so the map is lossless and keeps ``||Y||_F = ||X||_F`` (Kim et al., ICML 2024 [ABS]).

How a side is stored (our reconstruction, methods.md §1.7): the basis takes ``r`` data vectors
``U_r`` (dim x r: singular vectors of a shared reference, or eigenvectors of a client's second
moments) and is *completed* to a full orthogonal ``Q`` by LAPACK's Householder QR of ``U_r``:
``Q = H_1 ... H_r`` with ``Q[:, :r] = U_r R^-1`` (``R = diag(+-1)`` for orthonormal ``U_r``) and
the other ``dim - r`` columns an orthonormal complement. ``Q`` is never materialised: applying it
(``torch.ormqr``) costs O(r m n) with O(dim r) memory, so a large layer takes a truncated basis
(``rank``) and the map still is exactly orthogonal -- to float64 rounding, whatever ``U_r`` holds
(even a float32-rounded or corrupted ``U_r``: reflectors are orthogonal by construction).

The data vectors of a shared reference (:func:`svd_vectors`) come from the full thin SVD when ``r``
is close to ``min(m, n)``, and from a randomized subspace iteration (Halko, Martinsson, Tropp 2011,
Alg. 4.4) when ``r`` is small: O(m n (r + p)) per pass instead of O(m n min(m, n)), so ``rank``
(or the codec's ``max_full_rank`` cap) bounds the cost of building a basis as well as of the map.

Determinism: client and root build a basis with the same torch ops on the same input, which gives
bit-identical reflectors on one machine with the thread count fixed (hpcfl runs single-threaded).
The randomized solver keeps this: its start block is drawn from a ``torch.Generator`` seeded by
:func:`hpcfl.seeding.derive_seed` of the job seed and the layer shape, which both sides know.
Across CPUs LAPACK may round differently; :attr:`LayerBasis.crc` (CRC32 of the reflectors) lets
the root detect it (codec option ``verify``).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["SideBasis", "LayerBasis", "side_from_vectors", "basis_from_vectors", "svd_vectors",
           "truncated_svd_vectors", "uses_truncated_svd", "moment_vectors", "aggregate_mapped", "eff_rank"]

OVERSAMPLE = 10     # randomized SVD: extra columns in the sampled block (p)
POWER_ITERS = 4     # randomized SVD: subspace (power) iterations (q), each re-orthonormalised by QR
TRUNCATE_BELOW = 4  # randomized SVD when TRUNCATE_BELOW * (r + p) <= min(m, n), else the full thin SVD


def eff_rank(rank: int, m: int, n: int, max_full_rank: int = 0) -> int:
    """Data vectors per side.

    ``rank > 0``: ``min(rank, m, n)``. ``rank = 0``: ``min(m, n)`` -- but at most ``max_full_rank``
    when that is > 0, so a large layer gets a truncated basis plus its orthogonal complement.
    """
    if rank > 0:
        return min(rank, m, n)
    full = min(m, n)
    return full if max_full_rank <= 0 else min(full, max_full_rank)


@dataclass(frozen=True)
class SideBasis:
    """An orthogonal ``dim x dim`` matrix as ``r`` Householder reflectors (``torch.geqrf`` output)."""

    a: torch.Tensor    # (dim, r) float64
    tau: torch.Tensor  # (r,) float64

    @property
    def dim(self) -> int:
        return int(self.a.shape[0])

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def matrix(self) -> torch.Tensor:
        """The full orthogonal Q (dim x dim, float64); for tests and diagnostics only."""
        return self.apply(torch.eye(self.dim, dtype=torch.float64), left=True, transpose=False)

    def apply(self, x: torch.Tensor, *, left: bool, transpose: bool) -> torch.Tensor:
        """``Q x`` / ``Q^T x`` (left) or ``x Q`` / ``x Q^T`` (right), float64."""
        if self.rank == 0:
            return x
        return torch.ormqr(self.a, self.tau, x, left=left, transpose=transpose)


def side_from_vectors(vecs: torch.Tensor) -> SideBasis:
    """Complete the columns of ``vecs`` (dim x r) to a full orthogonal basis by Householder QR."""
    a, tau = torch.geqrf(vecs.to(torch.float64).contiguous())
    return SideBasis(a.contiguous(), tau.contiguous())


@dataclass(frozen=True)
class LayerBasis:
    """The two sides of one layer's map, with a CRC of their bits and the seconds building took."""

    u: SideBasis  # output side (rows, m)
    v: SideBasis  # input side (columns, n)
    crc: int
    seconds: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.dim, self.v.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_u^T X Q_v`` for an ``m x n`` float64 matrix."""
        return self.v.apply(self.u.apply(x, left=True, transpose=True), left=False, transpose=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``Q_u Y Q_v^T`` for an ``m x n`` float64 matrix."""
        return self.v.apply(self.u.apply(y, left=True, transpose=False), left=False, transpose=True)


def _crc(*ts: torch.Tensor) -> int:
    c = 0
    for t in ts:
        c = zlib.crc32(t.detach().contiguous().numpy().tobytes(), c)
    return c


def basis_from_vectors(u_r: torch.Tensor, v_r: torch.Tensor, t0: float | None = None) -> LayerBasis:
    """A layer basis from ``r_u`` output-side and ``r_v`` input-side data vectors (columns)."""
    t0 = time.perf_counter() if t0 is None else t0
    u, v = side_from_vectors(u_r), side_from_vectors(v_r)
    return LayerBasis(u, v, _crc(u.a, u.tau, v.a, v.tau), time.perf_counter() - t0)


def uses_truncated_svd(m: int, n: int, r: int) -> bool:
    """Whether :func:`svd_vectors` takes the randomized solver for ``r`` vectors of an ``m x n`` matrix."""
    return TRUNCATE_BELOW * (r + OVERSAMPLE) <= min(m, n)


def truncated_svd_vectors(s: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate leading ``r`` left/right singular vectors of the float64 matrix ``s`` (m x n):
    randomized subspace iteration (Halko et al. 2011, Alg. 4.4) from a Gaussian start block drawn
    from a generator seeded with ``seed``; deterministic for equal ``s``, ``seed`` and thread count.

    Columns are orthonormal (to float64 rounding) and ordered by the approximate singular values.
    With a gap after the r-th singular value the subspace converges like (s_{l+1}/s_r)^(2q+1),
    l = r + p; without one the vectors still span directions of near-top energy.
    """
    m, n = s.shape
    l = min(r + OVERSAMPLE, m, n)
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    omega = torch.randn(n, l, generator=g, dtype=torch.float64)
    st = s.T.contiguous()  # the passes are memory-bound: both operands row-major
    q = torch.linalg.qr(s @ omega).Q
    for _ in range(POWER_ITERS):
        q = torch.linalg.qr(s @ torch.linalg.qr(st @ q).Q).Q
    ub, _, vh = torch.linalg.svd(q.T @ s, full_matrices=False)  # l x n: cheap
    return q @ ub[:, :r], vh[:r].T.contiguous()


def svd_vectors(src: torch.Tensor, m: int, n: int, r: int, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Leading ``r`` left/right singular vectors of the ``m x n`` reference (float64).

    The full thin SVD when ``r`` is close to ``min(m, n)``; the seeded randomized solver
    (:func:`truncated_svd_vectors`) when :func:`uses_truncated_svd`. None if the reference is zero
    or not finite (the codec then falls back to plain top-k).
    """
    s = src.detach().reshape(m, n).to(torch.float64)
    if not bool(torch.isfinite(s).all()) or not bool(s.any()):
        return None
    if uses_truncated_svd(m, n, r):
        return truncated_svd_vectors(s, r, seed)
    u, _, vh = torch.linalg.svd(s, full_matrices=False)
    return u[:, :r], vh[:r].T


def _leading(side: Mapping[str, torch.Tensor], key: str, dim: int, r: int) -> torch.Tensor | None:
    """Leading ``r`` eigenvectors (descending) of a second moment ``{key}_cov`` (dim x dim), or the
    top right singular vectors of a Frequent-Directions sketch ``{key}_sketch`` (l x dim)."""
    cov = side.get(f"{key}_cov")
    if cov is not None:
        c = torch.as_tensor(cov).to(torch.float64)
        if tuple(c.shape) != (dim, dim) or not bool(torch.isfinite(c).all()) or not bool(c.any()):
            return None
        _, vecs = torch.linalg.eigh(c)
        return vecs[:, -r:].flip(1)
    sk = side.get(f"{key}_sketch")
    if sk is None:
        return None
    s = torch.as_tensor(sk).to(torch.float64)
    if s.ndim != 2 or s.shape[1] != dim or not bool(torch.isfinite(s).all()) or not bool(s.any()):
        return None
    _, _, vh = torch.linalg.svd(s, full_matrices=False)
    return vh[:min(r, vh.shape[0])].T


def moment_vectors(side: Mapping[str, torch.Tensor], m: int, n: int, r: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Protocol B: principal output-gradient directions (U) and input-activation directions (V)."""
    u = _leading(side, "grad", m, r)
    v = _leading(side, "act", n, r)
    if u is None or v is None:
        return None
    return u, v


def aggregate_mapped(items: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float],
                     basis: LayerBasis | None, shape: tuple[int, ...]) -> torch.Tensor:
    """``sum_k w_k Q_u S_k Q_v^T`` as ``Q_u (sum_k w_k S_k) Q_v^T``: one inversion per layer.

    ``items``: per client, the kept mapped-space entries (flat indices into the ``m x n`` matrix,
    float32 values), all under the same ``basis`` (None: the original space). Equal to the sum of
    per-client decodes up to float rounding (the sum runs in float64).
    """
    if basis is None:
        m, n = shape[0] if shape else 1, int(np.prod(shape[1:])) if len(shape) > 1 else 1
    else:
        m, n = basis.shape
    acc = np.zeros(m * n, np.float64)
    for (idx, vals), w in zip(items, weights):
        acc[idx] += float(w) * vals.astype(np.float64)  # indices are distinct within one message
    y = torch.from_numpy(acc).reshape(m, n)
    out = y if basis is None else basis.inverse(y)
    return out.to(torch.float32).reshape(shape)
