"""Vectorised bit packing, plus the chunked-kernel helpers the quantisers share.

Layout (every width): a little-endian bit stream. Code ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the stream, least significant bit first, and bit
``j`` of the stream is bit ``j % 8`` of byte ``j // 8``. ``n`` codes take
``packed_size(n, bits) = ceil(n * bits / 8)`` bytes; the unused high bits of the
last byte are zero, and :func:`unpack_bits` rejects a buffer where they are
not (so every packed buffer has exactly one valid form). Width 1 is exactly
``np.packbits(..., bitorder="little")``.

Widths 1, 2, 4 and 8 have dedicated fast paths; 3, 5, 6 and 7 merge codes
pairwise in place (SWAR: 2 per uint16, 4 per uint32, 8 per uint64 = ``bits``
bytes), about 2.5x slower per code, still vectorised.

Chunking: large arrays are processed in chunks of :data:`CHUNK` elements so
the temporaries stay in cache and are allocated once (the loops run over
chunks, never over elements). On a non-CPU device :func:`chunks` yields one
chunk: there, per-kernel launch cost dominates instead.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from hpcfl.codecs.base import PartError

__all__ = ["CHUNK", "packed_size", "pack_bits", "unpack_bits", "pack_signs", "unpack_signs",
           "decode_table", "chunks", "new_buffer", "scratch", "flat", "absmax", "l2norm", "l1norm",
           "Uniforms"]

CHUNK = 1 << 17  # elements per chunk (a multiple of 64)


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits."""
    return (int(n) * int(bits) + 7) // 8


def _check_packed(buf: np.ndarray, n: int, bits: int, part: str) -> None:
    """A received packed part: 1-D uint8, exactly ``packed_size`` bytes, zero padding bits."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise PartError(part, "expected a 1-D uint8 array")
    need = packed_size(n, bits)
    if buf.size != need:
        raise PartError(part, f"{buf.size} bytes but {need} expected for {n} codes of {bits} bits")
    used = (n * bits) % 8
    if used and int(buf[-1]) >> used:
        raise PartError(part, "non-zero padding bits after the last code")


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    return bits


# ------------------------------------------------------------------ packing

def _pack_group(c: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``c`` (uint8, length a multiple of 8) into ``len(c) * bits / 8`` bytes."""
    if bits == 2:
        v = c.view(np.uint32)
        r = v & 0x03
        r |= (v >> 6) & 0x0C
        r |= (v >> 12) & 0x30
        r |= (v >> 18) & 0xC0
        return r.astype(np.uint8)
    if bits == 4:
        v = c.view(np.uint16)
        r = v & 0x0F
        r |= (v >> 4) & 0xF0
        return r.astype(np.uint8)
    # general width, SWAR in three doubling steps (the chunk is a private copy):
    # 2 codes per uint16 -> 4 per uint32 -> 8 per uint64, then keep `bits` bytes.
    c = c.copy()
    width = bits
    for wt, half in ((np.uint16, 8), (np.uint32, 16), (np.uint64, 32)):
        w = c.view(wt)
        m = wt((1 << width) - 1)
        t = w >> wt(half - width)
        t &= m << wt(width)
        w &= m
        w |= t
        width *= 2
    return c.reshape(-1, 8)[:, :bits].reshape(-1)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 ``codes`` (each ``< 2**bits``) into ``packed_size(n, bits)`` bytes.

    Only the low ``bits`` bits of each code are kept (for ``bits == 1``: any
    non-zero code packs as 1). Width 8 returns ``codes`` itself.
    """
    bits = _check_bits(bits)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return codes
    if bits == 1:
        return np.packbits(codes, bitorder="little")
    n = codes.size
    out = np.empty(packed_size(n, bits), np.uint8)
    body = n - n % 8
    for i in range(0, body, CHUNK):
        j = min(body, i + CHUNK)
        out[i * bits // 8:j * bits // 8] = _pack_group(codes[i:j], bits)
    if body < n:
        tail = np.zeros(8, np.uint8)
        tail[:n - body] = codes[body:]
        tail &= (1 << bits) - 1
        start = body * bits // 8
        out[start:] = _pack_group(tail, bits)[:out.size - start]
    return out


# The byte -> codes tables of the fast unpack paths.
_BYTES = np.arange(256, dtype=np.uint32)
_LUT2 = ((_BYTES & 3) | ((_BYTES >> 2 & 3) << 8) | ((_BYTES >> 4 & 3) << 16)
         | ((_BYTES >> 6) << 24)).astype("<u4")
_LUT4 = ((_BYTES & 15) | ((_BYTES >> 4) << 8)).astype("<u2")


def _unpack_group(b: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_group`: ``b`` holds a whole number of 8-code groups."""
    if bits == 2:
        return np.take(_LUT2, b).view(np.uint8)
    if bits == 4:
        return np.take(_LUT4, b).view(np.uint8)
    m = b.size // bits
    c = np.zeros((m, 8), np.uint8)
    c[:, :bits] = b.reshape(m, bits)
    c = c.reshape(-1)
    width = 4 * bits
    for wt, half in ((np.uint64, 32), (np.uint32, 16), (np.uint16, 8)):
        w = c.view(wt)
        mk = wt((1 << width) - 1)
        t = w << wt(half - width)
        t &= mk << wt(half)
        w &= mk
        w |= t
        width //= 2
    return c


