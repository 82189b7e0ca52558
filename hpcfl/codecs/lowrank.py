"""Low-rank codecs: PowerSGD (single message) and ATOMO-style truncated SVD.

Both view a slot of shape ``(d0, d1, ...)`` as the matrix ``M`` of shape
``n x m`` with ``n = d0`` and ``m = d1 * d2 * ...`` (the ``matrix`` transform's
view of conv kernels) and send two float32 factors, part ``p`` (``n x r``,
row-major) and part ``q`` (``m x r``); the root rebuilds ``M_hat = p @ q.T``.
Payload: ``4 r (n + m)`` bytes.

Dense fallback: when ``r (n + m) >= n m / min_compression`` the factors would
not be smaller, and the codec sends the slot as plain float32 in part
``dense`` (``4 n m`` bytes) with ``flags = 1``. With ``min_compression >= 1``
this covers every 0-D and 1-D tensor (viewed as ``n x 1``) and every matrix
with ``r >= min(n, m)``. Routing should normally send such tensors dense
(``routing.min_ndim = 2``); the fallback only makes a stray one harmless.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.registry import register_codec, register_recipe

__all__ = ["PowerSGD", "Atomo", "LowRankCodec", "matrix_shape", "atomo_probabilities"]

FLAG_DENSE = 1


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(first dim, product of the rest)``; 0-D -> (1, 1), 1-D (n,) -> (n, 1)."""
    if len(shape) == 0:
        return (1, 1)
    return (int(shape[0]), int(math.prod(shape[1:])))


