"""Dense codecs: identity (float32), fp16, bf16, and the lossless byte codecs.

The byte codecs (zstd, lz4) work two ways: inside a pipeline they compress
named parts (``bytes = [{id = "zstd", parts = ["indices"]}]``); on their own
they are lossless codecs for the raw float32 bytes of a tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.registry import register_codec

__all__ = ["Identity", "FP16", "BF16", "ByteCodec", "Zstd", "LZ4"]

FP16_MAX = 65504.0


@register_codec
class Identity(Codec):
    """Uncompressed float32: 4 bytes per element."""

    codec_id = "identity"
    lossless = True
    unbiased = True
    summary = "uncompressed float32 (4 B/element)"

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("values",)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        v = to_numpy(x.float()).reshape(-1)
        return Encoded({"values": v}, recon=x.float() if ctx.want_recon else None)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        return from_numpy(need_part(enc, "values", np.float32, ctx.numel), ctx.shape)


@register_codec
class FP16(Codec):
    """IEEE half precision (2 B/element); values beyond +-65504 saturate instead of becoming inf."""

    codec_id = "fp16"
    summary = "float16 cast, saturating at +-65504 (2 B/element)"

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("values",)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        # cast first, then saturate the half-size result in place: clamping the float32
        # input first would write a full float32 temporary (8x slower at 16 M elements)
        h = x.to(torch.float16).clamp_(-FP16_MAX, FP16_MAX)
        enc = Encoded({"values": to_numpy(h).reshape(-1)})
        if ctx.want_recon:
            enc.recon = h.float()
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        return from_numpy(need_part(enc, "values", np.float16, ctx.numel), ctx.shape).float()


@register_codec
class BF16(Codec):
    """bfloat16 (2 B/element): float32's range, 8 bits of mantissa; round to nearest even."""

    codec_id = "bf16"
    summary = "bfloat16 cast (2 B/element)"

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("values",)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        b = x.float().to(torch.bfloat16)
        enc = Encoded({"values": to_numpy(b.view(torch.int16)).view(np.uint16).reshape(-1)})
        if ctx.want_recon:
            enc.recon = b.float()
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        bits = need_part(enc, "values", np.uint16, ctx.numel)
        return from_numpy(bits.view(np.int16), ctx.shape).view(torch.bfloat16).float()


class ByteCodec(Codec):
    """Lossless bytes -> bytes. Subclasses implement compress/decompress."""

    kind = "bytes"
    lossless = True
    unbiased = True
    params = {
        "parts": Param(list, [], "Inside a pipeline: part names to code (empty: the encoder's "
                                 "compressible parts).", item_type=str),
    }

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("data",)

    def compress(self, b: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def decompress(self, b: np.ndarray, max_size: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        raw = to_numpy(x.float()).reshape(-1).view(np.uint8)
        return Encoded({"data": self.compress(raw)}, recon=x.float() if ctx.want_recon else None)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        data = need_part(enc, "data", np.uint8)
        raw = self.decompress(data, 4 * ctx.numel)
        if raw.size != 4 * ctx.numel:
            raise PartError("data", f"decompressed to {raw.size} bytes, expected {4 * ctx.numel}")
        return from_numpy(raw.view(np.float32), ctx.shape)


@register_codec
class Zstd(ByteCodec):
    """Zstandard (entropy coder + LZ), lossless."""

    codec_id = "zstd"
    summary = "lossless Zstandard on raw bytes"
    params = {
        **ByteCodec.params,
        "level": Param(int, 3, "Compression level.", min=-7, max=22),
    }

    def compress(self, b: np.ndarray) -> np.ndarray:
        import zstandard

        c = getattr(self, "_c", None)
        if c is None:
            c = self._c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return np.frombuffer(c.compress(memoryview(b)), dtype=np.uint8)

    def decompress(self, b: np.ndarray, max_size: int) -> np.ndarray:
        import zstandard

        try:
            size = zstandard.frame_content_size(memoryview(b))
        except zstandard.ZstdError as e:
            raise PartError("zstd", f"not a zstd frame: {e}") from None
        if size < 0 or size > max_size:
            raise PartError("zstd", f"frame declares {size} bytes; at most {max_size} allowed")
        try:
            out = zstandard.ZstdDecompressor().decompress(memoryview(b), max_output_size=max_size)
        except zstandard.ZstdError as e:
            raise PartError("zstd", f"corrupt zstd frame: {e}") from None
        return np.frombuffer(out, dtype=np.uint8)


@register_codec
class LZ4(ByteCodec):
    """LZ4 frame, lossless; fast, lower ratio than zstd."""

    codec_id = "lz4"
    summary = "lossless LZ4 on raw bytes"
    params = {
        **ByteCodec.params,
        "level": Param(int, 0, "Compression level (0 = fast mode).", min=0, max=16),
    }

    def compress(self, b: np.ndarray) -> np.ndarray:
        import lz4.frame

        return np.frombuffer(lz4.frame.compress(memoryview(b), compression_level=self.level,
                                                store_size=True), dtype=np.uint8)

    def decompress(self, b: np.ndarray, max_size: int) -> np.ndarray:
        import lz4.frame

        d = lz4.frame.LZ4FrameDecompressor()
        try:
            out = d.decompress(memoryview(b), max_length=max_size)
        except RuntimeError as e:
            raise PartError("lz4", f"corrupt lz4 frame: {e}") from None
        if not d.eof or d.unused_data:
            raise PartError("lz4", f"frame does not end within {max_size} bytes of output")
        return np.frombuffer(out, dtype=np.uint8)
