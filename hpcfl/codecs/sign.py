"""Sign-and-magnitude codecs: signSGD, 1-bit SGD (with their EF recipes) and
natural compression.

Each sends x's sign plus a magnitude class: one for the whole tensor (sign),
one per sign class (onebit), or a power of two per element (natural). sign and
onebit send one bit per element, 1 where ``x < 0``: zero (and -0.0, and NaN)
packs as 0, i.e. as the non-negative class. Shared conventions (scale checks,
NaN policy, chunking, randomness) are those of :mod:`hpcfl.codecs.quantize`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.bitpack import (Uniforms, absmax, chunks, decode_table, flat, l1norm, new_buffer, pack_signs,
                                  scratch)
from hpcfl.codecs.quantize import NAN, recon_of, scale_part
from hpcfl.codecs.registry import register_codec, register_recipe

__all__ = ["Sign", "OneBit", "Natural"]


@register_codec
class Sign(Codec):
    """signSGD (Bernstein et al. 2018): one bit per element.

    ``scale = "none"`` decodes to +-1 (zero maps to +1); ``scale = "mean"``
    decodes to +-||x||_1 / n, EF-signSGD's scaled sign (Karimireddy et al.
    2019), sent as float32[1].

    Parts: ``signs`` packed bits (1 = negative), ``scale`` float32[1] (mean only).
    Payload bytes: ``ceil(n / 8) + (4 if scale == "mean" else 0)``.
    """

    codec_id = "sign"
    summary = "signSGD: 1 bit/element, decoded as +-1 or +-mean|x|"
    params = {
        "scale": Param(str, "none", "none: decode to +-1; mean: +-||x||_1/n (EF-signSGD's scaled sign).",
                       choices=("none", "mean")),
    }

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("signs", "scale")

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        x = flat(x)
        parts = {"signs": pack_signs(x)}
        if self.scale == "mean":
            n = x.numel()
            m = l1norm(x) / n if n else 0.0
            parts["scale"] = np.array([m if math.isfinite(m) else NAN], np.float32)
        return recon_of(self, Encoded(parts), ctx, x.device)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        if self.scale == "mean":
            m = float(scale_part(enc, "scale")[0])
        else:
            if "scale" in enc.parts:
                raise PartError("scale", "unexpected: this sign codec sends no scale")
            m = 1.0
        out = decode_table(need_part(enc, "signs", np.uint8), 1, ctx.numel, [m, -m], "signs")
        return from_numpy(out, ctx.shape)


@register_recipe("ef_sign", "EF-signSGD (Karimireddy et al. 2019): scaled sign with error feedback")
def _ef_sign(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "sign", "scale": "mean"}}


@register_codec
class OneBit(Codec):
    """1-bit SGD (Seide et al. 2014), per tensor: one bit per element.

    The two classes are ``x >= 0`` (bit 0) and ``x < 0`` (bit 1); each decodes
    to its class mean, the squared-error-optimal value for that split (an
    empty class sends 0). Use it with error feedback: recipe ``onebit_ef``.

    Parts: ``signs`` packed bits, ``means`` float32[2] = (mean of the
    non-negative class >= 0, mean of the negative class <= 0).
    Payload bytes: ``ceil(n / 8) + 8``.
    """

    codec_id = "onebit"
    summary = "1-bit SGD: sign bit, decoded to the mean of each sign class"

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("signs", "means")

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        x = flat(x)
        n, dev = x.numel(), x.device
        buf, neg = scratch(n, torch.float32, dev), scratch(n, torch.bool, dev)
        s_pos = s_neg = 0.0
        n_neg = 0
        for i, j in chunks(n, dev):
            b = buf[:j - i]
            s_pos += float(torch.clamp(x[i:j], min=0, out=b).sum())
            s_neg += float(torch.clamp(x[i:j], max=0, out=b).sum())
            n_neg += int(torch.lt(x[i:j], 0, out=neg[:j - i]).sum())
        if (math.isinf(s_pos) or math.isinf(s_neg)) and math.isfinite(absmax(x)):
            # finite entries whose float32 chunk sums overflowed (past 3.4e38): redo in float64
            s_pos = float(torch.clamp(x, min=0).double().sum())
            s_neg = float(torch.clamp(x, max=0).double().sum())
        n_pos = n - n_neg
        means = [s_pos / n_pos if n_pos else 0.0, s_neg / n_neg if n_neg else 0.0]
        if not all(math.isfinite(v) for v in means):
            means = [NAN, NAN]
        enc = Encoded({"signs": pack_signs(x), "means": np.array(means, np.float32)})
        return recon_of(self, enc, ctx, dev)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        means = need_part(enc, "means", np.float32, 2)
        pos, neg = float(means[0]), float(means[1])
        if pos < 0 or neg > 0 or math.isinf(pos) or math.isinf(neg):
            raise PartError("means", f"({pos}, {neg}) is not (>= 0, <= 0) and finite")
        out = decode_table(need_part(enc, "signs", np.uint8), 1, ctx.numel, [pos, neg], "signs")
        return from_numpy(out, ctx.shape)


@register_recipe("onebit_ef", "1-bit SGD with error feedback (Seide et al. 2014 always pair them)")
def _onebit_ef(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "onebit"}}


# ------------------------------------------------------- natural compression

@register_codec
class Natural(Codec):
    """Natural compression (Horvath et al. 2019): |x| rounded to a power of two.

    With ``2^e <= |x| < 2^(e+1)``, |x| becomes ``2^(e+1)`` with probability
    ``|x| / 2^e - 1`` and ``2^e`` otherwise, which is unbiased. On the wire,
    one byte per element plus a per-tensor top exponent ``E`` (int8):

    * code ``c = b & 0x7F``, sign ``b >> 7``: ``c = 0`` is 0, ``c`` in 1..127 is
      ``+-2^(E - 127 + c)``, i.e. a window of 127 powers of two,
      ``2^(E-126) .. 2^E``; byte 0x80 is NaN.
    * ``E = clamp(frexp(max|x|).exponent, -23, 127)``: the smallest power of two
      above max|x|, so the window never overflows. The clamp keeps the whole
      window inside float32 (``2^-149 .. 2^127``), subnormals included, and
      the decode is exactly the chosen power of two.
    * Below the window (``|x| < 2^(E-126)``, including subnormals when the
      window does not reach them), |x| goes to ``2^(E-126)`` with probability
      ``|x| / 2^(E-126)`` and to 0 otherwise: still unbiased. Zero stays 0.
    * Only |x| >= 2^127 (beyond float32's last power of two) is rounded down
      deterministically, and +-inf saturates to +-2^E.

    In range, rounding adds a uniform 23-bit integer to the float's mantissa
    bits: the carry into the exponent happens with probability exactly
    ``mantissa / 2^23``. Parts: ``exp`` int8[1], ``codes`` uint8[n].
    Payload bytes: ``n + 1``.
    """

    codec_id = "natural"
    unbiased = True
    summary = "natural compression: stochastic rounding to powers of two (sign + exponent, 1 B/element)"

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("exp", "codes")

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        x = flat(x)
        n, dev = x.numel(), x.device
        amax = absmax(x)
        nonfinite = not math.isfinite(amax)
        E = 127 if nonfinite else (-23 if amax == 0 else min(127, max(-23, math.frexp(amax)[1])))
        codes = new_buffer(n, torch.uint8, dev)
        xb = x.view(torch.int32)
        a, f, ri = (scratch(n, torch.int32, dev) for _ in range(3))
        g = Uniforms(ctx.stage_seed("natural"), dev)
        g_low = Uniforms(ctx.stage_seed("natural", "low"), dev)
        low = max(E, 0)  # exponent fields <= low: zero, subnormal or below the window
        for i, j in chunks(n, dev):
            m = j - i
            xc, ab, fb = xb[i:j], a[:m], f[:m]
            torch.bitwise_and(xc, 0x7FFFFFFF, out=ab)  # |x| as bits
            torch.bitwise_right_shift(ab, 23, out=fb)  # biased exponent field
            f_lo, f_hi = (int(v) for v in torch.aminmax(fb))
            special = f_lo <= low or f_hi == 255
            if f_hi == 255:
                ab.clamp_(max=0x7F7FFFFF)  # no int32 overflow below; inf/NaN are redone in float64
            ab.add_(g.ints_(ri[:m], 23))  # carries into the exponent with probability mantissa / 2^23
            ab.bitwise_right_shift_(23)
            ab.sub_(E)  # code = f' - E  (f' = f or f + 1)
            if E == 127:
                ab.clamp_(max=127)
            torch.bitwise_right_shift(xc, 24, out=fb)
            ab.bitwise_or_(fb.bitwise_and_(128))  # the sign bit
            c = codes[i:j]
            c.copy_(ab)
            if special:
                torch.bitwise_right_shift(xc, 23, out=fb)
                fb.bitwise_and_(255)
                idx = ((fb <= low) | (fb == 255)).nonzero()[:, 0]
                c[idx] = _natural_special(x[i:j][idx], E, g_low)
        enc = Encoded({"exp": np.array([E], np.int8), "codes": to_numpy(codes)})
        return recon_of(self, enc, ctx, dev)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        E = int(need_part(enc, "exp", np.int8, 1)[0])
        if not -23 <= E <= 127:
            raise PartError("exp", f"top exponent {E} outside [-23, 127]")
        mag = np.ldexp(1.0, np.arange(E - 127, E + 1))  # index c -> 2^(E - 127 + c), exact in float32
        mag[0] = 0.0
        table = np.concatenate([mag, -mag]).astype(np.float32)
        table[128] = np.nan
        out = decode_table(need_part(enc, "codes", np.uint8, ctx.numel), 8, ctx.numel, table)
        return from_numpy(out, ctx.shape)


def _natural_special(xs: torch.Tensor, E: int, g: Uniforms) -> torch.Tensor:
    """Codes for the rare elements the bit path leaves out: zeros, subnormals,
    values below the window, inf and NaN (float64 arithmetic, exact)."""
    a = xs.double().abs()
    lo = E - 126  # exponent of code 1
    mant, ex = torch.frexp(a)
    e = ex.long() - 1  # floor(log2 a) for finite a > 0
    inwin = (a > 0) & (e >= lo) & torch.isfinite(a)
    u = g.float64(a.numel()).to(a.device)
    p = torch.where(inwin, 2 * mant - 1, a * 2.0 ** (-lo))
    up = u < p
    code = torch.where(inwin, e - lo + 1 + up, up.long())
    code = torch.where(torch.isinf(a), torch.full_like(code, 127), code)
    code = code + 128 * ((xs < 0) & (code > 0))
    code = torch.where(torch.isnan(xs), torch.full_like(code, 128), code)
    return code.to(torch.uint8)