class LowRankCodec(Codec):
    """Shared parts, dense fallback and decoding (``M_hat = p @ q.T``)."""

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("p", "q", "dense")

    def goes_dense(self, shape: tuple[int, ...]) -> bool:
        n, m = matrix_shape(shape)
        return self.rank * (n + m) * self.min_compression >= n * m

    def _dense(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        xf = x.detach().float()
        return Encoded({"dense": to_numpy(xf).reshape(-1)}, flags=FLAG_DENSE,
                       recon=xf.reshape(ctx.shape).clone() if ctx.want_recon else None)

    def _factors(self, p: torch.Tensor, q: torch.Tensor, ctx: Ctx) -> Encoded:
        p = p.float().contiguous()
        q = q.float().contiguous()
        enc = Encoded({"p": to_numpy(p).reshape(-1), "q": to_numpy(q).reshape(-1)})
        if ctx.want_recon:
            enc.recon = (p @ q.T).reshape(ctx.shape)
        return enc

    def max_factor_rank(self, n: int, m: int) -> tuple[int, int]:
        """Allowed range of the number of factor columns in a message."""
        return (self.rank, self.rank)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        if enc.flags == FLAG_DENSE:
            return from_numpy(need_part(enc, "dense", np.float32, ctx.numel), ctx.shape)
        if enc.flags != 0:
            raise PartError("flags", f"unknown flags {enc.flags:#x}")
        n, m = matrix_shape(ctx.shape)
        if n * m == 0:  # the encoder always sends an empty tensor dense (and p.size % n would divide by 0)
            raise PartError("flags", f"factors for the empty tensor of shape {ctx.shape}; only flags = 1 is valid")
        lo, hi = self.max_factor_rank(n, m)
        p = need_part(enc, "p", np.float32, min_size=n * lo, max_size=n * hi)
        if p.size % n:
            raise PartError("p", f"{p.size} elements are not a whole number of rows of {n}")
        r = p.size // n
        q = need_part(enc, "q", np.float32, m * r)
        if "dense" in enc.parts:
            raise PartError("dense", "dense part next to factors")
        pt = from_numpy(p, (n, r))
        qt = from_numpy(q, (m, r))
        return (pt @ qt.T).reshape(ctx.shape)


def _min_compression_param() -> Param:
    return Param(float, 1.0, "Send dense (flags = 1) unless the factors are this many times smaller: "
                 "dense when rank*(n+m)*min_compression >= n*m.", min=1.0)


# --------------------------------------------------------------- PowerSGD

@register_codec
class PowerSGD(LowRankCodec):
    """PowerSGD (Vogels et al., NeurIPS 2019), rank ``r``, in one client->root message.

    Per round, with ``M`` the ``n x m`` view of the slot and ``Q`` the client's
    warm-start matrix (``m x r``, in ``ctx.state["q"]``)::

        P  = orthonormalize(M Q)          # torch.linalg.qr, n x r
        Q' = M^T P                        # m x r
        send P, Q'; root: M_hat = P Q'^T  # = P P^T M, M projected on span(P)
        Q <- Q'                           # warm start for the next round

    Payload ``4 r (n + m)`` bytes, or ``4 n m`` dense (flags = 1, see module doc).

    Initial Q. Drawn from N(0, 1) with ``ctx.static_seed("powersgd-q0")`` (job
    seed, client, tensor, stage path): constant across rounds, so the first Q of
    a (client, tensor) does not depend on the round the client first takes part
    in, and a cleared state restarts from the same Q. (``ctx.stage_seed`` mixes
    in the round and would not.) Different clients and tensors get different
    Q0s, which is harmless here because nothing is summed before decoding.

    Single message vs. the original. The original runs two all-reduces per
    step: it sums ``P_i = M_i Q`` over workers, orthonormalizes the *sum*, then
    sums ``Q_i = M_i^T P`` and every worker decodes the *average* ``P Q^T``.
    It needs a Q shared by all workers, two collective phases and linearity.
    Here there is no reduction between the phases: each client orthonormalizes
    its own ``P_i`` locally and sends both factors, the root reconstructs each
    client's ``P_i Q_i'^T`` and averages the reconstructions. Each client's
    subspace tracks its own update (one power-iteration step per round, warm
    started), the uplink carries the same ``r (n + m)`` floats as the two
    phases together but in one message with no round trip in between, and
    the average of the rank-r reconstructions can have rank up to
    ``r x clients``. Like the original it is biased and meant to run with
    error feedback: recipe ``powersgd_ef``.
    """

    codec_id = "powersgd"
    stateful = True
    summary = "PowerSGD rank-r, one power iteration with warm start, single message"
    params = {
        "rank": Param(int, 2, "Rank r of the approximation.", min=1),
        "min_compression": _min_compression_param(),
    }

    def initial_q(self, ctx: Ctx, m: int, device: torch.device) -> torch.Tensor:
        # numpy's PCG64 normals are the same bits on every CPU; torch.randn's are not
        # (they depend on the vector ISA), which would make runs differ across machines.
        rng = np.random.Generator(np.random.PCG64(ctx.static_seed("powersgd-q0")))
        return torch.from_numpy(rng.standard_normal((m, self.rank), dtype=np.float32)).to(device)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        if self.goes_dense(ctx.shape):
            return self._dense(x, ctx)
        n, m = matrix_shape(ctx.shape)
        M = x.detach().float().reshape(n, m)
        st = ctx.state
        q = st.get("q")
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != (m, self.rank):
            q = self.initial_q(ctx, m, M.device)
        q = q.to(device=M.device, dtype=torch.float32)
        p = torch.linalg.qr(M @ q).Q  # reduced QR: n x r with orthonormal columns
        q_new = M.T @ p
        st["q"] = q_new
        return self._factors(p, q_new, ctx)


@register_recipe("powersgd_ef", "PowerSGD (single message, warm start) with error feedback", {"rank": 2})
def _powersgd_ef(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "powersgd", "rank": p["rank"]}}


# ------------------------------------------------------------------ ATOMO

def atomo_probabilities(s: torch.Tensor, budget: float) -> torch.Tensor:
    """ATOMO's sampling probabilities: ``p_i = min(1, c s_i)`` with ``sum p_i = budget``.

    ``s`` sorted descending, non-negative. Water-filling: the largest atoms
    saturate at 1 and the remaining budget is spread proportionally to s.
    """
    d = s.numel()
    s = s.double()
    if budget >= int((s > 0).sum()):
        return (s > 0).double()
    # tail[j] = sum(s[j:]); with j atoms saturated, c_j = (budget - j) / tail[j].
    tail = torch.flip(torch.cumsum(torch.flip(s, (0,)), 0), (0,))
    j = torch.arange(d, dtype=torch.float64)
    c = (budget - j) / tail.clamp_min(1e-300)
    ok = (s * c <= 1.0) & (j < budget)
    first = int(torch.nonzero(ok)[0]) if bool(ok.any()) else 0
    p = (s * c[first]).clamp(max=1.0)
    p[:first] = 1.0
    return p


