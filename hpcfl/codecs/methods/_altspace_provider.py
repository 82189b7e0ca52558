"""Where the altspace codec's bases come from, per message, on client and root alike.

A mixin of :class:`hpcfl.codecs.methods.altspace.AltSpace` (kept apart for size): the shared
reference (Protocol A/A2, per-client stored reference when ``refresh > 1``), the client's own
moments (Protocol B, bases on the wire), a per-instance cache so the root builds a round's shared
basis once rather than once per client, and the byte budget. See the codec's module doc.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from hpcfl.codecs.base import Ctx, Encoded, PartError, need_part, to_numpy
from hpcfl.codecs.methods._altspace_basis import LayerBasis, basis_from_vectors, eff_rank, moment_vectors, svd_vectors
from hpcfl.codecs.sparsify import count_for
from hpcfl.seeding import derive_seed

__all__ = ["BasisProvider", "FLAG_MAPPED", "FLAG_BASES", "FLAG_DENSE", "CHECK_SHIFT", "CHECK_MASK", "wire_cost"]

FLAG_MAPPED, FLAG_BASES, FLAG_DENSE = 1, 2, 4
CHECK_SHIFT, CHECK_MASK = 3, 0x1FFF  # verify = "flags": 13 bits of the bases' CRC32 in tensor flags bits 3-15

_CACHE = 32  # layer bases kept per codec instance (the root decodes many clients per round)


def _index_bytes(k: int, n: int, mode: str) -> int:
    bm = (n + 7) // 8
    if mode == "bitmap" or (mode == "auto" and bm < 4 * k):
        return bm
    return 4 * k


def wire_cost(nbytes: int) -> int:
    """What one part adds to a message: its 11-byte record in the header and its 8-padded payload
    (docs/wire.md; the header's own padding to 8 bytes is per message, not per part)."""
    return 11 + (nbytes + 7) // 8 * 8


def _key(*arrays: np.ndarray | torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = a.detach().cpu().contiguous().numpy() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a)
        h.update(str(a.shape).encode() + a.dtype.str.encode())
        h.update(a)
    return h.digest()


class BasisProvider:
    """Bases, byte budget and basis state of the altspace codec (needs its params as attributes)."""

    basis: str
    rank: int
    max_full_rank: int
    refresh: int
    budget: str
    index: str
    ratio: float
    k: int
    verify: str
    _cache: OrderedDict

    @staticmethod
    def _matrix(shape: tuple[int, ...]) -> tuple[int, int] | None:
        if len(shape) < 2 or math.prod(shape) == 0:
            return None
        return int(shape[0]), int(math.prod(shape[1:]))

    def _cached(self, key: bytes, build: Callable[[], LayerBasis | None]) -> tuple[LayerBasis | None, float]:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], 0.0
        t0 = time.perf_counter()
        b = build()
        if b is not None:
            self._cache[key] = b
            while len(self._cache) > _CACHE:
                self._cache.popitem(last=False)
        return b, time.perf_counter() - t0

    def _reference(self, ctx: Ctx) -> torch.Tensor | None:
        """This round's shared reference; with refresh > 1 the one stored per client (both sides)."""
        src = ctx.glob.get("delta" if self.basis == "shared" else "theta")
        if self.refresh == 1:
            return src
        sh = ctx.shared
        if src is not None and ("ref" not in sh or ctx.round - int(sh["ref_round"]) >= self.refresh):
            sh["ref"] = src.detach().float().reshape(ctx.shape).clone()
            sh["ref_round"] = int(ctx.round)
        return sh.get("ref")

    def _shared_basis(self, ctx: Ctx, m: int, n: int) -> tuple[LayerBasis | None, float]:
        src = self._reference(ctx)
        if src is None:
            return None, 0.0
        r = self._rank(m, n)
        # the randomized SVD's start block: the same on every rank and for every client of the layer
        seed = derive_seed(ctx.job_seed, "altspace-svd", m, n, r)

        def build() -> LayerBasis | None:
            vecs = svd_vectors(src, m, n, r, seed)
            return None if vecs is None else basis_from_vectors(*vecs)
        return self._cached(_key(src.float()) + bytes(f"svd{m}x{n}r{r}s{seed}", "ascii"), build)

    def _rank(self, m: int, n: int) -> int:
        """Data vectors per side for an m x n layer (``rank``, or the ``max_full_rank`` cap)."""
        return eff_rank(self.rank, m, n, self.max_full_rank)

    def _factor_basis(self, u: np.ndarray, v: np.ndarray, m: int, n: int) -> tuple[LayerBasis, float]:
        ut = torch.from_numpy(np.array(u, np.float32).reshape(m, -1))
        vt = torch.from_numpy(np.array(v, np.float32).reshape(n, -1))
        b, s = self._cached(_key(ut, vt) + b"factors", lambda: basis_from_vectors(ut, vt))
        assert b is not None
        return b, s

    def _client_basis(self, ctx: Ctx, m: int, n: int) -> tuple[LayerBasis | None, float, tuple | None]:
        """Encoder side of Protocol B: (basis, seconds, float32 factors to send or None)."""
        sh = ctx.shared
        fresh = "u" not in sh or ctx.round - int(sh["round"]) >= self.refresh
        t0 = time.perf_counter()
        vecs = moment_vectors(ctx.side, m, n, self._rank(m, n)) if fresh else None
        if vecs is not None:
            u, v = (to_numpy(t.float()).reshape(-1) for t in vecs)
            b, _ = self._factor_basis(u, v, m, n)
            return b, time.perf_counter() - t0, (u, v)
        if "u" in sh:
            b, s = self._factor_basis(to_numpy(sh["u"]), to_numpy(sh["v"]), m, n)
            return b, s, None
        return None, 0.0, None

    def _count(self, numel: int, extra: tuple[int, ...]) -> int:
        """Entries to keep; ``extra`` = payload sizes of the parts beyond values + index (bases, CRC).

        ``budget = "bytes"``: the largest k' whose parts cost no more wire bytes (records and
        padding included, :func:`wire_cost`) than topk's two parts at the same ratio -- at least
        one entry, so bases larger than the whole budget overshoot it.
        """
        k = count_for(numel, self.ratio, self.k)
        if self.budget == "entries" or not extra:
            return k

        def cost(kk: int) -> int:
            return wire_cost(4 * kk) + wire_cost(_index_bytes(kk, numel, self.index))
        budget = cost(k) - sum(wire_cost(b) for b in extra)
        lo, hi = 1, k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _commit(self, ctx: Ctx, basis: LayerBasis | None, sent: tuple | None) -> Callable[[], None]:
        """The shared-state update both sides apply for a message (closed loop)."""
        def commit() -> None:
            if basis is None:
                return
            sh = ctx.shared
            if sent is not None:
                m, n = basis.shape
                sh["u"] = torch.from_numpy(np.array(sent[0], np.float32).reshape(m, -1))
                sh["v"] = torch.from_numpy(np.array(sent[1], np.float32).reshape(n, -1))
                sh["round"] = int(ctx.round)
            elif self.basis != "client":
                sh["crc"] = int(basis.crc)  # lockstep marker: digests compare the bases client and root used
        return commit

    def _received_basis(self, enc: Encoded, ctx: Ctx, m: int, n: int
                        ) -> tuple[LayerBasis, tuple | None, tuple[int, ...]]:
        if not enc.flags & FLAG_BASES:
            if "u" not in ctx.shared:
                raise PartError("flags", "a mapped message without bases, and no earlier bases from this client")
            b, _ = self._factor_basis(to_numpy(ctx.shared["u"]), to_numpy(ctx.shared["v"]), m, n)
            return b, None, ()
        r = self._rank(m, n)
        got = []
        for name, dim in (("basis_u", m), ("basis_v", n)):
            a = need_part(enc, name, np.float32, min_size=dim, max_size=dim * r)
            if a.size % dim or not bool(np.isfinite(a).all()):
                raise PartError(name, f"{a.size} elements are not whole finite columns of {dim}")
            got.append(a)
        b, _ = self._factor_basis(got[0], got[1], m, n)
        return b, (got[0], got[1]), (got[0].nbytes, got[1].nbytes)

