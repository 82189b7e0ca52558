"""Error feedback: a wrapper that works around any lossy codec.

GRACE's ResidualMemory semantics: the codec sees ``gamma * x + beta * e`` and
the residual becomes ``e' = (gamma * x + beta * e) - x_hat`` where ``x_hat`` is
what the root will decode (closed loop). With beta = gamma = 1, mass is
conserved: ``x + e == x_hat + e'``. The residual lives on the client only and,
being in the tensor's original space, survives changes of the inner codec's
basis (methods.md §6.2).
"""

from __future__ import annotations

import torch

from hpcfl.codecs.base import Codec, CodecParam, Ctx, Encoded, Param
from hpcfl.codecs.registry import register_codec

__all__ = ["ErrorFeedback"]


@register_codec
class ErrorFeedback(Codec):
    codec_id = "ef"
    kind = "wrapper"
    stateful = True
    summary = "error feedback around an inner codec (residual memory)"
    params = {
        "inner": CodecParam("The lossy codec to wrap."),
        "beta": Param(float, 1.0, "Decay of the stored residual.", min=0.0),
        "gamma": Param(float, 1.0, "Scale of the incoming update.", min=0.0, min_open=True),
    }

    @property
    def part_names(self) -> tuple[str, ...]:
        return self.inner.part_names

    @property
    def decoder_state(self) -> bool:  # type: ignore[override]
        return self.inner.decoder_state

    @property
    def compressible_parts(self) -> tuple[str, ...]:
        return getattr(self.inner, "compressible_parts", self.inner.part_names)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        st = ctx.state
        e = st.get("residual")
        comp = x.float() * self.gamma if self.gamma != 1.0 else x.float()
        if e is not None:
            comp = comp + (e * self.beta if self.beta != 1.0 else e)
        enc = self.inner.encode(comp, ctx.child("inner", want_recon=True))
        st["residual"] = comp - enc.recon
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        return self.inner.decode(enc, ctx.child("inner"))
