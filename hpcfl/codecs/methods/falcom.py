"""FalCom: gradient-aware error-bounded lossy compression (Ye, Di, Wang, Zhong, Zhang, Yu, arXiv 2511.05770).

Per slot, following the authors' ``FalCom.py`` (methods.md §3.4) with its defects fixed (§3.5):

* **4-D tensors (conv kernels O x I x h x w) with history**: predict each
  element from the slot's last *reconstruction* ``prev`` and an EMA memory
  ``mem``: kernels whose signs agree (kappa >= ``tau``) get the prediction
  ``s * |mem * sigma_c + mu_c|`` (``mem`` <- (1 - beta) mem + beta N(|prev|) on
  those kernels, N the normalisation by |prev|'s mean and std); SZ3 codes the
  residual ``x - prediction`` under the same absolute bound SZ3 alone would use
  (``eps`` times the range of ``x``). No clipping of the residual.
* **first message of a 4-D slot, and every other lossy tensor**: plain SZ3 on
  ``x`` ("direct").
* empty, non-finite or constant tensors, and any tensor whose lossy form is not
  smaller than float32: raw.

Guarantee: ``max |x - x_hat| <= eb`` on every lossy tensor, every round
(exceptions, see :mod:`hpcfl.codecs.eblc`).

State (``ctx.shared``, 4-D slots only): ``prev`` (float32, flat) and ``mem``
(float32, flat, created at the first predictive message), keyed by slot name,
updated on both sides from the reconstruction only: one EMA step per side per
message. mu_prev and sigma_prev are recomputed from ``prev`` on both sides,
not sent.

Wire: flags bits 0-1 = path (0 direct, 1 raw, 2 predictive), bit 2 = ``bits``
is zstd-coded. Predictive parts: ``meta`` uint32[4] (CRC32 of the stream, eb,
mu_c, sigma_c as float32), ``stream`` (SZ3), ``bits`` (two-level bitmap:
ceil(K/8) + ceil(P/8) bytes for K kernels, P predictable, zstd'd when smaller),
optional ``exc_idx``/``exc_val``. Direct/raw: as ``sz3``.

``sign = "oscillation"`` is our reconstruction of the abstract's temporal sign
predictor (not in the released code): level-2 bits say whether a kernel's
dominant sign *differs* from the flip of its sign in ``prev``, so a gradient
that oscillates across rounds leaves mostly zero bits for zstd.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.basic import Zstd
from hpcfl.codecs.eblc import (FLAG_RAW, Coded, abs_bound, bound_stats, check_parts, decode_lossy, encode_lossy,
                               meta_words, raw_coded, usable, verify_bound)
from hpcfl.codecs.methods._falcom_predict import kernel_signs, pack_levels, predict, unpack_levels
from hpcfl.codecs.registry import register_codec
from hpcfl.errors import StateMismatchError

__all__ = ["FalCom", "DIRECT", "RAW", "PREDICTIVE", "FLAG_ZBITS"]

DIRECT, RAW, PREDICTIVE = 0, FLAG_RAW, 2
FLAG_ZBITS = 4
_ZSTD = Zstd(level=10)


@register_codec
class FalCom(Codec):
    """FalCom (module doc). Payload bytes: predictive 16 + |SZ3 stream| + |bits| + 8 * exceptions;
    direct 8 + |SZ3 stream| + 8 * exceptions; raw 4n."""

    codec_id = "falcom"
    decoder_state = True
    summary = "FalCom: EMA magnitude + kernel sign prediction, SZ3 on the residual under the SZ3 bound"
    params = {
        "mode": Param(str, "rel", "rel: eb = eps * (max - min) of the tensor (SZ3's REL); abs: eb = eps.",
                      choices=("rel", "abs")),
        "eps": Param(float, 1e-3, "Error bound (the authors' error_bound, REL 1e-3).", min=0.0, min_open=True),
        "beta": Param(float, 0.07, "EMA rate of the normalized magnitude memory (momentum_lr).", min=0.0, max=1.0),
        "tau": Param(float, 0.5, "Kernel sign-consistency threshold (consistency_threshold); > 1: no "
                                 "kernel is predictable and FalCom codes like SZ3.", min=0.0, max=2.0),
        "sign": Param(str, "kernel", "kernel: level-2 bits are the kernels' dominant signs (the authors' "
                                     "code); oscillation: they say whether the sign differs from the flipped "
                                     "sign in the last reconstruction (our reconstruction of the temporal "
                                     "predictor).", choices=("kernel", "oscillation")),
        "verify": Param(bool, False, "Decode every message at encode time and raise if an element leaves "
                                     "the bound (run-time check mode)."),
    }
    compressible_parts = ()

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("meta", "stream", "exc_idx", "exc_val", "values", "bits")

    # ------------------------------------------------------------- encoding
    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        a = to_numpy(x.float()).reshape(-1)
        st = ctx.shared
        before = dict(st)
        prev, mem = _history(st, a.size)
        eb = abs_bound(a, self.mode, self.eps) if np.isfinite(a).all() else math.nan
        c, new_mem, stats = None, None, {}
        if usable(eb):
            if len(ctx.shape) == 4 and prev is not None:
                c, new_mem, stats = self._predictive(a, prev, mem, eb, ctx.shape)
            if c is None:
                c = encode_lossy(a, None, eb, "sz3")
        if c is None or sum(p.nbytes for p in c.parts.values()) >= a.nbytes:
            c, new_mem = raw_coded(a), None
        self._update(st, ctx.shape, c.recon, new_mem)
        enc = Encoded(c.parts, c.flags, stats={**bound_stats(a, c), "path": float(c.flags & 3), **stats})
        if self.verify:
            scratch = Ctx(ctx.name, ctx.shape, shared_state={ctx.path: before}, path=ctx.path)
            dec = to_numpy(self.decode(Encoded(dict(c.parts), c.flags), scratch)).reshape(-1)
            verify_bound(ctx.name, a, dec, c.eb, bool(c.flags & FLAG_RAW))
            if not np.array_equal(dec.view(np.uint32), c.recon.view(np.uint32)):
                raise StateMismatchError(f"tensor {ctx.name!r}: the root would decode another tensor than "
                                         "the client's reconstruction (shared state would drift)")
        if ctx.want_recon:
            enc.recon = from_numpy(c.recon, ctx.shape, x.device)
        return enc

    def _predictive(self, a: np.ndarray, prev: np.ndarray, mem: np.ndarray, eb: float, shape: tuple[int, ...]
                    ) -> tuple[Coded | None, np.ndarray | None, dict[str, float]]:
        k, m = shape[0] * shape[1], shape[2] * shape[3]
        predictable, positive = kernel_signs(a.reshape(k, m), self.tau)
        flipped = ~kernel_signs(prev.reshape(k, m), self.tau)[1]  # the oscillation predictor's guess
        ref = flipped if self.sign == "oscillation" else None
        mu_c = np.float32(np.abs(a).mean(dtype=np.float64))
        sd_c = np.float32(np.abs(a).std(dtype=np.float64))
        pred, new_mem = predict(prev, mem, predictable, positive, m, mu_c, sd_c, self.beta)
        c = encode_lossy(a, pred, eb, "sz3", extra=(float(mu_c), float(sd_c)))
        stats = {"predictable_kernels": float(predictable.mean()) if k else math.nan,
                 "osc_hit": float((positive == flipped)[predictable].mean()) if predictable.any() else math.nan}
        if c is None:
            return None, None, stats
        bits = pack_levels(predictable, positive, ref)
        z = _ZSTD.compress(bits)
        c.flags = PREDICTIVE | (FLAG_ZBITS if z.size < bits.size else 0)
        c.parts["bits"] = z if z.size < bits.size else bits
        return c, new_mem, stats

    # ------------------------------------------------------------- decoding
    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        if enc.coding:
            raise PartError(next(iter(enc.coding)), "byte-coded parts are not part of FalCom's format")
        n, path = ctx.numel, enc.flags & 3
        if enc.flags & ~7 or path == 3 or (enc.flags & FLAG_ZBITS and path != PREDICTIVE):
            raise PartError("flags", f"unknown flags {enc.flags}")
        st = ctx.shared
        prev, mem = _history(st, n)
        new_mem = None
        if path == RAW:
            check_parts(enc, {"values"})
            xhat = need_part(enc, "values", np.float32, n)
        elif n == 0:
            raise PartError("stream", "an empty tensor is always sent raw")
        elif path == DIRECT:
            xhat = decode_lossy(enc, n, None, "sz3")
        else:
            if len(ctx.shape) != 4:
                raise PartError("flags", f"a predictive message for a {len(ctx.shape)}-D tensor")
            if prev is None:
                raise PartError("flags", "a predictive message but the root holds no history for this slot")
            k, m = ctx.shape[0] * ctx.shape[1], ctx.shape[2] * ctx.shape[3]
            _, (mu_c, sd_c) = meta_words(enc, 2)
            if not (np.isfinite(mu_c) and np.isfinite(sd_c) and mu_c >= 0 and sd_c >= 0):
                raise PartError("meta", f"magnitude statistics {mu_c!r}, {sd_c!r} must be finite and >= 0")
            zbits, n1 = bool(enc.flags & FLAG_ZBITS), (k + 7) // 8
            bits = need_part(enc, "bits", np.uint8, min_size=1 if zbits else n1, max_size=2 * n1)
            if zbits:
                bits = _ZSTD.decompress(bits, 2 * n1)
            ref = ~kernel_signs(prev.reshape(k, m), self.tau)[1] if self.sign == "oscillation" else None
            predictable, positive = unpack_levels(bits, k, ref)
            pred, new_mem = predict(prev, mem, predictable, positive, m, mu_c, sd_c, self.beta)
            xhat = decode_lossy(enc, n, pred, "sz3", n_extra=2, also=("bits",))
        self._update(st, ctx.shape, xhat, new_mem)
        return from_numpy(xhat, ctx.shape)  # state holds its own copy

    @staticmethod
    def _update(st: dict, shape: tuple[int, ...], recon: np.ndarray, new_mem: np.ndarray | None) -> None:
        """Both sides, from the reconstruction only: ``prev`` <- x_hat; ``mem`` <- its EMA step."""
        if len(shape) != 4:
            return
        st["prev"] = torch.from_numpy(recon.copy())
        if new_mem is not None:
            st["mem"] = torch.from_numpy(new_mem)


def _history(st: dict, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """The slot's last reconstruction (None before its first message) and EMA memory (zeros at first)."""
    prev, mem = _flat32(st.get("prev")), _flat32(st.get("mem"))
    mem = np.zeros(n, np.float32) if mem is None else mem
    if (prev is not None and prev.size != n) or mem.size != n:
        raise PartError("state", f"history of {prev.size if prev is not None else 0} elements for a "
                                 f"{n}-element slot")
    return prev, mem


def _flat32(v: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    return None if v is None else np.asarray(v, dtype=np.float32).reshape(-1)
