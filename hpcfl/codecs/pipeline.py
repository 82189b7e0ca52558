"""Composition: transforms -> one encoder -> byte codecs on the parts that benefit.

``{"id": "pipeline", "transforms": [...], "encoder": {...}, "bytes": [...]}``.
Decoding runs the chain in reverse (the zarr filters/compressor pattern). A
byte codec is applied to a part only when it makes the part smaller; the wire
records which one was used (``coding``), so the decoder never guesses.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcfl.codecs.base import Codec, CodecParam, Ctx, Encoded, PartError
from hpcfl.codecs.registry import register_codec
from hpcfl.errors import ConfigError

__all__ = ["Pipeline", "Transform", "Flatten", "Matrix"]


class Transform(Codec):
    """An invertible tensor -> tensor stage with no parts on the wire.

    Its parameters come from the config and derived seeds, so both sides can
    rebuild it without side information.
    """

    kind = "transform"
    lossless = True

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, ctx: Ctx) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x, ctx):
        raise TypeError(f"transform {self.codec_id!r} only runs inside a pipeline")

    decode = encode


@register_codec
class Flatten(Transform):
    """Reshape to 1-D."""

    codec_id = "flatten"
    summary = "reshape to a vector"

    def out_shape(self, shape):
        n = 1
        for s in shape:
            n *= s
        return (n,)

    def forward(self, x, ctx):
        return x.reshape(-1)

    def inverse(self, y, ctx):
        return y.reshape(ctx.shape)


@register_codec
class Matrix(Transform):
    """Reshape to 2-D (first dim x the rest), the PowerSGD/ATOMO view of conv kernels."""

    codec_id = "matrix"
    summary = "reshape to (dim0, rest); 1-D tensors become (n, 1)"

    def out_shape(self, shape):
        if len(shape) == 0:
            return (1, 1)
        rest = 1
        for s in shape[1:]:
            rest *= s
        return (shape[0], rest)

    def forward(self, x, ctx):
        return x.reshape(self.out_shape(tuple(x.shape)))

    def inverse(self, y, ctx):
        return y.reshape(ctx.shape)


@register_codec
class Pipeline(Codec):
    codec_id = "pipeline"
    kind = "pipeline"
    summary = "transforms -> encoder -> byte codecs"
    params = {
        "transforms": CodecParam("Transforms applied in order before the encoder.", default=[], many=True,
                                 required=False),
        "encoder": CodecParam("The encoder (or wrapper) producing parts."),
        "bytes": CodecParam("Byte codecs (zstd, lz4) for parts; each part takes the first that lists it.",
                            default=[], many=True, required=False),
    }

    def _check(self, key: str) -> None:
        for i, t in enumerate(self.transforms):
            if t.kind != "transform":
                raise ConfigError(f"{key}.transforms[{i}]", f"{t.codec_id!r} is not a transform")
        if self.encoder.kind in ("transform", "bytes"):
            raise ConfigError(f"{key}.encoder", f"{self.encoder.codec_id!r} is a {self.encoder.kind} stage, "
                              "not an encoder")
        if len(self.bytes) > 254:
            raise ConfigError(f"{key}.bytes", "at most 254 byte codecs")
        self._coding_of: dict[str, int] = {}
        names = self.encoder.part_names
        default = getattr(self.encoder, "compressible_parts", names)
        for j, b in enumerate(self.bytes, start=1):
            if b.kind != "bytes":
                raise ConfigError(f"{key}.bytes[{j - 1}]", f"{b.codec_id!r} is not a byte codec")
            for p in (b.parts or default):
                if p not in names:
                    raise ConfigError(f"{key}.bytes[{j - 1}].parts", f"{p!r} is not a part of "
                                      f"{self.encoder.codec_id!r} (parts: {', '.join(names)})")
                self._coding_of.setdefault(p, j)

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        return self.encoder.lossless

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return self.encoder.unbiased

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.encoder.stateful

    @property
    def decoder_state(self) -> bool:  # type: ignore[override]
        return self.encoder.decoder_state

    @property
    def part_names(self) -> tuple[str, ...]:
        return self.encoder.part_names

    @property
    def needs_global(self) -> bool:  # type: ignore[override]
        return self.encoder.needs_global or any(t.needs_global for t in self.transforms)

    @property
    def side_inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(x for t in (*self.transforms, self.encoder) for x in t.side_inputs))

    def downlink_bytes(self, n_params: int, round: int, last_round: int) -> int | None:
        return self.encoder.downlink_bytes(n_params, round, last_round)

    @property
    def required_scope(self) -> str | None:  # type: ignore[override]
        return self.encoder.required_scope

    def _shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes = [shape]
        for t in self.transforms:
            shapes.append(t.out_shape(shapes[-1]))
        return shapes

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        shapes = self._shapes(ctx.shape)
        y = x
        for i, t in enumerate(self.transforms):
            y = t.forward(y, ctx.child(f"t{i}", shape=shapes[i]))
        enc = self.encoder.encode(y, ctx.child("enc", shape=shapes[-1]))
        if enc.recon is not None and self.transforms:
            r = enc.recon
            for i in reversed(range(len(self.transforms))):
                r = self.transforms[i].inverse(r, ctx.child(f"t{i}", shape=shapes[i]))
            enc.recon = r
        for name, j in self._coding_of.items():
            a = enc.parts.get(name)
            if a is None or name in enc.coding:
                continue
            c = self.bytes[j - 1].compress(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            if c.nbytes < a.nbytes:  # only where it pays
                enc.parts[name] = c
                enc.coding[name] = (j, a.dtype)
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        shapes = self._shapes(ctx.shape)
        if enc.coding:
            bound = 8 * max(1, ctx.numel) + 1024
            parts = dict(enc.parts)
            for name, (j, dtype) in enc.coding.items():
                if self._coding_of.get(name) != j:
                    raise PartError(name, f"coded with byte codec {j}, but this pipeline codes it with "
                                    f"{self._coding_of.get(name, 0)}")
                raw = self.bytes[j - 1].decompress(parts[name], bound)
                dtype = np.dtype(dtype)
                if raw.size % dtype.itemsize:
                    raise PartError(name, f"{raw.size} decoded bytes are not a whole number of {dtype}")
                parts[name] = raw.view(dtype)
            enc = Encoded(parts, enc.flags, stats=enc.stats)
        y = self.encoder.decode(enc, ctx.child("enc", shape=shapes[-1]))
        for i in reversed(range(len(self.transforms))):
            y = self.transforms[i].inverse(y, ctx.child(f"t{i}", shape=shapes[i]))
        return y
