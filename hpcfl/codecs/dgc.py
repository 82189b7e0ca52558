"""Deep Gradient Compression (Lin et al., ICLR 2018), adapted to the FL uplink.

Per client and slot the encoder keeps two float32 vectors in ``ctx.state``:
the momentum ``u`` and the accumulation ``v``. Each round, with ``x`` the
client's update:

1. (optional, ``clip > 0``) gradient clipping: ``x <- x * min(1, clip / ||x||_2)``
   before anything is accumulated;
2. momentum correction: ``u <- m * u + x``;
3. local accumulation: ``v <- v + u``;
4. select the exact top-k of ``|v|`` (:func:`hpcfl.codecs.sparsify.topk_indices`,
   ties towards the lowest index) and send those entries of ``v``;
5. momentum factor masking: ``u[sent] = 0`` and ``v[sent] = 0``.

With ``momentum = 0`` step 2 is ``u = x`` and the codec is exactly top-k with
error feedback (``topk_ef``): ``v`` is the residual, ``x + v`` is what top-k
sees, and zeroing the sent entries is ``residual = compensated - decoded``.

Adaptation notes. In the paper DGC compresses *gradients* in data-parallel
SGD and momentum lives in the compressor instead of the optimiser; here the
input is whatever the client uploads (a FedSGD gradient or a FedAvg model
delta), and ``u``/``v`` persist per client across the rounds it takes part in
(stale in between). The paper's warm-up schedule (sparsity ramped from 75% to
99.9% over the first epochs) is not implemented: use ``ratio`` per job. Its
clipping threshold is scaled by ``N^-1/2`` for N workers; here ``clip`` is the
absolute L2 bound per slot.

Wire: identical to ``topk`` (``values`` float32[k] + one index part, see
:mod:`hpcfl.codecs.sparsify`); payload ``4k + 4k`` (int32 / delta),
``4k + ceil(n/8)`` (bitmap), auto ``4k + min(4k, ceil(n/8))``, with
``k = max(1, ceil(ratio * n))``. Decoding is a stateless scatter.
"""

from __future__ import annotations

import torch

from hpcfl.codecs.base import Ctx, Encoded, Param
from hpcfl.codecs.registry import register_codec
from hpcfl.codecs.sparsify import SparseCodec, _index_param, _k_param, _ratio_param, count_for, topk_indices

__all__ = ["DGC"]


@register_codec
class DGC(SparseCodec):
    codec_id = "dgc"
    stateful = True
    summary = "Deep Gradient Compression: momentum correction + accumulation + top-k + masking"
    params = {
        "ratio": _ratio_param(),
        "k": _k_param(),
        "momentum": Param(float, 0.9, "Momentum m of the correction u <- m*u + x (0: top-k with error "
                          "feedback).", min=0.0, max=1.0, max_open=True),
        "clip": Param(float, 0.0, "L2 norm bound applied to the update before accumulation (0 = off).",
                      min=0.0),
        "index": _index_param(),
    }

    def expected_count(self, n: int) -> int | None:
        return count_for(n, self.ratio, self.k)

    def _vec(self, st: dict, key: str, like: torch.Tensor) -> torch.Tensor | None:
        t = st.get(key)
        if not isinstance(t, torch.Tensor) or t.numel() != like.numel():
            return None
        return t.reshape(-1).to(device=like.device, dtype=torch.float32)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        g = x.detach().reshape(-1).float()
        n = g.numel()
        if self.clip > 0:
            norm = float(torch.linalg.vector_norm(g))
            if norm > self.clip:
                g = g * (self.clip / norm)
        st = ctx.state
        u = self._vec(st, "u", g)
        v = self._vec(st, "v", g)
        if self.momentum == 0.0 or u is None:
            u = g.clone()
        else:
            u = u.mul_(self.momentum).add_(g)
        v = u.clone() if v is None else v.add_(u)
        idx = topk_indices(v, count_for(n, self.ratio, self.k), ctx.stage_seed("topk-sample"))
        enc = self.emit(v, idx, ctx, values=v[idx])
        u[idx] = 0.0  # momentum factor masking
        v[idx] = 0.0
        st["u"] = u
        st["v"] = v
        return enc
