"""Seeded random projections for intrinsic gradient compression (IGC), never stored densely.

Two generators of a D x d projection ``A`` that both sides rebuild from a 63-bit seed:

* :class:`SRHT` (default): subsampled randomised Walsh-Hadamard transform. Pad D to
  D' = 2^ceil(log2 D); ``S = H diag(signs) / sqrt(D')`` is orthogonal (H the
  Sylvester-Hadamard matrix, symmetric, H H = D' I). ``A^T = S[rows, :D]``: d seeded rows
  of S, cut to the first D columns (zero padding). Project ``z = (S g_pad)[rows]``; lift
  ``A z = (S^T scatter(z))[:D]``. O(D' log D') time and 2 D' floats of memory; the seed
  fixes D' signs and d rows. A's columns are orthonormal only when D = D'; in general
  ``A^T A = I_d - S[rows, D:] S[rows, D:]^T``, a contraction with mean D/D' on the
  diagonal (the same padding-and-cut Fastfood uses in the intrinsic-dimension code).
  With d = D' all rows are kept, ``A A^T = I_D`` and lift(project(g)) = g.
* :class:`ChunkedGaussian`: i.i.d. N(0, 1) entries, scaled, regenerated block by block
  (``block`` rows of D at a time, each block from its own PCG64 stream) in both
  ``A^T g`` and ``A z``. O(D d) time, O(block x d) memory. Kept to measure why SRHT is the
  default (docs/methods/igc.md), not for experiments.

Both draw from numpy PCG64, so ``A`` is bit-identical on every CPU (numpy keeps the
Generator streams stable within a release line). The Hadamard butterflies are plain
IEEE float32 adds and subtracts in a fixed order, so an SRHT transform is also
bit-reproducible across machines (no BLAS, no FMA contraction); the Gaussian one
goes through BLAS and is reproducible only on one machine. The codec needs neither
for correctness (IGC keeps no shared state), only for recon == decode diagnostics.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["fwht_", "SRHT", "ChunkedGaussian", "padded_size"]


def padded_size(n: int) -> int:
    """D' = the smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def fwht_(x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of a float32 vector of length 2^m.

    Ping-pong butterflies: each of the m stages reads one buffer and writes the other
    (two vectorised passes per stage; torch's elementwise kernels were 2-2.5x faster
    than numpy's on the strided early stages, with bit-identical results). Returns the
    buffer holding the result, which is ``x`` or ``work`` (both are clobbered).
    """
    n = x.numel()
    if n & (n - 1):
        raise ValueError(f"length {n} is not a power of two")
    src = x.reshape(-1)
    dst = torch.empty_like(src) if work is None else work.reshape(-1)
    h = 1
    while h < n:
        s = src.view(-1, 2, h)
        d = dst.view(-1, 2, h)
        torch.add(s[:, 0], s[:, 1], out=d[:, 0])
        torch.sub(s[:, 0], s[:, 1], out=d[:, 1])
        src, dst = dst, src
        h *= 2
    return src


class SRHT:
    """The projection of one subspace: ``signs`` (D'), ``rows`` (d sorted), a scale.

    ``scale`` is applied once on each side of the transform: 1/sqrt(D') makes A a block of
    the orthogonal S; 1/sqrt(d) gives E[A A^T] = I_D over the draw of the rows.
    """

    def __init__(self, seed: int, n: int, d: int, *, unbiased: bool = False):
        self.n, self.n_pad = int(n), padded_size(n)
        if not 0 <= d <= self.n_pad:
            raise ValueError(f"d = {d} outside [0, {self.n_pad}]")
        self.d = int(d)
        rng = np.random.Generator(np.random.PCG64(int(seed)))
        signs = rng.integers(0, 2, self.n_pad, dtype=np.int8) * 2 - 1
        if self.d == self.n_pad:
            rows = np.arange(self.n_pad, dtype=np.int64)
        else:
            rows = np.sort(rng.choice(self.n_pad, self.d, replace=False, shuffle=False)).astype(np.int64)
        self.signs = torch.from_numpy(signs.astype(np.float32))
        self.rows = torch.from_numpy(rows)
        self.scale = float(np.float32(1.0 / math.sqrt(self.d if unbiased else self.n_pad))) if self.d else 0.0

    @property
    def nbytes(self) -> int:
        return 4 * self.signs.numel() + 8 * self.rows.numel()

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``z = A^T g``: float32[d] from float32[D] (CPU tensors)."""
        if self.d == 0:
            return torch.zeros(0)
        buf = torch.zeros(self.n_pad)
        torch.mul(g.reshape(-1), self.signs[:self.n], out=buf[:self.n])
        buf[:self.n].mul_(self.scale)
        return fwht_(buf)[self.rows]

    def lift(self, z: torch.Tensor) -> torch.Tensor:
        """``A z``: float32[D] from float32[d] (CPU tensors)."""
        if self.d == 0:
            return torch.zeros(self.n)
        buf = torch.zeros(self.n_pad)
        buf[self.rows] = z.reshape(-1) * self.scale
        return fwht_(buf)[:self.n] * self.signs[:self.n]


class ChunkedGaussian:
    """Dense Gaussian ``A`` (entries N(0, 1) x ``scale``), regenerated ``block`` rows at a time.

    Block b covers rows [b*block, (b+1)*block) of A and comes from PCG64(seed, b), so
    both sides regenerate identical blocks in any order. ``unbiased`` scales by
    1/sqrt(d) (E[A A^T] = I_D); otherwise by 1/sqrt(D) (E[A^T A] = I_d, columns only
    approximately orthonormal).
    """

    def __init__(self, seed: int, n: int, d: int, *, unbiased: bool = False, block_elems: int = 1 << 20):
        self.n, self.d, self.seed = int(n), int(d), int(seed)
        self.n_pad = self.n  # no padding; the name matches SRHT's
        self.block = max(1, block_elems // max(1, self.d))
        denom = self.d if unbiased else self.n
        self.scale = np.float32(1.0 / math.sqrt(denom) if denom else 0.0)

    @property
    def nbytes(self) -> int:
        return 4 * min(self.n, self.block) * self.d  # the one live block

    def _blocks(self):
        for b, lo in enumerate(range(0, self.n, self.block)):
            hi = min(self.n, lo + self.block)
            rng = np.random.Generator(np.random.PCG64([self.seed, b]))
            yield lo, hi, rng.standard_normal((hi - lo, self.d), dtype=np.float32)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        gn = g.reshape(-1).numpy()
        z = np.zeros(self.d, np.float32)
        for lo, hi, a in self._blocks():
            z += gn[lo:hi] @ a
        return torch.from_numpy(z * self.scale)

    def lift(self, z: torch.Tensor) -> torch.Tensor:
        out = np.empty(self.n, np.float32)
        zs = z.reshape(-1).numpy() * self.scale
        for lo, hi, a in self._blocks():
            np.matmul(a, zs, out=out[lo:hi])
        return torch.from_numpy(out)
