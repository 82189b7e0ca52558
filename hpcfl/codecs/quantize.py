"""Scalar quantisers: uniform k-bit, QSGD and TernGrad.

Sign-and-magnitude codecs (signSGD, 1-bit SGD, natural compression) live in
:mod:`hpcfl.codecs.sign`.

Conventions shared by every codec here (and in ``sign``):

* Payload sizes are exact formulas of ``n = numel``; each codec states its own.
* Stochastic rounding draws from :class:`~hpcfl.codecs.bitpack.Uniforms`
  seeded with ``ctx.stage_seed(...)`` (numpy PCG64 on CPU, a torch.Generator on
  other devices); the receiver never needs the RNG. Uniforms are multiples of
  2^-24 and the arithmetic is float32, so "unbiased" holds up to float32
  resolution (natural compression's in-range path is exactly unbiased).
* Math runs in torch on ``x``'s device, in cache-sized chunks on CPU
  (:func:`~hpcfl.codecs.bitpack.chunks`); only byte packing uses numpy.
* A scale part must be ``>= 0`` and not infinite; anything else raises
  :class:`PartError`. NaN is accepted: an encoder whose input is not finite
  (NaN/inf makes its scale non-finite) sends scale NaN and all-zero codes, so
  the root decodes an all-NaN tensor, just as ``identity`` would pass NaN on.
* Decoders return CPU tensors; ``recon`` is on ``x``'s device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.bitpack import (CHUNK, Uniforms, absmax, chunks, decode_table, flat, l2norm, new_buffer, pack_bits,
                                  scratch, unpack_bits)
from hpcfl.codecs.registry import register_codec, register_recipe

__all__ = ["Uniform", "QSGD", "TernGrad"]

NAN = float("nan")


# ------------------------------------------------------------------ helpers

def scale_part(enc: Encoded, name: str, count: int = 1) -> np.ndarray:
    """A float32[count] part of scales: each must be >= 0 and not +inf (NaN allowed)."""
    a = need_part(enc, name, np.float32, count)
    if np.any(a < 0) or np.any(np.isinf(a)):
        raise PartError(name, f"{a.tolist()} is not a valid scale (need >= 0 and finite, or NaN)")
    return a


def recon_of(codec: Codec, enc: Encoded, ctx: Ctx, device: torch.device) -> Encoded:
    """Fill ``enc.recon`` (on ``device``) from the codec's own stateless decode."""
    if ctx.want_recon and enc.recon is None:
        enc.recon = codec.decode(enc, ctx).to(device)
    return enc


