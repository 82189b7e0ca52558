"""Error feedback: a wrapper that works around any lossy codec.

GRACE's ResidualMemory semantics: the codec sees ``gamma * x + beta * e`` and
the residual becomes ``e' = (gamma * x + beta * e) - x_hat`` where ``x_hat`` is
what the root will decode (closed loop). With beta = gamma = 1, mass is
conserved: ``x + e == x_hat + e'``. The residual lives on the client only and,
being in the tensor's original space, survives changes of the inner codec's
basis (methods.md §6.2).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcfl.codecs.base import Codec, CodecParam, Ctx, Encoded, Param
from hpcfl.codecs.registry import register_codec

__all__ = ["ErrorFeedback"]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() == sb.data_ptr() and sa.nbytes() > 0


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
    def needs_global(self) -> bool:  # type: ignore[override]
        return self.inner.needs_global

    @property
    def side_inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.side_inputs

    @property
    def required_scope(self) -> str | None:  # type: ignore[override]
        return self.inner.required_scope

    def downlink_bytes(self, n_params: int, round: int, last_round: int) -> int | None:
        return self.inner.downlink_bytes(n_params, round, last_round)

    @property
    def compressible_parts(self) -> tuple[str, ...]:
        return getattr(self.inner, "compressible_parts", self.inner.part_names)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        st = ctx.state
        e = st.get("residual")
        # The residual buffer is reused in place round after round: it first becomes the
        # compensated input, then the new residual. Fresh 64 MB temporaries cost more
        # than the arithmetic (page faults), so this keeps EF at about one inner encode.
        if e is None or e.shape != x.shape or e.dtype != torch.float32:
            comp = x.float().clone()
            if self.gamma != 1.0:
                comp.mul_(self.gamma)
        else:
            comp = e
            if self.beta != 1.0:
                comp.mul_(self.beta)
            comp.add_(x, alpha=self.gamma)
        enc = self.inner.encode(comp, ctx.child("inner", want_recon=True))
        # comp is overwritten below: detach anything the inner codec returned as a view of it
        # (identity's values part, a dense fallback, a recon that *is* its input).
        recon = enc.recon
        if _shares_memory(recon, comp):
            recon = enc.recon = recon.clone()
        if comp.device.type == "cpu":
            comp_np = comp.detach().numpy()
            for name, a in enc.parts.items():
                if np.may_share_memory(a, comp_np):
                    enc.parts[name] = a.copy()
        st["residual"] = comp.sub_(recon)
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        return self.inner.decode(enc, ctx.child("inner"))

    def decode_sum(self, encs, weights, ctxs):
        return self.inner.decode_sum(encs, weights, [c.child("inner") for c in ctxs])
