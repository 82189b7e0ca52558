"""Intrinsic gradient compression (IGC; Melas-Kyriazi & Wang 2021, arXiv 2112.02656).

The client sends ``z = A^T g``, the d coordinates of its whole-model update in a random
d-dimensional subspace; the root lifts them back to ``A z``. ``A`` (D x d) never crosses
the wire and is never held densely: both sides rebuild it from the job seed and the
subspace index (:mod:`._srht`). Three variants (methods.md §2.3-2.5):

* ``static``: one subspace for the whole run (index 0).
* ``ksubspace``: K subspaces; a round uses index ``round mod K`` (``assign = "round"``), or
  each (round, client) draws its own index from a seed (``assign = "client"``).
* ``timevarying``: a new subspace every ``period`` rounds (index ``round // period``).

The index is a pure function of (job seed, round, client), so nothing but ``z`` is sent:
one part ``z`` = float32[d_eff], payload ``4 d_eff`` bytes with ``d_eff = min(dim, D')``,
D' = the next power of two >= D. With ``dim >= D'`` and the SRHT, ``A A^T = I_D`` and the
codec is lossless up to float32 rounding (the identity check against FedSGD).

Download (:meth:`IGC.downlink_bytes`, logged as clients/downlink_bytes): what the paper's
protocol ships to rebuild the model, not what hpcfl's MPI broadcast carries (always the
full model): static 4d (Σ), ksubspace 4Kd (Σ_1..Σ_K), timevarying 8d (Σ_{e-1} final and
Σ_e; 4d in period 0) for a client that holds the previous period's base θ_{e-1}⁰, else the
full model 4D. Every client holds θ₀ (it comes from the job seed).

The root aggregates the lifted vectors and runs hpcfl's SGD(+momentum) in θ-space; for a
fixed A this equals SGD(+momentum) on the coordinates Σ, θ = θ₀ + A Σ (linearity, whatever
A's normalisation; docs/methods/igc.md).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, need_part, to_numpy
from hpcfl.codecs.methods._srht import SRHT, ChunkedGaussian, padded_size
from hpcfl.codecs.registry import register_codec
from hpcfl.seeding import derive_seed

__all__ = ["IGC", "subspace_seed"]

VARIANTS = ("static", "ksubspace", "timevarying")


def subspace_seed(job_seed: int, slot: str, index: int) -> int:
    """The seed of subspace ``index``: shared by every client and the root."""
    return derive_seed(job_seed, "igc", slot, index)


@register_codec
class IGC(Codec):
    """Intrinsic gradient compression: ``z = A^T g`` up, ``A z`` decoded; A from a shared seed."""

    codec_id = "igc"
    required_scope = "model"
    summary = "intrinsic gradient compression: the update's d coordinates in a seeded random subspace"
    params = {
        "dim": Param(int, 1000, "d, the subspace dimension (floats uploaded); capped at D' = 2^ceil(log2 D).",
                     min=1),
        "variant": Param(str, "static", "static: one subspace; ksubspace: K subspaces; timevarying: a new "
                         "subspace every `period` rounds.", choices=VARIANTS),
        "k": Param(int, 4, "K, the number of subspaces (variant ksubspace).", min=1),
        "assign": Param(str, "round", "ksubspace: round = subspace (round mod K) for every client; client = "
                        "a seeded random subspace per (round, client).", choices=("round", "client")),
        "period": Param(int, 10, "Rounds per subspace (variant timevarying).", min=1),
        "transform": Param(str, "srht", "srht: subsampled randomised Hadamard, O(D log D); gaussian: dense "
                           "N(0,1) regenerated in blocks, O(D d) (for measurements only).",
                           choices=("srht", "gaussian")),
        "normalize": Param(str, "orthogonal", "orthogonal: A = d columns of an orthogonal D' x D' matrix cut to "
                           "D rows (exact at dim >= D', the identity check); unbiased: A scaled by sqrt(D'/d) "
                           "(srht; sqrt(D/d) gaussian) so E[A A^T] = I.", choices=("orthogonal", "unbiased")),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cache: OrderedDict[tuple, SRHT | ChunkedGaussian] = OrderedDict()  # pure function of the key

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("z",)

    # ------------------------------------------------------------ the protocol
    def d_eff(self, n: int) -> int:
        """Floats uploaded for a slot of n elements: min(dim, D'), 0 for an empty slot."""
        return 0 if n == 0 else min(self.dim, padded_size(n))

    def subspace(self, round: int, client: int, job_seed: int) -> int:
        """The subspace index a (round, client) projects onto; both sides compute it."""
        if self.variant == "static":
            return 0
        if self.variant == "timevarying":
            return round // self.period
        if self.assign == "round":
            return round % self.k
        return derive_seed(job_seed, "igc-assign", round, client) % self.k

    def downlink_bytes(self, n_params: int, round: int, last_round: int) -> int | None:
        d = self.d_eff(n_params)
        if self.variant == "static":
            return 4 * d
        if self.variant == "ksubspace":
            return 4 * self.k * d
        e = round // self.period
        if e == 0:
            return 4 * d  # Σ_0 on top of θ₀
        held = last_round // self.period if last_round >= 0 else 0  # θ₀ is period 0's base
        return 8 * d if e - held <= 1 else 4 * n_params

    def projection(self, job_seed: int, slot: str, index: int, n: int) -> SRHT | ChunkedGaussian:
        """The (cached) projection of subspace ``index`` for a slot of n elements."""
        key = (job_seed, slot, index, n)
        p = self._cache.get(key)
        if p is None:
            seed = subspace_seed(job_seed, slot, index)
            unbiased = self.normalize == "unbiased"
            if self.transform == "srht":
                p = SRHT(seed, n, self.d_eff(n), unbiased=unbiased)
            else:
                p = ChunkedGaussian(seed, n, self.d_eff(n), unbiased=unbiased)
            self._cache[key] = p
            while len(self._cache) > max(4, self.k + 2):  # K-subspace keeps all K live
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return p

    def _proj(self, ctx: Ctx) -> tuple[int, SRHT | ChunkedGaussian]:
        j = self.subspace(ctx.round, ctx.client, ctx.job_seed)
        return j, self.projection(ctx.job_seed, ctx.name, j, ctx.numel)

    # ------------------------------------------------------------------ coding
    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        g = x.detach().reshape(-1).float().cpu()
        j, p = self._proj(ctx)
        z = p.project(g)
        gg = float(torch.dot(g, g)) if g.numel() else 0.0
        share = float(torch.dot(z, z)) / gg if gg > 0 else 0.0
        if self.normalize == "unbiased":  # undo the sqrt(D'/d) scale
            share *= p.d / p.n_pad
        # zshare = |A^T g|^2 / |g|^2 at the orthogonal scale: d/D' expected for a random subspace
        enc = Encoded({"z": to_numpy(z)}, stats={"subspace": float(j), "zshare": share})
        if ctx.want_recon:
            enc.recon = p.lift(z).reshape(ctx.shape).to(x.device)
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        _, p = self._proj(ctx)
        z = need_part(enc, "z", np.float32, p.d)
        return p.lift(torch.from_numpy(np.array(z, dtype=np.float32))).reshape(ctx.shape)
