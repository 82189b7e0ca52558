"""ALTSPACE: top-k in an orthogonal per-layer alternative space (Kim, Han, Seo, Moon, ICML 2024).

The paper's idea [ABS, methods.md §1.1]: map each layer's update by an orthogonal (hence
lossless) map built from the structure of input activations and output gradients, where many
entries are near zero, and sparsify *there*. For a layer viewed as an ``m x n`` matrix X
(conv: out x in*kh*kw) we send top-k of ``Y = Q_u^T X Q_v`` and the root inverts
``X_hat = Q_u S(Y) Q_v^T`` (:mod:`._altspace_basis`: bases as Householder reflectors, so a
truncated ``rank`` plus its complement stays exactly orthogonal).

How both sides get Q_u, Q_v is **our reconstruction** (methods.md §1.3, [TBD] in the paper),
hence param ``basis``:

* ``shared`` (Protocol A, default): singular vectors of this layer's last global server step
  (``ctx.glob["delta"]``), known to client and root: nothing extra on the wire. Round 0 has no
  step: plain top-k. ``verify`` lets the root catch bases that differ from the client's (e.g.
  LAPACK rounding on another CPU) instead of silently decoding garbage: 13 bits of the bases'
  CRC32 in tensor flag bits 3-15 (``flags``, 0 B) or the whole CRC32 as part ``crc`` (4 B).
* ``weights`` (Protocol A2, ablation): singular vectors of the layer's global weights.
* ``client`` (Protocol B, ablation): eigenvectors of the client's own output-gradient and
  input-activation second moments (``ctx.side`` from the ``activations`` capture), truncated to
  ``rank`` and sent as float32 parts ``basis_u`` (m x r) and ``basis_v`` (n x r): +4r(m+n) B.
* ``identity``: no map; messages equal ``topk``'s with the same ratio/k/index, part for part.

``rank = r`` takes r data vectors per side and completes them with an orthogonal complement
(lossless whatever r); ``rank = 0`` takes min(m, n), capped at ``max_full_rank`` (default 256) so
a large layer's basis and map cost stay bounded. For r well below min(m, n) the shared bases come
from a seeded randomized SVD rather than the full one (:func:`._altspace_basis.svd_vectors`).

``refresh = P`` keeps a basis P rounds (shared/weights: the reference is stored per client on
both sides; client: the root keeps the last bases it received). ``budget = "bytes"`` lowers k so
a slot costs no more wire bytes than ``topk``'s at the same ratio (bases, CRC, their part
records and padding included), for comparisons at equal uplink bytes. Error feedback belongs
outside, in the original space (recipe ``altspace_ef``). Tensors that are not matrices
(``vectors``) go dense (flag 4) or through plain top-k. Flags: 1 mapped, 2 bases in the message,
4 dense. Payload: ``4k + index bytes`` as topk (+4 with ``verify = "crc32"``; +4 r_u m + 4 r_v n
for client bases, r <= ``rank``); dense: 4n.

Stats per slot: ``energy_topk_orig``/``energy_topk_mapped`` (share of ||X||^2 in the k largest
entries of X / of Y: the mechanism the paper relies on), ``basis_s`` (seconds building bases in
this call; 0 when cached), ``map_s`` (map + selection), ``basis_bytes``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.methods._altspace_basis import LayerBasis, aggregate_mapped
from hpcfl.codecs.methods._altspace_provider import (CHECK_MASK, CHECK_SHIFT, FLAG_BASES, FLAG_DENSE, FLAG_MAPPED,
                                                     BasisProvider)
from hpcfl.codecs.registry import register_codec, register_recipe
from hpcfl.codecs.sparsify import (INDEX_PARTS, _index_param, _k_param, _ratio_param, pack_indices, read_sparse,
                                   topk_indices)

__all__ = ["AltSpace", "FLAG_MAPPED", "FLAG_BASES", "FLAG_DENSE", "BASES"]

BASES = ("shared", "weights", "client", "identity")


@dataclass
class _Parsed:
    """One validated message: kept mapped-space entries, or a dense tensor, plus the state update."""

    basis: LayerBasis | None
    idx: np.ndarray | None
    vals: np.ndarray
    commit: Callable[[], None] | None = None


@register_codec
class AltSpace(BasisProvider, Codec):
    """Top-k in an orthogonal per-layer space (see the module doc for bases, bytes and flags)."""

    codec_id = "altspace"
    summary = "top-k in an orthogonal per-layer alternative space (Kim et al. ICML 2024; bases: ours)"
    compressible_parts = INDEX_PARTS
    params = {
        "basis": Param(str, "shared", "Where the bases come from: shared (last global step, no uplink), "
                       "weights (global weights), client (own activation/gradient moments, sent), identity.",
                       choices=BASES),
        "ratio": _ratio_param(), "k": _k_param(), "index": _index_param(),
        "rank": Param(int, 0, "Data vectors per side (0 = min(m, n), capped by max_full_rank); the rest is the "
                      "orthogonal complement.", min=0),
        "max_full_rank": Param(int, 256, "rank = 0: a layer with min(m, n) above this takes this many data vectors "
                               "plus the orthogonal complement (still lossless), bounding basis and map cost; "
                               "0 = no cap.", min=0),
        "refresh": Param(int, 1, "Rounds a basis is kept before it is rebuilt.", min=1),
        "budget": Param(str, "entries", "entries: k from ratio, bases on top; bytes: fewer entries so a "
                        "message is no larger than topk's at the same ratio.", choices=("entries", "bytes")),
        "vectors": Param(str, "dense", "Tensors that are not matrices: dense float32 or plain top-k.",
                         choices=("dense", "topk")),
        "verify": Param(str, "flags", "Shared/weights bases: the root checks the client's bases by 13 bits of "
                        "their CRC32 in the tensor flags (0 B), by the whole CRC32 in a part (crc32, 4 B), or not.",
                        choices=("flags", "crc32", "off")),
        "diagnostics": Param(bool, True, "Log the top-k energy share before the map (one extra top-k)."),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cache: OrderedDict[bytes, LayerBasis] = OrderedDict()

    @property
    def part_names(self) -> tuple[str, ...]:  # topk's four first: identical messages under basis = identity
        return ("values",) + INDEX_PARTS + ("basis_u", "basis_v", "crc")

    @property
    def decoder_state(self) -> bool:  # type: ignore[override]
        return self.basis != "identity"

    @property
    def needs_global(self) -> bool:  # type: ignore[override]
        return self.basis in ("shared", "weights")

    @property
    def side_inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("activations",) if self.basis == "client" else ()

    # ----------------------------------------------------------------- encode
    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        mn = self._matrix(ctx.shape)
        xf = x.detach().reshape(-1).float()
        if mn is None and self.vectors == "dense":
            return Encoded({"values": to_numpy(xf).copy()}, flags=FLAG_DENSE,
                           recon=xf.clone().reshape(ctx.shape) if ctx.want_recon else None)
        basis, basis_s, sent, extra = None, 0.0, None, ()
        if mn is not None:
            m, n = mn
            if self.basis in ("shared", "weights"):
                basis, basis_s = self._shared_basis(ctx, m, n)
                extra = (4,) if self.verify == "crc32" else ()
            elif self.basis == "client":
                basis, basis_s, sent = self._client_basis(ctx, m, n)
                extra = () if sent is None else (sent[0].nbytes, sent[1].nbytes)
        t0 = time.perf_counter()
        y = xf
        if basis is not None:
            y = basis.forward(xf.double().reshape(mn)).float().reshape(-1)
            if not bool(torch.isfinite(y).all()) and bool(torch.isfinite(xf).all()):
                basis, sent = None, None  # float32 overflow of a concentrated entry: stay in the original space
                y = xf
        extra = extra if basis is not None else ()
        k = self._count(xf.numel(), extra)
        idx = topk_indices(y, k, ctx.stage_seed("topk-sample"))
        vals = y[idx]
        parts = {"values": to_numpy(vals)}
        parts.update(pack_indices(idx, xf.numel(), self.index))
        flags = 0
        if basis is not None:
            flags = FLAG_MAPPED
            if sent is not None:
                flags |= FLAG_BASES
                parts.update(basis_u=sent[0], basis_v=sent[1])
            elif self.basis != "client" and self.verify == "crc32":
                parts["crc"] = np.array([basis.crc], np.uint32)
            elif self.basis != "client" and self.verify == "flags":
                flags |= (basis.crc & CHECK_MASK) << CHECK_SHIFT
        map_s = time.perf_counter() - t0
        enc = Encoded(parts, flags)
        if ctx.want_recon:
            enc.recon = self._rebuild(basis, to_numpy(idx), parts["values"], ctx.shape)
        self._commit(ctx, basis, sent)()
        if mn is not None:
            enc.stats = self._stats(xf, y, idx, k, basis is not None, basis_s, map_s, extra, ctx)
        return enc

    def _stats(self, xf: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, k: int, mapped: bool, basis_s: float,
               map_s: float, extra: tuple[int, ...], ctx: Ctx) -> dict[str, float]:
        """Per-slot diagnostics: top-k energy share of the mapped (and original) entries, costs."""
        total = float(xf.double().pow(2).sum())
        share = (lambda v: float(v.double().pow(2).sum()) / total if total > 0 else math.nan)
        st = {"energy_topk_mapped": share(y[idx]), "basis_s": basis_s, "map_s": map_s,
              "basis_bytes": float(sum(extra))}
        if self.diagnostics:
            st["energy_topk_orig"] = share(xf[topk_indices(xf, k, ctx.stage_seed("topk-orig"))]) if mapped \
                else st["energy_topk_mapped"]
        return st

    @staticmethod
    def _rebuild(basis: LayerBasis | None, idx: np.ndarray, vals: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """The one reconstruction both sides run (same ops, same inputs: same bits)."""
        n = math.prod(shape)
        if basis is None:
            out = np.zeros(n, np.float32)
            out[idx] = vals
            return from_numpy(out, shape)
        y = np.zeros(n, np.float64)
        y[idx] = vals
        return basis.inverse(torch.from_numpy(y).reshape(basis.shape)).to(torch.float32).reshape(shape)

    # ----------------------------------------------------------------- decode
    def _parse(self, enc: Encoded, ctx: Ctx) -> _Parsed:
        shape, check, f = ctx.shape, enc.flags >> CHECK_SHIFT, enc.flags & ((1 << CHECK_SHIFT) - 1)
        if check and not (f == FLAG_MAPPED and self.basis in ("shared", "weights") and self.verify == "flags"):
            raise PartError("flags", f"unknown flags {enc.flags:#x}")
        mn = self._matrix(shape)
        dense = mn is None and self.vectors == "dense"
        if bool(f & FLAG_DENSE) != dense or (dense and f != FLAG_DENSE):
            raise PartError("flags", f"flags {f:#x} do not fit a {shape} slot with vectors = {self.vectors!r}")
        if dense:
            self._only(enc, {"values"})
            return _Parsed(None, None, need_part(enc, "values", np.float32, math.prod(shape)))
        allowed = {"values", *INDEX_PARTS}
        basis, sent, extra = None, None, ()
        if mn is not None and self.basis in ("shared", "weights"):
            basis, _ = self._shared_basis(ctx, *mn)  # also advances the stored reference (refresh > 1)
        if not f & FLAG_MAPPED:
            if f & FLAG_BASES:
                raise PartError("flags", "bases without a mapped message")
            basis = None
        elif mn is None or self.basis == "identity":
            raise PartError("flags", f"a mapped message for a {shape} slot with basis = {self.basis!r}")
        elif self.basis == "client":
            basis, sent, extra = self._received_basis(enc, ctx, *mn)
            allowed |= {"basis_u", "basis_v"} if sent is not None else set()
        else:
            if basis is None:
                raise PartError("flags", "a mapped message, but the root has no shared reference for this slot")
            if self.verify == "crc32":
                allowed.add("crc")
                extra = (4,)
            got = int(need_part(enc, "crc", np.uint32, 1)[0]) if self.verify == "crc32" else check
            want = basis.crc if self.verify == "crc32" else basis.crc & CHECK_MASK
            if self.verify != "off" and got != want:
                raise PartError("crc", "the client's bases differ from the root's (same reference, other "
                                "rounding: different CPU or thread count?)")
        self._only(enc, allowed)
        idx, vals = read_sparse(enc, math.prod(shape), self._count(math.prod(shape), extra))
        return _Parsed(basis, idx, vals, self._commit(ctx, basis, sent))

    @staticmethod
    def _only(enc: Encoded, allowed: set[str]) -> None:
        extra = set(enc.parts) - allowed
        if extra:
            raise PartError(sorted(extra)[0], "part not allowed with these flags")

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        p = self._parse(enc, ctx)
        if p.idx is None:
            return from_numpy(p.vals, ctx.shape)
        p.commit()
        return self._rebuild(p.basis, p.idx, p.vals, ctx.shape)

    def decode_sum(self, encs: Sequence[Encoded], weights: Sequence[float], ctxs: Sequence[Ctx]) -> torch.Tensor:
        """``sum_k w_k decode(enc_k)``, inverting once per distinct basis (one per layer when all
        clients share it) instead of once per client; equal to the per-client sum up to rounding.
        The hook a root would call per slot (see docs/methods/altspace.md)."""
        shape = ctxs[0].shape
        out = torch.zeros(shape, dtype=torch.float32)
        groups: dict[int, tuple[LayerBasis | None, list, list]] = {}
        for enc, w, ctx in zip(encs, weights, ctxs):
            p = self._parse(enc, ctx)
            if p.idx is None:
                out += float(w) * from_numpy(p.vals, shape)
                continue
            p.commit()
            g = groups.setdefault(id(p.basis), (p.basis, [], []))
            g[1].append((p.idx, p.vals))
            g[2].append(w)
        for basis, items, ws in groups.values():
            out += aggregate_mapped(items, ws, basis, shape)
        return out


@register_recipe("altspace_ef", "altspace (top-k in an orthogonal per-layer space) with error feedback in the "
                 "original space", {"basis": "shared", "ratio": 0.01, "k": 0, "index": "auto", "rank": 0,
                                    "max_full_rank": 256, "refresh": 1, "budget": "entries", "vectors": "dense",
                                    "verify": "flags", "diagnostics": True})
def _altspace_ef(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "altspace", **p}}
