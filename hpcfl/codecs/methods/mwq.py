"""MWQ: M-magnitude-weighted quantisation of generalized-normal gradients
(Salehkalaibar & Rini, "Lossy Gradient Compression: How Much Accuracy Can One Bit Buy?",
arXiv 2202.02812; methods.md §4).

Per tensor, the client

1. standardises ``z = (x - mu) / std`` (mean and std of the whole tensor, float64);
2. fits GenNorm(0, alpha, beta) to a seeded subsample of ``z`` (scipy ``gennorm.fit``,
   loc fixed at 0), rounds beta to 2 decimals and refits alpha for that beta;
3. takes the 2^R-level weighted Lloyd–Max codebook for (beta, M, R) from
   :mod:`._lloyd` (cached), ``levels = mu + std * alpha * unit_levels``;
4. sends each entry's cell index (R bits, packed), and as side information either
   the fit ``(mu, std, beta, alpha)`` (the root re-derives the identical codebook with the
   same deterministic design; it never refits) or the codebook itself.

Which parts are the paper's: the GenNorm model, the M-weighted L2 distortion and a
Lloyd–Max design under it [ABS + CODE-rel]. Our reconstruction [INF]: the fit-as-side-info
protocol, the 2-decimal beta grid in [0.2, 5], the over-relaxed closed-form Lloyd design,
zstd as the entropy coder, and the weight's centre (``weight_center``): by default the
standardised value, ``|x - mu|^M`` (the related CO3 code's convention, and methods.md §4.3's
design in the standardised domain); ``"zero"`` weights the raw value, ``|x|^M`` (the distortion
as methods.md §4.2 writes it; a grid-integrated design keyed by the rounded offset
``mu / (std alpha)``, see :mod:`._lloyd`). The two agree when M = 0 or the mean is 0.

Flags: 0 = packed codes; 2 = codes as a zstd frame of one byte per index (``entropy``,
used only when smaller than the packed form); 1 = dense float32 (tensors under
``min_numel`` elements, constant or non-finite tensors, or levels that overflow float32).

Payload bytes (n = numel, L = 2^R): side (16 for ``fit``, 4L for ``codebook``) +
``ceil(n R / 8)`` (or the zstd frame when smaller); dense: 4n.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.bitpack import CHUNK, decode_table, flat, pack_bits, packed_size, unpack_bits
from hpcfl.codecs.methods._lloyd import CENTERS, fit_gennorm, levels_from_fit
from hpcfl.codecs.registry import register_codec, register_recipe

__all__ = ["MWQ", "FLAG_DENSE", "FLAG_ZSTD", "tensor_moments", "quantize_indices"]

FLAG_DENSE = 1
FLAG_ZSTD = 2
ZSTD_LEVEL = 3


def tensor_moments(x: np.ndarray) -> tuple[float, float]:
    """(mean, population std) of a float32 vector in float64, two passes over CHUNK-sized
    pieces (no full-size float64 temporary)."""
    n = x.size
    mu = float(np.sum(x, dtype=np.float64)) / n
    ss = 0.0
    for i in range(0, n, CHUNK):
        d = x[i:i + CHUNK].astype(np.float64)
        d -= mu
        ss += float(np.dot(d, d))
    return mu, math.sqrt(ss / n)


def quantize_indices(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """uint8 cell index of each entry: nearest level (thresholds = midpoints), chunked searchsorted."""
    lv = levels.astype(np.float64)
    th = 0.5 * (lv[:-1] + lv[1:])
    out = np.empty(x.size, np.uint8)
    for i in range(0, x.size, CHUNK):
        out[i:i + CHUNK] = np.searchsorted(th, x[i:i + CHUNK].astype(np.float64), side="left")
    return out


@register_codec
class MWQ(Codec):
    """M-magnitude-weighted Lloyd–Max quantiser for a per-tensor GenNorm fit (R bits/entry).

    Parts: ``fit`` float32[4] = (mu, std, beta, alpha) or ``codebook`` float32[2^R];
    ``codes`` packed at R bits (or zstd, flag 2); ``dense`` float32[n] (flag 1).
    Payload bytes: ``16 + ceil(n R / 8)`` (side = fit), ``4 * 2^R + ceil(n R / 8)``
    (side = codebook); 4n dense.
    """

    codec_id = "mwq"
    summary = "M-weighted Lloyd-Max quantiser for a GenNorm fit (Salehkalaibar & Rini 2022), R bits/entry"
    params = {
        "bits": Param(int, 2, "R: bits per entry (2^R levels).", min=1, max=8),
        "m": Param(float, 0.0, "M of the distortion |x|^M (x - x_hat)^2 (0: MSE, plain Lloyd-Max).",
                   min=0.0, max=16.0),
        "weight_center": Param(str, "mean", "Centre of the weight |x - centre|^M: the tensor's mean (CO3's "
                                            "convention; symmetric closed-form design) or zero (|x|^M as "
                                            "methods.md §4.2 writes it; grid design keyed by the rounded "
                                            "mu / (std alpha)). Equal when M = 0.",
                               choices=CENTERS),
        "side": Param(str, "fit", "Side information: the fit (mu, std, beta, alpha; 16 B, the root "
                                  "re-derives the codebook) or the codebook itself (4 * 2^R B).",
                      choices=("fit", "codebook")),
        "entropy": Param(bool, False, "zstd-code the indices (one byte each) when smaller than packing."),
        "min_numel": Param(int, 256, "Tensors with fewer entries go dense (float32, flag 1).", min=0),
        "sample": Param(int, 20000, "Entries in the seeded subsample the GenNorm fit sees.", min=100,
                        max=10_000_000),
        "iters": Param(int, 100, "Lloyd iterations of the codebook design (fixed: both sides agree).",
                       min=1, max=2000),
    }
    compressible_parts = ("codes",)

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("fit", "codebook", "codes", "dense")

    # ------------------------------------------------------------------ encode
    def _dense(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        xf = x.detach().float().contiguous().cpu()
        enc = Encoded({"dense": to_numpy(xf).reshape(-1).copy()}, flags=FLAG_DENSE)
        if ctx.want_recon:
            enc.recon = xf.reshape(ctx.shape).clone().to(x.device)
        return enc

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        x = flat(x)
        n = x.numel()
        if n == 0 or n < self.min_numel:
            return self._dense(x, ctx)
        xn = to_numpy(x)
        mu, sd = tensor_moments(xn)
        if not (math.isfinite(mu) and math.isfinite(sd)) or sd <= 0 or np.float32(sd) <= 0:
            return self._dense(x, ctx)
        if n > self.sample:
            rng = np.random.Generator(np.random.PCG64(ctx.stage_seed("mwq-fit")))
            sub = xn[rng.integers(0, n, size=self.sample)]
        else:
            sub = xn
        z = (sub.astype(np.float64) - mu) / sd
        beta, alpha = fit_gennorm(z)
        fit = np.array([mu, sd, beta, alpha], np.float32)
        levels = levels_from_fit(fit, self.m, self.bits, self.iters, self.weight_center)
        if levels is None:
            return self._dense(x, ctx)
        idx = quantize_indices(xn, levels)
        parts: dict[str, np.ndarray] = {}
        if self.side == "fit":
            parts["fit"] = fit
        else:
            parts["codebook"] = levels
        flags = 0
        packed = pack_bits(idx, self.bits)
        if self.entropy:
            z_codes = self._zstd().compress(idx)
            if z_codes.nbytes < packed.nbytes:
                packed, flags = z_codes, FLAG_ZSTD
        parts["codes"] = packed
        counts = np.bincount(idx, minlength=1 << self.bits)
        p = counts[counts > 0] / n
        energy = float(np.dot(counts, levels.astype(np.float64) ** 2))
        stats = {"beta": float(fit[2]), "alpha": float(fit[3]),
                 "entropy_bits": float(-(p * np.log2(p)).sum()),
                 # ||Q(x)|| / ||x||: M > 0 moves levels outward, inflating the update (a step-size factor)
                 "gain": math.sqrt(energy / (n * (sd * sd + mu * mu)))}
        enc = Encoded(parts, flags=flags, stats=stats)
        if ctx.want_recon:
            enc.recon = from_numpy(levels[idx], ctx.shape).to(x.device)
        return enc

    def _zstd(self):
        z = getattr(self, "_zstd_codec", None)
        if z is None:
            from hpcfl.codecs.basic import Zstd

            z = self._zstd_codec = Zstd(level=ZSTD_LEVEL)
        return z

    # ------------------------------------------------------------------ decode
    def _levels(self, enc: Encoded) -> np.ndarray:
        L = 1 << self.bits
        other = "codebook" if self.side == "fit" else "fit"
        if other in enc.parts:
            raise PartError(other, f"unexpected with side = {self.side!r}")
        if self.side == "fit":
            fit = need_part(enc, "fit", np.float32, 4)
            levels = levels_from_fit(fit, self.m, self.bits, self.iters, self.weight_center)
            if levels is None:
                raise PartError("fit", f"{fit.tolist()} is not a valid fit (finite mu, std > 0, alpha > 0, "
                                "|mu / (std alpha)| < 1e15 with weight_center = zero, "
                                "beta a 2-decimal value in [0.2, 5], finite levels)")
            return levels
        levels = need_part(enc, "codebook", np.float32, L)
        if not bool(np.isfinite(levels).all()) or bool((np.diff(levels) < 0).any()):
            raise PartError("codebook", "levels must be finite and non-decreasing")
        return levels.copy()  # the wire buffer may be read-only; decode_table wraps it in a tensor

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        n = ctx.numel
        if enc.flags == FLAG_DENSE:
            extra = set(enc.parts) - {"dense"}
            if extra:
                raise PartError(sorted(extra)[0], "unexpected next to a dense tensor")
            return from_numpy(need_part(enc, "dense", np.float32, n), ctx.shape)
        if enc.flags not in (0, FLAG_ZSTD):
            raise PartError("flags", f"unknown flags {enc.flags:#x}")
        if "dense" in enc.parts:
            raise PartError("dense", "unexpected next to codes")
        if n == 0 or n < self.min_numel:
            raise PartError("codes", f"a tensor of {n} entries is sent dense (min_numel = {self.min_numel})")
        levels = self._levels(enc)
        codes = need_part(enc, "codes", np.uint8)
        if enc.flags == FLAG_ZSTD:
            if codes.nbytes >= packed_size(n, self.bits):
                raise PartError("codes", "a zstd frame no smaller than the packed codes")
            idx = self._zstd().decompress(codes, n)
            if idx.size != n:
                raise PartError("codes", f"{idx.size} indices, expected {n}")
            if int(idx.max()) >= levels.size:
                raise PartError("codes", f"index {int(idx.max())} out of range (R = {self.bits})")
            return from_numpy(levels[idx], ctx.shape)
        if self.bits in (1, 2, 4, 8):
            return from_numpy(decode_table(codes, self.bits, n, levels), ctx.shape)
        return from_numpy(levels[unpack_bits(codes, self.bits, n)], ctx.shape)


@register_recipe("mwq_ef", "MWQ with error feedback (the related CO3 code's residual memory; "
                 "decay = ef.beta, 0.7 in CO3)",
                 {"bits": 2, "m": 0.0, "side": "fit", "entropy": False, "weight_center": "mean", "decay": 1.0})
def _mwq_ef(p: dict) -> dict:
    return {"id": "ef", "beta": p["decay"],
            "inner": {"id": "mwq", "bits": p["bits"], "m": p["m"], "side": p["side"], "entropy": p["entropy"],
                      "weight_center": p["weight_center"]}}
