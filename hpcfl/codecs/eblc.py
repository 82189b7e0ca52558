"""Error-bounded lossy compression (EBLC): SZ3 (``pysz``) and ZFP (``zfpy``) as codecs.

The guarantee, on every lossy tensor, always: ``max |x - x_hat| <= eb``, the
float32 bound sent in ``meta``. ``mode = "rel"``: ``eb = eps * (max x - min x)``
(SZ3's REL, computed here and rounded *down* to float32); ``"abs"``: ``eb = eps``.
The compressors run in ABS mode on the flattened tensor (as APPFL does). The
encoder runs the exact decoder on its own stream (it needs the reconstruction
anyway) and sends every element left outside the bound (float rounding, the
library's own slips) as an exception: index and exact value.

Untrusted streams: ``meta[0]`` is a CRC32 of the stream, checked before a C
decoder sees it (4 B per tensor). It stops corruption, not a crafted message:
pysz raised or decoded to the right shape on every malformed SZ3 stream we
fuzzed, and ZFP is memory-safe for any bytes (headerless stream, our shape and
tolerance, decoded from a zero-padded buffer longer than zfp's unchecked bit
reader can reach).

Parts, lossy (flags 0): ``meta`` uint32[2 + k] (CRC32, eb, k float32 words of
the caller's), ``stream`` uint8, and if needed ``exc_idx`` uint32 (increasing)
with ``exc_val`` float32. Raw (flags 1): ``values`` float32[n], for empty,
non-finite or constant tensors and whenever lossy is not smaller.
Payload bytes: ``8 + len(stream) + 8 * exceptions`` or ``4n``.
Stats: ``ratio`` (4n / payload), ``eb``, ``max_err_over_eb``, ``exceptions``.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.registry import register_codec

__all__ = ["SZ3", "ZFP", "ErrorBoundViolation", "abs_bound", "usable", "BACKENDS", "Coded", "encode_lossy",
           "decode_lossy", "raw_coded", "meta_words", "check_parts", "bound_stats", "verify_bound", "FLAG_RAW"]

FLAG_RAW = 1
_TINY, _MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


class ErrorBoundViolation(RuntimeError):
    """``verify = true`` found an element outside the bound (a bug: exceptions should prevent it)."""


def abs_bound(a: np.ndarray, mode: str, eps: float) -> float:
    """The bound as a float32 value, never above ``eps`` (abs) or ``eps * range`` (rel); 0 or inf: none."""
    if a.size == 0:
        return 0.0
    eb = eps if mode == "abs" else eps * (float(a.max()) - float(a.min()))
    if not eb <= _MAX:
        return math.inf
    e32 = np.float32(eb)
    if float(e32) > eb:
        e32 = np.nextafter(e32, np.float32(0))
    return float(e32)


def usable(eb: float) -> bool:
    return math.isfinite(eb) and eb >= _TINY


class _SZ3:
    """SZ3 (pysz), ABS mode, default algorithm (interpolation + Lorenzo), single-threaded."""

    def compress(self, r: np.ndarray, eb: float) -> np.ndarray:
        from pysz import sz, szConfig, szErrorBoundMode

        cfg = szConfig()
        cfg.errorBoundMode = szErrorBoundMode.ABS
        cfg.absErrorBound = eb
        c, _ = sz.compress(np.ascontiguousarray(r, dtype=np.float32), cfg)
        return np.array(c, dtype=np.uint8)  # copy: c is a view of the size-bound buffer

    @functools.cached_property
    def prefix(self) -> bytes:  # SZ3's magic and version: the first 8 bytes of every stream of this build
        return bytes(self.compress(np.zeros(4, np.float32), 1.0)[:8])

    def decompress(self, s: np.ndarray, n: int, eb: float) -> np.ndarray:
        from pysz import sz

        if s.size < 16 or bytes(s[:8]) != self.prefix:
            raise PartError("stream", "not an SZ3 stream of this build (magic/version)")
        if int(s[8:16].view("<u8")[0]) > s.size - 16:
            raise PartError("stream", "SZ3 header declares more payload than the stream holds")
        try:
            y, cfg = sz.decompress(s, np.float32, (n,))
        except (ValueError, IndexError, RuntimeError, TypeError, MemoryError) as e:
            raise PartError("stream", f"SZ3: {e}") from None
        if cfg.errorBoundMode != 0 or cfg.absErrorBound != eb:
            raise PartError("stream", f"SZ3 stream bound {cfg.absErrorBound!r} (mode {cfg.errorBoundMode}) "
                            f"is not the sent bound {eb!r}")
        return _owned(y)


def _owned(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    return y if y.flags.writeable else y.copy()  # fresh arrays from the C decoders, never shared


class _ZFP:
    """ZFP (zfpy) fixed-accuracy mode, headerless 1-D stream (shape and tolerance come from us)."""

    BITS_PER_BLOCK = 297  # most bits zfp's decoder can read per 1-D float block: 1 + 8 + 32 planes * (2*4+1)

    def compress(self, r: np.ndarray, eb: float) -> np.ndarray:
        import zfpy

        b = zfpy.compress_numpy(np.ascontiguousarray(r, dtype=np.float32), tolerance=eb, write_header=False)
        return np.frombuffer(b, dtype=np.uint8).copy()

    def decompress(self, s: np.ndarray, n: int, eb: float) -> np.ndarray:
        import zfpy

        if s.size % 8:
            raise PartError("stream", f"{s.size} bytes: a zfp stream is whole 64-bit words")
        reach = 8 * (((n + 3) // 4 * self.BITS_PER_BLOCK + 63) // 64) + 16  # > 4n >= any accepted stream
        buf = np.zeros(reach, dtype=np.uint8)  # calloc: untouched pages cost nothing
        buf[:s.size] = s
        try:
            y = zfpy._decompress(buf, zfpy.type_float, [n], tolerance=eb)
        except (ValueError, RuntimeError, TypeError, MemoryError) as e:
            raise PartError("stream", f"zfp: {e}") from None
        return _owned(y)


BACKENDS = {"sz3": _SZ3(), "zfp": _ZFP()}


@dataclass
class Coded:
    """Parts, flags and the reconstruction (float32, flat, owned) of one tensor."""

    parts: dict[str, np.ndarray]
    flags: int
    recon: np.ndarray
    eb: float = math.nan
    exceptions: int = 0


def raw_coded(x: np.ndarray) -> Coded:
    return Coded({"values": x}, FLAG_RAW, x.copy())


def encode_lossy(x: np.ndarray, base: np.ndarray | None, eb: float, backend: str,
                 extra: tuple[float, ...] = ()) -> Coded | None:
    """Code ``x - base`` under ``eb``, exceptions restoring the bound on ``base + decoded``; ``extra``
    float32 words go into ``meta``. None when the residual is not finite (the caller falls back)."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = x if base is None else x - base
        if not np.isfinite(r).all():
            return None
        be = BACKENDS[backend]
        stream = be.compress(r, eb)
        meta = np.empty(2 + len(extra), dtype=np.uint32)
        meta[0] = zlib.crc32(stream)
        meta[1:] = np.array((eb, *extra), dtype=np.float32).view(np.uint32)
        xhat = be.decompress(stream, x.size, eb)  # the exact decoder, on our own stream
        xhat = xhat if base is None else base + xhat
        idx = np.flatnonzero(~(np.abs(x - xhat) < np.float32(eb)))  # candidates (NaN, inf too), then exact
        if idx.size:
            idx = idx[~(np.abs(x[idx].astype(np.float64) - xhat[idx].astype(np.float64)) <= eb)]
    parts = {"meta": meta, "stream": stream}
    if idx.size:
        parts["exc_idx"] = idx.astype(np.uint32)
        parts["exc_val"] = x[idx]
        xhat[idx] = x[idx]
    return Coded(parts, 0, xhat, eb, int(idx.size))


