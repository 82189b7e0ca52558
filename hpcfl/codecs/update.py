"""Encode a whole model update into one message, and decode it back.

:class:`UpdateCodec` is the seam between the codec library and the rest of
hpcfl: it applies the routing plan, runs the lossy or dense codec per slot with
that client's explicit state, and packs the wire message. It knows nothing of
MPI; the orchestrator hands its bytes to the transport.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, PartError
from hpcfl.codecs.registry import get_codec
from hpcfl.codecs.routing import RoutingPolicy, Slot
from hpcfl.codecs.state import CodecState
from hpcfl.codecs.wire import FLAG_CRC, VERSION, Message, PartRecord, TensorRecord, dtype_code, pack, unpack
from hpcfl.config.load import canonical_json
from hpcfl.errors import ConfigError, WireFormatError
from hpcfl.seeding import derive_seed

__all__ = ["UpdateCodec", "EncodeResult", "DecodeResult", "GlobalView"]


@dataclass
class EncodeResult:
    data: memoryview
    payload_bytes: int
    header_bytes: int
    raw_bytes: int
    recon: dict[str, torch.Tensor] | None = None
    stats: list[tuple[int, str, float]] = field(default_factory=list)  # (slot index, name, value)


@dataclass
class GlobalView:
    """What every rank knows about the global model in a round, for ``needs_global`` codecs.

    ``theta``: the flat float32 model the clients trained from (the round's broadcast);
    ``delta``: ``theta`` minus the previous round's model (None in round 0).
    """

    theta: torch.Tensor
    delta: torch.Tensor | None = None


@dataclass
class DecodeResult:
    update: dict[str, torch.Tensor]
    payload_bytes: int
    header_bytes: int
    flags: dict[str, int]


class UpdateCodec:
    """Routing plan + codecs + wire format for one job.

    Parameters
    ----------
    codec, dense : codec configs for lossy- and dense-routed slots.
    routing : the ``[routing]`` section (see :mod:`hpcfl.codecs.routing`).
    params : the model's ``(name, shape)`` list, in model order.
    seed : the job seed; per-slot seeds derive from (seed, round, client, slot).
    checksum : append a CRC32 trailer to every message.
    """

    def __init__(self, codec: Mapping | Codec, routing: Mapping, params: Sequence[tuple[str, Sequence[int]]],
                 *, dense: Mapping | Codec | None = None, seed: int = 0, checksum: bool = False):
        self.codec = codec if isinstance(codec, Codec) else get_codec(codec, key="codec")
        dense = routing.get("dense", {"id": "identity"}) if dense is None else dense
        self.dense = dense if isinstance(dense, Codec) else get_codec(dense, key="routing.dense")
        for key, c in (("codec", self.codec), ("routing.dense", self.dense)):
            if c.kind == "transform":
                raise ConfigError(f"{key}.id", f"{c.codec_id!r} is a transform; put it in a pipeline")
        if self.dense.decoder_state or self.dense.stateful:
            raise ConfigError("routing.dense.id", f"{self.dense.codec_id!r} is stateful; the dense route "
                              "takes a stateless codec (identity, fp16, zstd, ...)")
        self.policy = RoutingPolicy.from_config(routing)
        need = self.codec.required_scope
        if need is not None and need != self.policy.scope:
            raise ConfigError("routing.scope", f"codec {self.codec.codec_id!r} works on routing.scope = {need!r}, "
                              f"not {self.policy.scope!r}")
        self.params = [(n, tuple(int(s) for s in sh)) for n, sh in params]
        self.slots: list[Slot] = self.policy.plan(self.params)
        self.table = [s.shape for s in self.slots]
        self.seed = int(seed)
        self.checksum = bool(checksum)
        self._keys = {id(c): {n: i for i, n in enumerate(c.part_names)} for c in (self.codec, self.dense)}
        for c in (self.codec, self.dense):
            if len(c.part_names) > 255:
                raise ConfigError("codec", f"{c.codec_id!r} declares more than 255 parts")
        self.config = {
            "wire_version": VERSION,
            "codec": self.codec.get_config(),
            "dense": self.dense.get_config(),
            "routing": self.policy.to_config(),
            "slots": [[s.name, list(s.shape), s.route] for s in self.slots],
        }
        revs = _payload_revisions(self.config["codec"]) | _payload_revisions(self.config["dense"])
        if revs:  # only when some stage has one, so the hashes of every other codec stay as they were
            self.config["payload_revisions"] = dict(sorted(revs.items()))
        digest = hashlib.sha256(canonical_json(self.config).encode()).digest()
        self.hash = int.from_bytes(digest[:8], "little")
        self.raw_bytes = 4 * sum(s.numel for s in self.slots)

    def codec_for(self, slot: Slot) -> Codec:
        return self.codec if slot.route == "lossy" else self.dense

    def _ctx(self, slot: Slot, state: CodecState, client: int, round: int, want_recon: bool,
             side: Mapping | None, enc_state: bool, glob: Mapping | None = None) -> Ctx:
        ts = state.for_tensor(slot.name)
        if side:
            if len(slot.members) == 1 and slot.members[0].name == slot.name:
                side = side.get(slot.name, {})
            else:
                side = {m.name: side[m.name] for m in slot.members if m.name in side}
        return Ctx(slot.name, slot.shape, seed=derive_seed(self.seed, round, client, slot.name), round=round,
                   client=client, want_recon=want_recon, enc_state=ts.enc if enc_state else {},
                   shared_state=ts.shared, side=dict(side) if side else {}, job_seed=self.seed,
                   glob=(glob or {}).get(slot.name))

    # ---------------------------------------------------------- round context
    @property
    def needs_global(self) -> bool:
        return bool(self.codec.needs_global or self.dense.needs_global)

    @property
    def side_inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.codec.side_inputs + self.dense.side_inputs))

    def global_slots(self, view: GlobalView) -> dict[str, dict[str, torch.Tensor | None]]:
        """Per-slot views of the global model (and its last step) for ``ctx.glob``."""
        theta = self._split(view.theta)
        delta = self._split(view.delta) if view.delta is not None else None
        return {s.name: {"theta": self.gather_slot(s, theta),
                         "delta": None if delta is None else self.gather_slot(s, delta)} for s in self.slots}

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for name, shape in self.params:
            n = math.prod(shape)
            out[name] = flat[off:off + n].view(shape)
            off += n
        return out

    def downlink_bytes(self, round: int, last_round: int) -> int:
        """Bytes a client downloads to rebuild the model (the codec's protocol, or 4 x params)."""
        n = self.raw_bytes // 4
        b = self.codec.downlink_bytes(n, round, last_round)
        return 4 * n if b is None else int(b)

    def gather_slot(self, slot: Slot, update: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if len(slot.members) == 1 and slot.members[0].name == slot.name:
            return update[slot.name].reshape(slot.shape).float()
        return torch.cat([update[m.name].reshape(-1).float() for m in slot.members])

    def scatter_slot(self, slot: Slot, x: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        if len(slot.members) == 1 and slot.members[0].name == slot.name:
            out[slot.name] = x.reshape(slot.shape)
            return
        flat = x.reshape(-1)
        for m in slot.members:
            out[m.name] = flat[m.offset:m.offset + m.numel].reshape(m.shape)

    # ------------------------------------------------------------- encoding
    def encode(self, update: Mapping[str, torch.Tensor], *, client: int, round: int, state: CodecState,
               want_recon: bool = False, side: Mapping | None = None, glob: Mapping | None = None
               ) -> EncodeResult:
        """One client's update -> one wire message.

        ``side``: per-parameter training-time side information (``side_inputs``);
        ``glob``: :meth:`global_slots` of the round (``needs_global`` codecs).
        """
        missing = [n for n, _ in self.params if n not in update]
        if missing:
            raise KeyError(f"update lacks tensors {missing[:3]}")
        records = []
        stats: list[tuple[int, str, float]] = []
        ratios: list[tuple[int, str, float]] = []  # every slot's 4n / parts bytes (see below)
        recon: dict[str, torch.Tensor] | None = {} if want_recon else None
        for slot in self.slots:
            codec = self.codec_for(slot)
            x = self.gather_slot(slot, update)
            ctx = self._ctx(slot, state, client, round, want_recon, side, enc_state=True, glob=glob)
            enc = codec.encode(x, ctx)
            stats.extend((slot.index, k, float(v)) for k, v in enc.stats.items())
            if "ratio" not in enc.stats:
                pay = enc.payload_bytes
                ratios.append((slot.index, "ratio", 4.0 * slot.numel / pay if pay else math.nan))
            state.for_tensor(slot.name).last_round = round
            keys = self._keys[id(codec)]
            parts = []
            for name, a in enc.parts.items():
                coding, logical = enc.coding.get(name, (0, a.dtype))
                parts.append(PartRecord(keys[name], dtype_code(logical), coding, np.ascontiguousarray(a).reshape(-1)))
            records.append(TensorRecord(slot.index, dtype_code(update[slot.members[0].name].dtype), slot.shape,
                                        enc.flags, parts))
            if recon is not None:
                r = enc.recon if enc.recon is not None else codec.decode(_plain(enc), ctx)
                self.scatter_slot(slot, r, recon)
        if ratios and any(k == "ratio" for _, k, _ in stats):
            # The codec logs a per-tensor ``ratio`` (SZ3, ZFP, FalCom: 4n / the tensor's parts, their raw
            # fallbacks included): then every other slot, e.g. the dense route's zstd'd small tensors, gets
            # one by the same formula (the table of contents is not counted, as for the codec's). So
            # /codec_stats holds each slot's payload (4n / ratio), and the slots' payloads sum to the
            # message's payload_bytes. Jobs whose codec logs no per-tensor ratio keep their stat sets.
            stats.extend(ratios)
        msg = Message(self.hash, round, client, records, flags=FLAG_CRC if self.checksum else 0)
        data = pack(msg)
        return EncodeResult(data, msg.payload_bytes, msg.header_bytes, self.raw_bytes, recon, stats)

    # ------------------------------------------------------------- decoding
    def _records(self, buf, client, round, state, verify_hash, glob):
        """Unpack and validate one message; yield (slot, codec, Encoded, ctx, offset) per tensor."""
        msg = unpack(buf, expect_hash=self.hash if verify_hash else None, expect_round=round,
                     expect_sender=client, table=self.table)
        if len(msg.tensors) != len(self.slots):
            raise WireFormatError("n_tensors", 36, f"{len(msg.tensors)} tensors, expected {len(self.slots)}")
        items = []
        for rec in msg.tensors:
            slot = self.slots[rec.index]
            codec = self.codec_for(slot)
            names = codec.part_names
            parts: dict[str, np.ndarray] = {}
            coding: dict[str, tuple[int, np.dtype]] = {}
            for p in rec.parts:
                if p.key >= len(names):
                    raise WireFormatError(f"tensor {slot.name!r} part key", p.offset,
                                          f"key {p.key} but {codec.codec_id!r} has {len(names)} parts")
                parts[names[p.key]] = p.data
                if p.coding:
                    from hpcfl.codecs.wire import _NP_OF

                    coding[names[p.key]] = (p.coding, _NP_OF[p.dtype])
            ctx = self._ctx(slot, state, msg.sender, msg.round, False, None, enc_state=False, glob=glob)
            first = rec.parts[0].offset if rec.parts else -1
            items.append((slot, codec, Encoded(parts, rec.flags, coding=coding), ctx, first))
        return msg, items

    @staticmethod
    def _guard(slot, codec, first, fn):
        try:
            return fn()
        except WireFormatError as e:
            raise WireFormatError(f"tensor {slot.name!r} ({codec.codec_id}) {e.field}", first,
                                  str(e).split("): ", 1)[-1]) from None
        except (ValueError, IndexError, RuntimeError, TypeError, KeyError, ArithmeticError) as e:
            raise WireFormatError(f"tensor {slot.name!r} ({codec.codec_id})", first,
                                  f"{type(e).__name__}: {e}") from None
        except MemoryError as e:  # e.g. a shape taken from the message itself (hpcfl codec decode)
            raise WireFormatError(f"tensor {slot.name!r} ({codec.codec_id})", first,
                                  f"the decoded tensor of shape {slot.shape} cannot be allocated "
                                  f"({type(e).__name__}: {e})") from None

    def decode_sum(self, messages: Mapping[int, object], weights: Mapping[int, float], *, round: int,
                   states: Mapping[int, CodecState], glob: Mapping | None = None
                   ) -> tuple[dict[str, torch.Tensor], int, int]:
        """Fused aggregation: ``sum_c w_c decode(message_c)`` per slot through ``Codec.decode_sum``.

        Every message is validated exactly as :meth:`decode` does; shared codec state is
        updated per client in client order. Returns (aggregate by parameter name,
        payload bytes, header bytes).
        """
        per_slot: dict[int, tuple[list, list, list]] = {s.index: ([], [], []) for s in self.slots}
        payload = header = 0
        for c in sorted(messages):
            msg, items = self._records(messages[c], c, round, states[c], True, glob)
            payload += msg.payload_bytes
            header += msg.header_bytes
            for slot, codec, enc, ctx, first in items:
                encs, ws, ctxs = per_slot[slot.index]
                encs.append((enc, first))
                ws.append(float(weights[c]))
                ctxs.append(ctx)
                states[c].for_tensor(slot.name).last_round = round
        out: dict[str, torch.Tensor] = {}
        for slot in self.slots:
            encs, ws, ctxs = per_slot[slot.index]
            if not encs:
                continue
            codec = self.codec_for(slot)
            first = encs[0][1]
            x = self._guard(slot, codec, first, lambda: codec.decode_sum([e for e, _ in encs], ws, ctxs))
            if tuple(x.shape) != slot.shape:
                raise WireFormatError(f"tensor {slot.name!r}", first, f"decoded shape {tuple(x.shape)} != "
                                      f"{slot.shape}")
            self.scatter_slot(slot, x.float(), out)
        return out, payload, header
    def decode(self, buf, *, client: int | None, round: int | None, state: CodecState,
               verify_hash: bool = True, glob: Mapping | None = None) -> DecodeResult:
        """Validate and decode one client's message with that client's root-side state.

        ``verify_hash=False`` only for inspecting a message whose tensor names are
        unknown (the hash covers them); shapes are still checked against the table.
        """
        msg, items = self._records(buf, client, round, state, verify_hash, glob)
        out: dict[str, torch.Tensor] = {}
        flags: dict[str, int] = {}
        for slot, codec, enc, ctx, first in items:
            x = self._guard(slot, codec, first, lambda: codec.decode(enc, ctx))
            if tuple(x.shape) != slot.shape:
                raise WireFormatError(f"tensor {slot.name!r}", first, f"decoded shape {tuple(x.shape)} "
                                      f"!= {slot.shape}")
            state.for_tensor(slot.name).last_round = msg.round
            self.scatter_slot(slot, x.float(), out)
            flags[slot.name] = enc.flags
        return DecodeResult(out, msg.payload_bytes, msg.header_bytes, flags)


def _plain(enc: Encoded) -> Encoded:
    return Encoded(dict(enc.parts), enc.flags, coding=dict(enc.coding))


# PartError subclasses WireFormatError, so codec part checks surface as wire errors.
assert issubclass(PartError, WireFormatError)


def _payload_revisions(cfg) -> dict[str, int]:
    """{codec id: payload_revision} of every stage in an expanded config tree that has one."""
    from hpcfl.codecs.registry import codec_classes

    out: dict[str, int] = {}
    if isinstance(cfg, Mapping):
        rev = getattr(codec_classes().get(cfg.get("id")), "payload_revision", 0)
        if rev:
            out[cfg["id"]] = rev
        for v in cfg.values():
            out |= _payload_revisions(v)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            out |= _payload_revisions(v)
    return out