def rounded_codes(x: torch.Tensor, mult: float, offset: float, top: int, *, absolute: bool,
                  g: Uniforms | None, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Integer codes ``clamp(floor(v * mult + offset + u), 0, top)`` with ``v = |x|`` or ``x``.

    ``u`` is uniform in [0, 1) from ``g`` (stochastic rounding) or 0.5 when ``g``
    is None (round to nearest). Works chunk by chunk with one float temporary.
    """
    n, dev = x.numel(), x.device
    if g is None and dev.type == "cpu" and dtype == torch.uint8:
        return _rounded_codes_np(x, mult, offset, top, absolute=absolute)
    out = new_buffer(n, dtype, dev)
    buf = scratch(n, torch.float32, dev)
    rnd = scratch(n, torch.float32, dev) if g is not None else None
    ibuf = scratch(n, torch.int32, dev) if g is not None else None
    for i, j in chunks(n, dev):
        b = buf[:j - i]
        if absolute:
            torch.abs(x[i:j], out=b)
            b.mul_(mult)
        else:
            torch.mul(x[i:j], mult, out=b)
        if g is None:
            b.add_(offset + 0.5)  # >= 0, so the truncating cast below is floor
            if absolute:
                b.clamp_(0, top)
            # signed input with |x| * mult <= offset (mult = L / max|x|): b lies in
            # [0.5 - ulp, top + 0.5 + ulp], so the cast alone lands in [0, top]: no clamp pass
        else:
            b.add_(g.uniform_(rnd[:j - i], ibuf)).add_(offset)
            b.clamp_(0, top)
        out[i:j].copy_(b)
    return out


def _rounded_codes_np(x: torch.Tensor, mult: float, offset: float, top: int, *, absolute: bool) -> torch.Tensor:
    """Round-to-nearest codes on the CPU with numpy: same values as the torch path,
    about 2x faster single-threaded (numpy's float32 -> uint8 cast is vectorised)."""
    xn = to_numpy(x).reshape(-1)
    n = xn.size
    out = new_buffer(n, torch.uint8, x.device)
    on = out.numpy()
    buf = np.empty(min(n, CHUNK), dtype=np.float32)
    m = np.float32(mult)
    add = np.float32(offset + 0.5)
    for i in range(0, n, CHUNK):
        j = min(i + CHUNK, n)
        b = buf[:j - i]
        if absolute:
            np.abs(xn[i:j], out=b)
            b *= m
        else:
            np.multiply(xn[i:j], m, out=b)
        b += add  # >= 0, so the truncating cast is floor
        if absolute:
            np.minimum(b, np.float32(top), out=b)
        on[i:j] = b
    return out


def nonzero_signs(x: torch.Tensor, codes: torch.Tensor) -> np.ndarray:
    """Sign bits (1 = negative) of the elements of ``x`` whose code is non-zero,
    in element order, packed 8 per byte (chunk by chunk on CPU)."""
    if x.device.type != "cpu":
        return np.packbits(to_numpy(torch.signbit(x[codes != 0])), bitorder="little")
    xn, cn = to_numpy(x), to_numpy(codes)
    bits = [np.compress(cn[i:j] != 0, np.signbit(xn[i:j])) for i, j in chunks(x.numel(), x.device)]
    return np.packbits(np.concatenate(bits) if bits else np.zeros(0, bool), bitorder="little")


# ------------------------------------------------------------------ uniform

@register_codec
class Uniform(Codec):
    """Uniform k-bit quantisation with a per-tensor symmetric max-abs scale.

    With ``L = 2**(bits-1) - 1`` and ``s = max|x|``, element x becomes the code
    ``q + L`` where ``q = round(x * L / s)`` in ``[-L, L]``: round half up, or
    stochastic rounding (``floor(y + u)``, unbiased) when ``stochastic``.
    The root decodes ``(code - L) * s / L``; code ``2**bits - 1`` is invalid.
    Deterministic error per element is at most ``s / L / 2`` (plus the float32
    rounding of ``x * L / s``, below ``s * 2^-21``). A zero tensor sends
    ``s = 0`` and decodes exactly; so does a constant one.

    Parts: ``scale`` float32[1], ``codes`` packed at ``bits`` bits.
    Payload bytes: ``4 + ceil(n * bits / 8)``.
    """

    codec_id = "uniform"
    summary = "uniform k-bit quantisation with a per-tensor max-abs scale"
    params = {
        "bits": Param(int, 8, "Bits per element (2**(bits-1) - 1 levels each side of zero).",
                      choices=(2, 4, 8)),
        "stochastic": Param(bool, False, "Stochastic (unbiased) rounding instead of round to nearest."),
    }

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return bool(self.stochastic)

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("scale", "codes")

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        x = flat(x)
        L = (1 << (self.bits - 1)) - 1
        s = absmax(x)
        if s > 0 and math.isfinite(s):
            g = Uniforms(ctx.stage_seed("uniform"), x.device) if self.stochastic else None
            codes = rounded_codes(x, L / s, L, 2 * L, absolute=False, g=g)
        else:
            s = s if s == 0 else NAN
            codes = torch.full((x.numel(),), L, dtype=torch.uint8)
        enc = Encoded({"scale": np.array([s], np.float32), "codes": pack_bits(to_numpy(codes), self.bits)})
        return recon_of(self, enc, ctx, x.device)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        s = float(scale_part(enc, "scale")[0])
        L = (1 << (self.bits - 1)) - 1
        values = (np.arange(2 * L + 1, dtype=np.float64) - L) * (s / L)  # rounded once, to float32
        codes = need_part(enc, "codes", np.uint8)
        return from_numpy(decode_table(codes, self.bits, ctx.numel, values), ctx.shape)


# --------------------------------------------------------------------- QSGD

@register_codec
class QSGD(Codec):
    """QSGD (Alistarh et al. 2017): stochastic rounding to ``s`` levels of a norm.

    Element x is sent as a level ``l`` in ``{0..s}`` with ``E[l] = s * |x| / norm``
    (``l = floor(s*|x|/norm + u)``) and, only where ``l > 0``, its sign, so
    ``decode = sign * l * norm / s`` is unbiased. ``norm = "l2"`` is the paper's
    (variance <= min(n/s^2, sqrt(n)/s) * ||x||^2); ``"linf"`` (max |x|) is
    APPFL's variant, with far fewer zero levels.

    Parts: ``norm`` float32[1]; ``levels`` packed at ``b = ceil(log2(s + 1))``
    bits when ``s <= 255``, else uint16; ``signs`` 1 bit (1 = negative) for each
    of the ``k`` non-zero levels, in element order (a zero level has no sign,
    so every message has one valid form). Payload bytes:
    ``4 + ceil(k / 8) + (ceil(n * b / 8) if s <= 255 else 2 * n)``; with the l2
    norm ``E[k] <= s * ||x||_1 / ||x||_2 <= s * sqrt(n)``. A zero or non-finite
    norm sends all-zero levels and no signs.

    The paper entropy-codes the levels with Elias codes; here ``levels`` is the
    compressible part, and the ``qsgd_zstd`` recipe runs zstd on it, whose
    FSE/Huffman stage is the entropy coder. The signs of non-zero levels are
    fair coin flips, incompressible, so they are sent packed and uncoded.
    """

    payload_revision = 1  # 1: signs only for non-zero levels (0: one sign bit per element)
    codec_id = "qsgd"
    unbiased = True
    summary = "QSGD: stochastic rounding to s levels of the l2 (or max) norm, levels + signs of non-zero levels"
    params = {
        "levels": Param(int, 4, "Number of quantisation levels s (level 0..s).", min=1, max=65535),
        "norm": Param(str, "l2", "Scale: l2 norm (the paper) or max |x| (APPFL's linf variant).",
                      choices=("l2", "linf")),
    }
    compressible_parts = ("levels",)

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("norm", "signs", "levels")

    @property
    def level_bits(self) -> int:
        """Bits per packed level, or 16 (uint16, unpacked) above 255 levels."""
        return self.levels.bit_length() if self.levels <= 255 else 16

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        x = flat(x)
        s, n = self.levels, x.numel()
        norm = l2norm(x) if self.norm == "l2" else absmax(x)
        wide = s > 255
        if norm > 0 and math.isfinite(norm):
            g = Uniforms(ctx.stage_seed("qsgd"), x.device)
            lv = rounded_codes(x, s / norm, 0.0, s, absolute=True, g=g,
                               dtype=torch.int32 if wide else torch.uint8)
            signs, a = nonzero_signs(x, lv), to_numpy(lv)
        else:
            norm = norm if norm == 0 else NAN
            a = np.zeros(n, np.int32 if wide else np.uint8)
            signs = np.zeros(0, np.uint8)
        levels = a.astype(np.uint16) if wide else pack_bits(a, self.level_bits)
        enc = Encoded({"norm": np.array([norm], np.float32), "signs": signs, "levels": levels})
        return recon_of(self, enc, ctx, x.device)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        n, s = ctx.numel, self.levels
        norm = float(scale_part(enc, "norm")[0])
        if s > 255:
            lv = need_part(enc, "levels", np.uint16, n)
        else:
            lv = unpack_bits(need_part(enc, "levels", np.uint8), self.level_bits, n, "levels")
        if n and int(lv.max()) > s:
            raise PartError("levels", f"level {int(lv.max())} exceeds levels = {s}")
        k = int(np.count_nonzero(lv))
        if k and not norm > 0:
            raise PartError("levels", f"{k} non-zero levels with norm {norm} (all must be 0)")
        neg = unpack_bits(need_part(enc, "signs", np.uint8), 1, k, "signs").view(bool)
        cpu, step, done = torch.device("cpu"), np.float32(norm / s), 0
        out = new_buffer(n, torch.float32, cpu)
        for i, j in chunks(n, cpu):  # float32(level) * step, then the signs of this chunk's non-zero levels
            o = out.numpy()[i:j]
            o[:] = lv[i:j]
            o *= step
            nz = np.flatnonzero(lv[i:j] != 0)  # (on a bool mask: several times faster than on the ints)
            v = o[nz]  # >= 0: setting the float sign bit negates; gather/scatter, no data-dependent branch
            v.view(np.uint32)[:] |= neg[done:done + nz.size].view(np.uint8).astype(np.uint32) << 31
            o[nz] = v
            done += nz.size
        return out.reshape(ctx.shape)


@register_recipe("qsgd_zstd", "QSGD with entropy-coded levels: zstd (its FSE/Huffman stage is the "
                 "entropy coder, instead of the paper's Elias coding) on the levels part",
                 {"levels": 4, "level": 3})
def _qsgd_zstd(p: dict) -> dict:
    return {"id": "pipeline", "encoder": {"id": "qsgd", "levels": p["levels"]},
            "bytes": [{"id": "zstd", "level": p["level"], "parts": ["levels"]}]}


# ----------------------------------------------------------------- TernGrad

@register_codec
class TernGrad(Codec):
    """TernGrad (Wen et al. 2017): ``s * t`` with ``t`` in {-1, 0, 1}, ``s = max|x|``.

    ``P(|t| = 1) = |x| / s`` and ``t`` takes x's sign, so it is unbiased. (The
    paper's optional 2.5-sigma gradient clipping is not applied.) Ternary
    codes take 2 bits each: 0 -> 0, 1 -> +s, 2 -> -s; code 3 is invalid.

    Parts: ``scale`` float32[1], ``codes`` packed 4 per byte.
    Payload bytes: ``4 + ceil(n / 4)``.
    """

    codec_id = "terngrad"
    unbiased = True
    summary = "TernGrad: stochastic ternary {-s, 0, s}, s = max|x| (2 bits/element)"

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("scale", "codes")

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        x = flat(x)
        n, dev = x.numel(), x.device
        s = absmax(x)
        codes = new_buffer(n, torch.uint8, dev)
        if s > 0 and math.isfinite(s):
            g = Uniforms(ctx.stage_seed("terngrad"), dev)
            a, r = scratch(n, torch.float32, dev), scratch(n, torch.float32, dev)
            ib = scratch(n, torch.int32, dev)
            keep, neg = scratch(n, torch.bool, dev), scratch(n, torch.bool, dev)
            inv = 1.0 / s
            for i, j in chunks(n, dev):
                m = j - i
                torch.abs(x[i:j], out=a[:m])
                a[:m].mul_(inv)
                torch.lt(g.uniform_(r[:m], ib), a[:m], out=keep[:m])
                torch.lt(x[i:j], 0, out=neg[:m])
                neg[:m].logical_and_(keep[:m])
                c = codes[i:j]
                c.copy_(keep[:m])
                c.add_(neg[:m])
        else:
            s = s if s == 0 else NAN
            codes.zero_()
        enc = Encoded({"scale": np.array([s], np.float32), "codes": pack_bits(to_numpy(codes), 2)})
        return recon_of(self, enc, ctx, dev)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        s = np.float32(scale_part(enc, "scale")[0])
        values = np.array([0, 1, -1], np.float32) * s  # 0 * NaN keeps a NaN scale NaN everywhere
        out = decode_table(need_part(enc, "codes", np.uint8), 2, ctx.numel, values)
        return from_numpy(out, ctx.shape)