@register_codec
class Atomo(LowRankCodec):
    """ATOMO-style rank-r truncated SVD (Wang et al., NeurIPS 2018; LBGM's baseline, r = 2).

    Deterministic (default): ``M ~ U_r S_r V_r^T``; sends ``p = U_r S_r`` (n x r)
    and ``q = V_r`` (m x r); exact on matrices of rank <= r. Payload
    ``4 r (n + m)`` bytes. This is the truncation LBGM's code uses, not ATOMO's
    unbiased estimator.

    ``sample = true``: ATOMO's unbiased atom sampling on the full SVD. Atom i
    is kept with probability ``p_i = min(1, c s_i)``, ``sum p_i = r`` (so on
    average r atoms), independently, and rescaled by ``1 / p_i``:
    ``E[M_hat] = M``. The count k of kept atoms varies per message, so the
    payload is ``4 k (n + m)`` with ``E[k] <= r`` (k = r exactly when at most
    r singular values are non-zero: then every p_i is 1 and the result is
    exact). If a draw keeps so many atoms that ``k (n + m) >= n m``, the
    estimate itself (not x) is sent dense with ``flags = 1``, which keeps
    the estimator unbiased. Randomness: ``ctx.stage_seed("atomo-sample")``.

    ``svd``: "full" (``torch.linalg.svd``), "randomized" (Halko et al., with
    r + 8 columns drawn from ``ctx.stage_seed("atomo-sketch")`` and 4 power
    iterations; exact on rank-<=r matrices, near-optimal otherwise), or
    "auto": randomized when ``min(n, m) > 256``. Measured on one CPU thread:
    full SVD of 256 x 2304 takes 0.05 s, 512 x 4608 0.38 s, 2048 x 2048 2.0 s.
    Sampling always uses the full SVD (it needs every singular value).
    """

    codec_id = "atomo"
    summary = "rank-r truncated SVD (ATOMO/LBGM baseline); optional unbiased atom sampling"
    params = {
        "rank": Param(int, 2, "Rank r (sample = true: expected number of atoms).", min=1),
        "sample": Param(bool, False, "ATOMO's unbiased atom sampling instead of truncation."),
        "svd": Param(str, "auto", "SVD method: full, randomized, or auto (randomized when "
                     "min(n, m) > 256).", choices=("auto", "full", "randomized")),
        "min_compression": _min_compression_param(),
    }

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return bool(self.sample)

    def max_factor_rank(self, n: int, m: int) -> tuple[int, int]:
        if self.sample:
            return (0, min(n, m))
        return (self.rank, self.rank)

    def _truncated(self, M: torch.Tensor, ctx: Ctx) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = M.shape
        r = self.rank
        method = self.svd
        if method == "auto":
            method = "randomized" if min(n, m) > 256 else "full"
        if method == "full" or r + 8 >= min(n, m):
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            return U[:, :r] * S[:r], Vh[:r].T
        g = torch.Generator().manual_seed(ctx.stage_seed("atomo-sketch"))
        omega = torch.randn(m, r + 8, generator=g).to(M.device)
        Y = torch.linalg.qr(M @ omega).Q
        for _ in range(4):  # power iterations, re-orthonormalized each half step
            Y = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Y).Q).Q
        U, S, Vh = torch.linalg.svd(Y.T @ M, full_matrices=False)
        return (Y @ U[:, :r]) * S[:r], Vh[:r].T

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        if self.goes_dense(ctx.shape):
            return self._dense(x, ctx)
        n, m = matrix_shape(ctx.shape)
        M = x.detach().float().reshape(n, m)
        if not self.sample:
            p, q = self._truncated(M, ctx)
            return self._factors(p, q, ctx)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        prob = atomo_probabilities(S.cpu(), float(self.rank))
        g = torch.Generator().manual_seed(ctx.stage_seed("atomo-sample"))
        keep = torch.rand(prob.numel(), generator=g, dtype=torch.float64) < prob
        kk = torch.nonzero(keep).squeeze(1)
        scale = (S.cpu().double()[kk] / prob[kk]).float().to(M.device)
        kk = kk.to(M.device)
        p = U[:, kk] * scale
        q = Vh[kk].T
        if kk.numel() * (n + m) >= n * m:
            est = (p @ q.T).reshape(ctx.shape)
            return Encoded({"dense": to_numpy(est).reshape(-1)}, flags=FLAG_DENSE,
                           recon=est if ctx.want_recon else None)
        return self._factors(p, q, ctx)