def check_parts(enc: Encoded, allowed: set[str]) -> None:
    extra = set(enc.parts) - allowed
    if extra:
        raise PartError(sorted(extra)[0], "not a part of this message form")


def meta_words(enc: Encoded, n_extra: int) -> tuple[float, np.ndarray]:
    """The bound and the ``n_extra`` float32 side-information words of ``meta``."""
    meta = need_part(enc, "meta", np.uint32, 2 + n_extra)
    eb = float(meta[1:2].view(np.float32)[0])
    if not usable(eb):
        raise PartError("meta", f"error bound {eb!r} is not a positive finite float32")
    return eb, meta[2:].view(np.float32)


def decode_lossy(enc: Encoded, n: int, base: np.ndarray | None, backend: str, n_extra: int = 0,
                 also: tuple[str, ...] = ()) -> np.ndarray:
    """Validate and decode a lossy message (parts ``also`` are the caller's) to ``base + residual``."""
    check_parts(enc, {"meta", "stream", "exc_idx", "exc_val", *also})
    be = BACKENDS[backend]
    eb, _ = meta_words(enc, n_extra)
    meta = enc.parts["meta"]
    stream = need_part(enc, "stream", np.uint8, min_size=1, max_size=4 * n)  # larger goes raw
    if zlib.crc32(stream) != int(meta[0]):
        raise PartError("stream", "CRC32 mismatch: the compressed stream is corrupt")
    xhat = be.decompress(stream, n, eb)
    with np.errstate(over="ignore", invalid="ignore"):
        xhat = xhat if base is None else base + xhat
    if "exc_idx" in enc.parts or "exc_val" in enc.parts:
        idx = need_part(enc, "exc_idx", np.uint32, min_size=1, max_size=n)
        val = need_part(enc, "exc_val", np.float32, idx.size)
        if idx[-1] >= n or (idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise PartError("exc_idx", "indices must be strictly increasing and below numel")
        if not np.isfinite(val).all():
            raise PartError("exc_val", "non-finite exception value")
        xhat[idx] = val
    if not np.isfinite(xhat).all():
        raise PartError("stream", "decodes to non-finite values (the encoder only codes finite tensors)")
    return xhat


def _max_err(x: np.ndarray, recon: np.ndarray) -> float:
    return float(np.max(np.abs(x.astype(np.float64) - recon))) if x.size else 0.0


def bound_stats(x: np.ndarray, c: Coded) -> dict[str, float]:
    """Per-tensor diagnostics: ratio, eb, max|x - x_hat| / eb, exception count."""
    payload = sum(a.nbytes for a in c.parts.values())
    st = {"ratio": 4.0 * x.size / payload if payload else math.nan, "eb": c.eb, "exceptions": float(c.exceptions)}
    if not c.flags & FLAG_RAW:
        st["max_err_over_eb"] = _max_err(x, c.recon) / c.eb
    return st


def verify_bound(name: str, x: np.ndarray, recon: np.ndarray, eb: float, raw: bool) -> None:
    """Raise :class:`ErrorBoundViolation` if ``recon`` leaves the bound (raw: is not exact)."""
    err = _max_err(x, recon)
    if err > (0.0 if raw else eb) or (raw and not np.array_equal(x.view(np.uint32), recon.view(np.uint32))):
        raise ErrorBoundViolation(f"tensor {name!r}: max |x - x_hat| = {err!r} exceeds the bound {eb!r}")


class _EBLC(Codec):
    """SZ3 or ZFP on the flattened tensor under an absolute or relative bound (module doc)."""

    backend = ""
    params = {
        "mode": Param(str, "rel", "rel: eb = eps * (max - min) of the tensor (SZ3's REL); abs: eb = eps.",
                      choices=("rel", "abs")),
        "eps": Param(float, 1e-3, "The error bound (relative to the value range, or absolute).",
                     min=0.0, min_open=True),
        "verify": Param(bool, False, "Run the decoder on every message at encode time and raise if an "
                                     "element leaves the bound (run-time check mode)."),
    }
    compressible_parts = ()

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("meta", "stream", "exc_idx", "exc_val", "values")

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        a = to_numpy(x.float()).reshape(-1)
        eb = abs_bound(a, self.mode, self.eps) if np.isfinite(a).all() else math.nan
        c = encode_lossy(a, None, eb, self.backend) if usable(eb) else None
        if c is None or sum(p.nbytes for p in c.parts.values()) >= a.nbytes:
            c = raw_coded(a)
        enc = Encoded(c.parts, c.flags, stats=bound_stats(a, c))
        if self.verify:
            dec = to_numpy(self.decode(Encoded(dict(c.parts), c.flags), ctx)).reshape(-1)
            verify_bound(ctx.name, a, dec, c.eb, bool(c.flags & FLAG_RAW))
        if ctx.want_recon:
            enc.recon = from_numpy(c.recon, ctx.shape, x.device)
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        if enc.coding:
            raise PartError(next(iter(enc.coding)), "byte-coded parts are not part of this codec's format")
        if enc.flags == FLAG_RAW:
            check_parts(enc, {"values"})
            return from_numpy(need_part(enc, "values", np.float32, ctx.numel), ctx.shape)
        if enc.flags != 0:
            raise PartError("flags", f"unknown flags {enc.flags}")
        if ctx.numel == 0:
            raise PartError("stream", "an empty tensor is always sent raw")
        return from_numpy(decode_lossy(enc, ctx.numel, None, self.backend), ctx.shape)


@register_codec
class SZ3(_EBLC):
    """SZ3 (pysz) under an ABS or REL bound, guaranteed by exceptions. Payload: module doc."""

    codec_id = "sz3"
    backend = "sz3"
    summary = "SZ3 error-bounded lossy compression (pysz), ABS or REL bound, guaranteed with exceptions"


@register_codec
class ZFP(_EBLC):
    """ZFP (zfpy) fixed-accuracy mode, tolerance = the bound, guaranteed by exceptions. Payload: module doc."""

    codec_id = "zfp"
    backend = "zfp"
    summary = "ZFP fixed-accuracy lossy compression (zfpy), ABS or REL bound, guaranteed with exceptions"
