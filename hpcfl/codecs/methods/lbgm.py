"""LBGM: the look-back gradient multiplier (Azam, Hosseinalipour, Qiu, Brinton, ICLR 2022).

Each client keeps, per slot, its *look-back gradient* (LBG): the last vector it
sent in full. The root keeps the same vector per client and slot. Each round the
client codes its update ``x`` with the inner codec (``identity`` for standalone
LBGM; top-k, sign or ATOMO for the paper's plug-and-play runs) and tests the
vector it is about to send, ``v`` (the inner codec's reconstruction), against
the LBG (see :mod:`._lbgm_math`)::

    rho   = <v, LBG> / <LBG, LBG>          alpha = 1 - cos^2(v, LBG)
    alpha <= delta  ->  send rho alone (flags bit 0); both sides use rho * LBG
    otherwise       ->  send the inner codec's parts; both sides set LBG <- v

The first message of a slot (no LBG yet) is always full. ``delta = 0`` never
recycles, so ``lbgm{delta = 0}`` equals its inner codec bit for bit.

Per slot: the default routing scope gives the authors' per-tensor LBGM
(``lbgm_approximation`` loops over ``model.parameters()``); ``routing.scope =
"model"`` gives the paper's whole-model LBGM (one slot ``@model``).

Wire (per slot): recycled: ``flags = 1``, part ``rho`` float32[1] (4 bytes);
full: ``flags = inner_flags << 1`` and the inner codec's parts (its payload).

State: ``ctx.shared["lbg"]`` (float32, the slot's shape) on both sides, set
only from the reconstruction (closed loop). The authors' ``--residual 1``
(residual ``x - rho * LBG`` added next round) is ``ef`` *around* ``lbgm``:
recipe ``lbgm_ef``; top-k plug-and-play is ``ef{lbgm{topk}}``
(``lbgm_topk_ef``). Per-slot diagnostics go to ``/codec_stats``: ``recycled``
(1/0), ``floats`` (payload bytes / 4: 1 for a recycled slot, numel for a full
float32 slot, the float32-equivalent of the inner payload otherwise) and
``lbp_error`` (alpha; 1 when there is no LBG).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcfl.codecs.base import Codec, CodecParam, Ctx, Encoded, Param, PartError, from_numpy, need_part
from hpcfl.codecs.methods._lbgm_math import recycle_decision
from hpcfl.codecs.registry import register_codec, register_recipe
from hpcfl.errors import ConfigError

__all__ = ["LBGM", "FLAG_SCALAR"]

FLAG_SCALAR = 1
_RHO = "rho"
_STATS = ("recycled", "floats", "lbp_error")


@register_codec
class LBGM(Codec):
    """Look-back gradient multiplier around an inner codec (see module doc).

    Payload bytes per slot: 4 if recycled, else the inner codec's payload.
    """

    codec_id = "lbgm"
    kind = "wrapper"
    decoder_state = True
    summary = "LBGM: send one look-back coefficient instead of the update when it is near the last one sent"
    params = {
        "inner": CodecParam("The codec whose message LBGM replaces by a scalar when it can.",
                            default={"id": "identity"}),
        "delta": Param(float, 0.2, "Threshold on the look-back phase error sin^2(angle); recycle when "
                       "alpha <= delta (0: never recycle).", min=0.0, max=1.0),
        "eps": Param(float, 1e-6, "Norm floor of the cosine (the authors' CosineSimilarity eps).", min=0.0),
    }

    def _check(self, key: str) -> None:
        if _RHO in self.inner.part_names:
            raise ConfigError(f"{key}.inner", f"the inner codec {self.inner.codec_id!r} already has a part "
                              f"{_RHO!r} (LBGM inside LBGM is not supported)")
        if self.inner.decoder_state:
            raise ConfigError(f"{key}.inner", f"{self.inner.codec_id!r} keeps decoder state; on a recycled "
                              "round the root would not decode it and the two sides would drift apart")
        if self.inner.kind == "transform":
            raise ConfigError(f"{key}.inner", f"{self.inner.codec_id!r} is a transform; put it in a pipeline")

    # -- properties passed through from the inner codec ---------------------
    @property
    def part_names(self) -> tuple[str, ...]:
        return self.inner.part_names + (_RHO,)

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        return bool(self.inner.lossless and self.delta == 0.0)

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.inner.stateful

    @property
    def needs_global(self) -> bool:  # type: ignore[override]
        return self.inner.needs_global

    @property
    def side_inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.side_inputs

    @property
    def required_scope(self) -> str | None:  # type: ignore[override]
        return self.inner.required_scope

    @property
    def compressible_parts(self) -> tuple[str, ...]:
        return getattr(self.inner, "compressible_parts", self.inner.part_names)

    def downlink_bytes(self, n_params: int, round: int, last_round: int) -> int | None:
        return self.inner.downlink_bytes(n_params, round, last_round)

    # -- coding --------------------------------------------------------------
    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        enc = self.inner.encode(x, ctx.child("inner", want_recon=True))
        v = enc.recon.reshape(ctx.shape)
        lbg = ctx.shared.get("lbg")
        recycle, rho, alpha = recycle_decision(v, lbg, self.delta, self.eps)
        if recycle:
            out = Encoded({_RHO: rho.reshape(1)}, flags=FLAG_SCALAR)
            out.recon = lbg * float(rho)  # exactly what decode computes on the root
            out.stats = {"recycled": 1.0, "floats": 1.0, "lbp_error": alpha}
            return out
        if enc.flags >= 1 << 15:
            raise ValueError(f"inner codec flags {enc.flags:#x} do not fit beside LBGM's flag bit")
        ctx.shared["lbg"] = v.detach().float().clone()
        out = Encoded(enc.parts, flags=enc.flags << 1, recon=v, coding=enc.coding)
        out.stats = {k: val for k, val in enc.stats.items() if k not in _STATS}
        out.stats.update(recycled=0.0, floats=enc.payload_bytes / 4.0, lbp_error=alpha)
        return out

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        if enc.flags & FLAG_SCALAR:
            if enc.flags != FLAG_SCALAR:
                raise PartError("flags", f"unknown flags {enc.flags:#x} on a scalar-only message")
            extra = sorted(set(enc.parts) - {_RHO})
            if extra:
                raise PartError(extra[0], "unexpected beside the look-back coefficient")
            rho = need_part(enc, _RHO, np.float32, 1)
            if not bool(torch.isfinite(from_numpy(rho, (1,)))[0]):
                raise PartError(_RHO, "non-finite look-back coefficient")
            lbg = ctx.shared.get("lbg")
            if lbg is None:
                raise PartError(_RHO, "scalar-only message, but no look-back gradient is held for this slot")
            if tuple(lbg.shape) != ctx.shape:
                raise PartError(_RHO, f"look-back gradient has shape {tuple(lbg.shape)}, not {ctx.shape}")
            return lbg * float(rho[0])
        if _RHO in enc.parts:
            raise PartError(_RHO, "look-back coefficient in a full message")
        inner = Encoded(enc.parts, flags=enc.flags >> 1, coding=enc.coding)
        x = self.inner.decode(inner, ctx.child("inner")).reshape(ctx.shape)
        ctx.shared["lbg"] = x.detach().float().clone()
        return x


# ------------------------------------------------------------------ recipes

@register_recipe("lbgm_ef", "LBGM with the authors' residual (--residual 1): ef around lbgm",
                 {"delta": 0.2})
def _lbgm_ef(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "lbgm", "delta": p["delta"], "inner": {"id": "identity"}}}


@register_recipe("lbgm_topk_ef", "LBGM on per-tensor top-k, error feedback around both (the paper's "
                 "top-k plug-and-play)", {"ratio": 0.1, "delta": 0.2})
def _lbgm_topk_ef(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "lbgm", "delta": p["delta"],
                                  "inner": {"id": "topk", "ratio": p["ratio"]}}}


@register_recipe("lbgm_sign", "LBGM on signSGD (the paper's plug-and-play; no error feedback)", {"delta": 0.2})
def _lbgm_sign(p: dict) -> dict:
    return {"id": "lbgm", "delta": p["delta"], "inner": {"id": "sign"}}


@register_recipe("lbgm_atomo", "LBGM on rank-r ATOMO (the paper's plug-and-play: r = 2, no error feedback)",
                 {"rank": 2, "delta": 0.2})
def _lbgm_atomo(p: dict) -> dict:
    return {"id": "lbgm", "delta": p["delta"], "inner": {"id": "atomo", "rank": p["rank"]}}
