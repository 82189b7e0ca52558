"""Codec base classes: the contract every compression stage follows.

A codec turns one tensor into named *parts* (1-D numpy arrays: values, indices,
scales, packed bits, ...) and back. Stages are immutable and shared by all
clients: public attributes are configuration, and per-(client, tensor) state
lives outside the codec, in the dicts that :class:`Ctx` hands in.

Two kinds of state (design.md §D):

* ``ctx.state``  -- encoder-private state (client only), e.g. the error-feedback
  residual or PowerSGD's warm-start Q.
* ``ctx.shared`` -- state both sides keep in lockstep, e.g. LBGM's look-back
  gradient. It may only be updated from what the receiver reconstructs, so an
  encoder that owns shared state updates it in :meth:`Codec.encode` exactly as
  :meth:`Codec.decode` does on the root (closed loop).

``encode`` returns an :class:`Encoded`; when ``ctx.want_recon`` is set it also
carries ``recon``, the tensor the receiver will decode. Wrappers (error
feedback, look-back) set ``want_recon`` on their inner codec.

Parts and ``recon`` may be zero-copy views of the input, but a codec must never
keep a reference to its input in state: callers reuse their buffers (error
feedback overwrites its compensated input with the new residual once it has
copied out any part that aliases it).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from hpcfl.config.schema import Field
from hpcfl.errors import ConfigError, WireFormatError
from hpcfl.seeding import derive_seed

__all__ = ["Codec", "Ctx", "Encoded", "Param", "CodecParam", "PartError"]

Param = Field  # a codec parameter is declared like a job key


@dataclass(frozen=True)
class CodecParam:
    """A parameter whose value is a nested codec config (or a list of them)."""

    doc: str
    default: Any = None
    many: bool = False  # a list of codec configs
    required: bool = True


class PartError(WireFormatError):
    """A decoded part has the wrong size or content for its codec."""

    def __init__(self, part: str, message: str):
        super().__init__(f"part {part!r}", -1, message)


@dataclass
class Encoded:
    """What a codec produces for one tensor.

    ``parts`` maps part names (declared in ``Codec.part_names``) to 1-D numpy
    arrays; ``coding`` marks parts that a byte codec turned into ``uint8`` bytes
    (name -> (coding id, logical dtype)); ``flags`` carries variant bits (e.g.
    LBGM's scalar-only path) in the message's table of contents.
    """

    parts: dict[str, np.ndarray]
    flags: int = 0
    recon: torch.Tensor | None = None
    coding: dict[str, tuple[int, np.dtype]] = field(default_factory=dict)
    # per-tensor diagnostics measured on the client (e.g. LBGM's "recycled", an energy
    # share); logged to the run file's /codec_stats table, never sent on the wire
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.parts.values()))


class Ctx:
    """Everything a codec may know about the tensor it is coding.

    The state dicts are shared with the caller: a codec mutates
    ``ctx.state``/``ctx.shared`` in place. ``child(key)`` gives a wrapped codec
    its own namespace under the same per-tensor dicts.
    """

    __slots__ = ("name", "shape", "dtype", "seed", "job_seed", "round", "client", "want_recon",
                 "side", "glob", "path", "_enc", "_shared")

    def __init__(self, name: str, shape: tuple[int, ...], *, seed: int = 0, round: int = 0,
                 client: int = 0, dtype: torch.dtype = torch.float32, want_recon: bool = False,
                 enc_state: dict | None = None, shared_state: dict | None = None,
                 side: dict | None = None, path: str = "", job_seed: int = 0, glob: dict | None = None):
        self.name = name
        # Round-wide facts both sides know, for codecs with needs_global: "theta" (this
        # slot of the global model the clients trained from) and "delta" (its last
        # server step, None in round 0).
        self.glob = glob if glob is not None else {}
        self.job_seed = job_seed  # constant across rounds: for state that must not change per round
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.seed = seed
        self.round = round
        self.client = client
        self.want_recon = want_recon
        self.side = side if side is not None else {}
        self.path = path
        self._enc = enc_state if enc_state is not None else {}
        self._shared = shared_state if shared_state is not None else {}

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def state(self) -> dict:
        """This stage's encoder-private state (created empty on first use)."""
        return self._enc.setdefault(self.path, {})

    @property
    def shared(self) -> dict:
        """This stage's state mirrored on both sides."""
        return self._shared.setdefault(self.path, {})

    def stage_seed(self, *keys: int | str) -> int:
        """A seed unique to (job seed, round, client, tensor, stage path, *keys)."""
        return derive_seed(self.seed, self.path, *keys)

    def static_seed(self, *keys: int | str) -> int:
        """A seed unique to (job seed, client, tensor, stage path, *keys), the same every round."""
        return derive_seed(self.job_seed, "static", self.client, self.name, self.path, *keys)

    def child(self, key: str, *, shape: tuple[int, ...] | None = None,
              want_recon: bool | None = None) -> "Ctx":
        return Ctx(self.name, self.shape if shape is None else shape, seed=self.seed, round=self.round,
                   client=self.client, dtype=self.dtype,
                   want_recon=self.want_recon if want_recon is None else want_recon,
                   enc_state=self._enc, shared_state=self._shared, side=self.side,
                   path=f"{self.path}/{key}" if self.path else key, job_seed=self.job_seed, glob=self.glob)


class Codec(ABC):
    """Base class of every stage. Subclasses declare ``codec_id`` and ``params``.

    Class properties (design.md §C):

    * ``kind``: "encoder", "transform", "bytes", "wrapper" or "pipeline".
    * ``lossless``: decode(encode(x)) == x exactly.
    * ``unbiased``: E[decode(encode(x))] == x over the codec's randomness.
    * ``stateful``: keeps encoder-private state across rounds.
    * ``decoder_state``: the root must mirror state per client.
    * ``needs_global``: reads ``ctx.glob`` (global model / last server step), which the
      orchestrator then builds each round on every rank.
    * ``side_inputs``: training-time side information the client's training loop must
      capture for ``ctx.side`` (e.g. ``("activations",)``); see :mod:`hpcfl.fl.capture`.
    """

    codec_id: ClassVar[str] = ""
    kind: ClassVar[str] = "encoder"
    lossless: ClassVar[bool] = False
    unbiased: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    decoder_state: ClassVar[bool] = False
    needs_global: ClassVar[bool] = False
    side_inputs: ClassVar[tuple[str, ...]] = ()
    required_scope: ClassVar[str | None] = None  # e.g. "model": needs routing.scope = "model"
    # Bumped when a codec's part layout changes without a config change; folded into the message's
    # codec-config hash (UpdateCodec) so a message of the old layout is refused, never misread.
    payload_revision: ClassVar[int] = 0
    params: ClassVar[dict[str, Field | CodecParam]] = {}
    summary: ClassVar[str] = ""

    def __init__(self, **kwargs: Any):
        key = kwargs.pop("_key", "codec")
        unknown = set(kwargs) - set(self.params)
        if unknown:
            bad = sorted(unknown)[0]
            allowed = ", ".join(self.params) or "(none)"
            raise ConfigError(f"{key}.{bad}", f"unknown parameter of codec {self.codec_id!r}; "
                              f"allowed: {allowed}")
        from hpcfl.codecs.registry import get_codec  # late: registry imports base

        for name, p in self.params.items():
            k = f"{key}.{name}"
            if isinstance(p, CodecParam):
                v = kwargs.get(name, copy.deepcopy(p.default))
                if v is None:
                    if p.required:
                        raise ConfigError(k, f"codec {self.codec_id!r} needs an inner codec table")
                    setattr(self, name, None)
                elif p.many:
                    if not isinstance(v, list):
                        raise ConfigError(k, "expected a list of codec tables")
                    setattr(self, name, [get_codec(c, key=f"{k}[{i}]") for i, c in enumerate(v)])
                else:
                    setattr(self, name, get_codec(v, key=k))
            else:
                from hpcfl.config.load import _check_field

                v = kwargs.get(name, copy.deepcopy(p.default))
                if v is None and p.default is None:
                    setattr(self, name, None)
                else:
                    setattr(self, name, _check_field(k, p, v))
        self._check(key)

    def _check(self, key: str) -> None:
        """Cross-parameter validation; raise ConfigError naming ``key.param``."""

    # -- config -------------------------------------------------------------
    def get_config(self) -> dict:
        cfg: dict[str, Any] = {"id": self.codec_id}
        for name, p in self.params.items():
            v = getattr(self, name)
            if isinstance(p, CodecParam):
                if v is None:
                    cfg[name] = None
                elif p.many:
                    cfg[name] = [c.get_config() for c in v]
                else:
                    cfg[name] = v.get_config()
            else:
                cfg[name] = copy.deepcopy(v)
        return cfg

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        from hpcfl.config.load import canonical_json

        return hash(canonical_json(self.get_config()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({args})"

    # -- coding ---------------------------------------------------------------
    @property
    def part_names(self) -> tuple[str, ...]:
        """Every part this codec may emit, in a fixed order (the wire's part keys)."""
        return ()

    @abstractmethod
    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        """Encode ``x`` (shape ``ctx.shape``, float32)."""

    @abstractmethod
    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        """Rebuild a float32 tensor of shape ``ctx.shape`` from ``enc``."""

    def decode_sum(self, encs: list[Encoded], weights: list[float], ctxs: list[Ctx]) -> torch.Tensor:
        """``sum_k w_k decode(enc_k, ctx_k)`` over clients, for one slot (fused aggregation,
        ``server.aggregate = "fused"``). Codecs whose decoders share work across clients (a
        common basis, a common lift) override it to do that work once."""
        out = torch.zeros(ctxs[0].shape, dtype=torch.float32)
        for enc, w, ctx in zip(encs, weights, ctxs):
            out.add_(self.decode(enc, ctx).float(), alpha=float(w))
        return out

    def downlink_bytes(self, n_params: int, round: int, last_round: int) -> int | None:
        """Bytes a client needs to rebuild the global model under this method's download
        protocol, or None for the default (the full float32 model, 4 x n_params).

        ``last_round`` is the last round the client took part in (-1: never). Methods
        such as intrinsic gradient compression download only subspace coordinates.
        """
        return None

    def _finish(self, enc: Encoded, ctx: Ctx) -> Encoded:
        """Fill ``enc.recon`` when asked, for codecs whose decode is stateless."""
        if ctx.want_recon and enc.recon is None:
            enc.recon = self.decode(enc, ctx)
        return enc

    def describe(self) -> dict:
        """Machine-readable description for ``hpcfl codecs``."""
        ps = {}
        for name, p in self.params.items():
            if isinstance(p, CodecParam):
                ps[name] = {"type": "codec list" if p.many else "codec", "default": p.default, "doc": p.doc}
            else:
                ps[name] = {"type": p.describe_allowed(), "default": p.default, "doc": p.doc}
        return {"id": self.codec_id, "kind": self.kind, "lossless": self.lossless,
                "unbiased": self.unbiased, "stateful": self.stateful,
                "decoder_state": self.decoder_state, "summary": self.summary, "params": ps}


# -------------------------------------------------------------- part helpers

def need_part(enc: Encoded, name: str, dtype: np.dtype | type, size: int | None = None,
              min_size: int = 0, max_size: int | None = None) -> np.ndarray:
    """Fetch a part and check its dtype and length; raise :class:`PartError` otherwise."""
    a = enc.parts.get(name)
    if a is None:
        raise PartError(name, "missing")
    if a.dtype != np.dtype(dtype):
        raise PartError(name, f"dtype {a.dtype} but {np.dtype(dtype)} expected")
    if size is not None and a.size != size:
        raise PartError(name, f"{a.size} elements but {size} expected")
    if a.size < min_size or (max_size is not None and a.size > max_size):
        raise PartError(name, f"{a.size} elements, outside [{min_size}, {max_size}]")
    return a


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """Zero-copy CPU view where possible (GPU tensors are copied to host)."""
    return x.detach().to("cpu").contiguous().numpy()


def from_numpy(a: np.ndarray, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Tensor over ``a`` without a copy when ``a`` is writable (the root's receive
    buffers are fresh every round, so views never alias next round's data)."""
    if not a.flags.writeable:
        a = a.copy()
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.reshape(shape).to(device)