def unpack_bits(buf: np.ndarray, bits: int, n: int, part: str = "codes") -> np.ndarray:
    """Unpack ``n`` codes of ``bits`` bits from ``buf`` (uint8) into a uint8 array.

    Raises :class:`PartError` (naming ``part``) unless ``buf`` is a uint8 array
    of exactly ``packed_size(n, bits)`` bytes whose padding bits are zero.
    Width 8 returns ``buf`` itself.
    """
    bits = _check_bits(bits)
    n = int(n)
    _check_packed(buf, n, bits, part)
    if bits == 8:
        return buf
    if bits == 1:
        return np.unpackbits(buf, count=n, bitorder="little")
    out = np.empty(n, np.uint8)
    body = n - n % 8
    for i in range(0, body, CHUNK):
        j = min(body, i + CHUNK)
        out[i:j] = _unpack_group(buf[i * bits // 8:j * bits // 8], bits)
    if body < n:
        tail = np.zeros(bits, np.uint8)
        rest = buf[body * bits // 8:]
        tail[:rest.size] = rest
        out[body:] = _unpack_group(tail, bits)[:n - body]
    return out


# -------------------------------------------------------------------- signs

def pack_signs(x: torch.Tensor) -> np.ndarray:
    """One bit per element, 1 where ``x < 0`` (so 0, -0.0 and NaN pack as 0)."""
    neg = torch.lt(x.reshape(-1), 0)
    return np.packbits(neg.cpu().numpy(), bitorder="little")


def unpack_signs(buf: np.ndarray, n: int, part: str = "signs") -> np.ndarray:
    """uint8 0/1 per element (1 = negative); validates like :func:`unpack_bits`."""
    return unpack_bits(buf, 1, n, part)


def _byte_codes(bits: int) -> np.ndarray:
    """(256, 8 // bits) table: the codes packed in each possible byte."""
    t = _BYTE_CODES.get(bits)
    if t is None:
        t = _BYTE_CODES[bits] = _unpack_group(np.repeat(np.arange(256, dtype=np.uint8), bits), bits
                                              ).reshape(256, 8)[:, :8 // bits].copy()
    return t


_BYTE_CODES: dict[int, np.ndarray] = {}


def decode_table(buf: np.ndarray, bits: int, n: int, values: np.ndarray, part: str = "codes") -> np.ndarray:
    """Map ``n`` packed codes to ``values[code]`` (float32), validating everything.

    ``bits`` is 1, 2, 4 or 8. Raises :class:`PartError` if ``buf`` has the wrong
    dtype/size/padding or holds a code ``>= len(values)``. For widths below 8
    this is one table lookup per *byte* (8, 4 or 2 floats at a time).
    """
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    nv = values.size
    if bits == 8:
        codes = unpack_bits(buf, 8, n, part)
        if nv < 256 and n and int(codes.max()) >= nv:
            raise PartError(part, f"code {int(codes.max())} out of range (at most {nv - 1})")
        out = new_buffer(n, torch.float32, torch.device("cpu"))
        table = torch.from_numpy(values)
        idx = torch.empty(min(n, CHUNK), dtype=torch.int64)
        for i, j in chunks(n, torch.device("cpu")):
            ix = idx[:j - i]
            ix.numpy()[:] = codes[i:j]  # via numpy: `codes` may be a read-only wire buffer
            torch.index_select(table, 0, ix, out=out[i:j])
        return out.numpy()
    if bits not in (1, 2, 4):
        raise ValueError(f"decode_table supports widths 1, 2, 4 and 8, not {bits}")
    _check_packed(buf, n, bits, part)
    bc = _byte_codes(bits)
    if nv < (1 << bits):
        bad = (bc >= nv).any(axis=1)
        if np.take(bad, buf).any():
            raise PartError(part, f"a code is out of range (at most {nv - 1})")
    table = values[np.minimum(bc, nv - 1)]
    return np.take(table, buf, axis=0).reshape(-1)[:n]


# --------------------------------------------------------- kernel helpers

def chunks(n: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(n)``: CHUNK-sized on CPU, one range elsewhere."""
    step = CHUNK if device.type == "cpu" else max(1, n)
    for i in range(0, n, step):
        yield i, min(n, i + step)


def new_buffer(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D tensor. On CPU it is backed by numpy, whose large
    allocations use huge pages: much cheaper to fault in than torch's."""
    if device.type == "cpu":
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        return torch.from_numpy(np.empty(n, np_dtype))
    return torch.empty(n, dtype=dtype, device=device)


def scratch(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-chunk temporary."""
    return torch.empty(min(n, CHUNK) if device.type == "cpu" else n, dtype=dtype, device=device)


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous 1-D float32 tensor (a view when it already is one)."""
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def absmax(x: torch.Tensor) -> float:
    """max |x| (NaN if x holds NaN; 0 for an empty tensor) in one pass, no temporary."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return float(torch.maximum(-lo, hi))


_L2_TINY = 2.0 ** -50  # below this norm, float32 squares of the largest entries lose bits or vanish


def _sum64(x: torch.Tensor, square: bool) -> float:
    """sum(x**2) or sum(|x|) with float64 elements, chunk by chunk (the rare slow path)."""
    acc = 0.0
    for i, j in chunks(x.numel(), x.device):
        y = x[i:j].double()
        acc += float(torch.dot(y, y)) if square else float(y.abs_().sum())
    return acc


def l2norm(x: torch.Tensor) -> float:
    """||x||_2, accumulated per chunk in float64 (torch's one-shot float32 norm
    drifts by ~1e-3 relative on 16 M elements).

    The per-chunk dot runs in float32, whose squares overflow for ``||x||`` above
    ~1.8e19 and underflow to 0 for entries below ~1e-19; a result that is inf
    (with finite entries) or below 2^-50 is redone with float64 squares.
    """
    acc = 0.0
    for i, j in chunks(x.numel(), x.device):
        acc += float(torch.dot(x[i:j], x[i:j]))
    r = math.sqrt(acc)
    if (math.isinf(r) or r < _L2_TINY) and x.numel() and math.isfinite(absmax(x)):
        r = math.sqrt(_sum64(x, square=True))
    return r


def l1norm(x: torch.Tensor) -> float:
    """||x||_1, accumulated per chunk in float64, through one chunk-sized temporary.

    A float32 chunk sum that overflows (finite entries summing past 3.4e38) is
    redone in float64.
    """
    acc, buf = 0.0, scratch(x.numel(), torch.float32, x.device)
    for i, j in chunks(x.numel(), x.device):
        acc += float(torch.abs(x[i:j], out=buf[:j - i]).sum())
    if math.isinf(acc) and math.isfinite(absmax(x)):
        acc = _sum64(x, square=False)
    return acc


class Uniforms:
    """Random numbers for stochastic rounding, reproducible from one derived seed.

    On CPU: numpy's PCG64 (``np.random.Generator(PCG64(seed)).bit_generator``)
    raw words, about twice as fast as ``torch.rand``; elsewhere a
    ``torch.Generator`` on the device. Never the global RNGs. Draws are taken
    in order, so a fixed chunk size gives a fixed stream.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        if device.type == "cpu":
            self._gen = np.random.Generator(np.random.PCG64(int(seed)))
            self._bits = self._gen.bit_generator
        else:
            self._g = torch.Generator(device=device)
            self._g.manual_seed(int(seed))

    def ints_(self, out: torch.Tensor, nbits: int) -> torch.Tensor:
        """Fill int32 ``out`` with uniform integers in ``[0, 2**nbits)`` (1 <= nbits <= 31)."""
        m = out.numel()
        if self.device.type == "cpu":
            raw = torch.from_numpy(self._bits.random_raw((m + 1) // 2).view(np.int32)[:m])
            torch.bitwise_right_shift(raw, 32 - nbits, out=out)
            out.bitwise_and_((1 << nbits) - 1)
        else:
            torch.randint(0, 1 << nbits, (m,), generator=self._g, out=out)
        return out

    def uniform_(self, out: torch.Tensor, ibuf: torch.Tensor) -> torch.Tensor:
        """Fill float32 ``out`` with multiples of 2^-24 uniform in [0, 1), using int32 ``ibuf``."""
        out.copy_(self.ints_(ibuf[:out.numel()], 24))
        return out.mul_(2.0 ** -24)

    def float64(self, m: int) -> torch.Tensor:
        """``m`` float64 uniforms in [0, 1) (53-bit resolution) on the device."""
        if self.device.type == "cpu":
            return torch.from_numpy(self._gen.random(m))
        return torch.rand(m, dtype=torch.float64, generator=self._g, device=self.device)
