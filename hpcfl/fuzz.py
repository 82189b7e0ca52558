"""Fuzz harness for the wire decoder: hostile messages against every codec.

The root decodes bytes that arrive from other processes. Whatever those bytes
are, :meth:`hpcfl.codecs.update.UpdateCodec.decode` must either return an
update of the job's shapes or raise :class:`hpcfl.errors.WireFormatError`;
never another exception, never a hang, never an allocation the message does not
justify. This module checks exactly that, for one input at a time, and drives
it three ways:

* property tests (``tests/fuzz/test_decode_fuzz.py``, hypothesis) build inputs
  with :func:`apply_ops` from explicit mutation strategies;
* coverage-guided fuzzing with atheris (libFuzzer): :func:`test_one_input`
  reads the fuzzer's bytes as a small mutation program (:func:`run_input`);
* ``python -m hpcfl.fuzz --seconds N [--codec ID] [--corpus DIR]``, the
  longer campaign (docs/reliability.md).

Targets
-------
:func:`decode_target` builds, for one codec case (a runnable codec config, see
``tests/codecs/common.py``'s ``codec_cases``), a small update over a fixed
tensor table (:data:`LAYOUTS`: per-tensor slots, one ``@model`` slot with dense
biases, degenerate shapes such as ``(0, 5)``), encodes rounds 0-2 with one
client's state (and, for ``needs_global`` codecs, a global-model view), lets
the root decode rounds 0 and 1 and keeps the round-2 message and the root's
state: each fuzz input is decoded against a fresh copy of that state, with the
round, client and codec hash the root expects (or, in raw mode, none of them).

Checks per input (:func:`check_decode`)
---------------------------------------
* **exceptions**: only ``WireFormatError`` may escape; a decode that succeeds
  must give every parameter, float32, in its table shape. Any warning (numpy
  overflow, ...) fails too: on the command line it would be a second line.
* **time**: one decode takes less than :data:`TIME_LIMIT` = 1 s of CPU time of
  the decoding thread (and 10 s of wall time, slack for a loaded machine); the
  targets' tables are tiny, so a valid decode takes 0.1-0.2 ms (about 1 ms
  with ``tracemalloc`` on).
* **memory**: the peak of memory traced by ``tracemalloc`` (Python objects and
  every numpy buffer) during one decode, above what was allocated before it,
  is at most :func:`memory_bound`::

      max(64 KiB, 20 * len(message)) + 16 * n_elements

  where ``n_elements`` is the number of elements of the job's tensor table.
  ``16 * n_elements`` is four float32 copies of the decoded update, what the
  job legitimately implies (the update itself, a scatter buffer, unpacked
  codes, indices); ``20 * len(message)`` covers copies and views of the
  message's own parts (a coded part is at most the message long and
  decompresses to at most ``8 * numel + 1024`` bytes, which the element term
  covers); 64 KiB is the floor for fixed-size tables (a 256-entry lookup table
  of 8 float32 is 8 KiB) and Python objects. torch's allocator is invisible to
  tracemalloc, so the process's peak RSS (``ru_maxrss``) may in addition grow
  by at most :data:`RSS_SLACK` = 64 MiB during one decode.

Input program (atheris and :func:`run_input`)
---------------------------------------------
Bytes 0-1 (u16, little-endian) pick the codec case, byte 2 the layout (bits
0-1), the CRC trailer (bit 2), the mode (bits 3-4: 0 = raw, else mutate) and
whether framing is repaired after mutating (bit 5: ``total_len`` and CRC set
to match, so a mutation reaches the codec decoders). In raw mode the rest of
the input *is* the message, decoded without hash, round or sender checks. In
mutate mode the rest is a list of operations (:data:`OPS`) applied to the
target's valid message: structural ones (replace, re-key, drop or add a part;
change a tensor's index, dtype, flags or shape; byte-codec bombs) re-pack a
well-framed message, then byte-level ones (bit flips, byte writes, lying
values in any header field, truncation, extension, insertion, deletion) edit
the bytes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import resource
import struct
import sys
import time
import tracemalloc
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["LAYOUTS", "TIME_LIMIT", "RSS_SLACK", "MIN_BOUND", "INTERESTING", "OPS", "DecodeFailure", "Target",
           "TargetSet", "WireField", "decode_target", "memory_bound", "check_decode", "apply_ops", "random_ops",
           "typed_part_data", "wire_fields", "fix_framing", "fuzz_cases", "targets", "parse_input", "run_input",
           "test_one_input", "seed_inputs", "encode_program", "main"]

TIME_LIMIT = 1.0          # CPU seconds per decode
WALL_FACTOR = 10          # wall-time limit = WALL_FACTOR * TIME_LIMIT (slack for a loaded machine)
MIN_BOUND = 64 * 1024     # bytes: the floor of memory_bound
RSS_SLACK = 64 << 20      # bytes: peak RSS growth allowed during one decode (torch allocations)
SEED = 12345              # job seed of every target
CLIENT = 1
ROUNDS = 3                # rounds encoded per target; the last one is fuzzed

# Small tensor tables, so one decode takes a millisecond or less.
_NET = (("conv.weight", (4, 2, 3, 3)), ("conv.bias", (4,)), ("fc.weight", (6, 12)), ("fc.bias", (6,)))
LAYOUTS: dict[str, tuple[tuple[tuple[str, tuple[int, ...]], ...], dict]] = {
    "tensor": (_NET, {}),                                               # a lossy slot per tensor
    "model": (_NET, {"scope": "model", "dense_patterns": ["*.bias"]}),  # one "@model" slot + dense biases
    "edge": ((("empty", (0, 5)), ("one", (1,)), ("w", (3, 1, 2)), ("v", (7,))), {}),  # degenerate shapes
}
LAYOUT_NAMES = tuple(LAYOUTS)

# Values a lying field takes (masked to the field's width), beside ones relative to the true value.
INTERESTING = (0, 1, 2, 3, 7, 8, 9, 15, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1)


class DecodeFailure(AssertionError):
    """One input broke the decoder's contract. ``kind``: exception, time, memory, warning or output."""

    def __init__(self, kind: str, target: str, data: bytes, detail: str):
        self.kind = kind
        self.target = target
        self.data = bytes(data)
        head = self.data[:48].hex()
        super().__init__(f"{kind} on {target} ({len(self.data)}-byte input {head}"
                         f"{'...' if len(self.data) > 48 else ''}): {detail}")


# --------------------------------------------------------------- wire fields

@dataclass(frozen=True)
class WireField:
    """One integer field of a message's header: name, byte offset, width in bytes."""

    name: str
    offset: int
    size: int

    def read(self, data: bytes | bytearray) -> int:
        return int.from_bytes(data[self.offset:self.offset + self.size], "little")

    def write(self, data: bytearray, value: int) -> None:
        if self.offset + self.size <= len(data):
            data[self.offset:self.offset + self.size] = (value & ((1 << 8 * self.size) - 1)).to_bytes(
                self.size, "little")


def wire_fields(message: bytes) -> list[WireField]:
    """Every integer field of a well-formed message's header, in byte order."""
    f = [WireField("magic", 0, 4), WireField("version", 4, 2), WireField("flags", 6, 2),
         WireField("header_len", 8, 4), WireField("total_len", 12, 8), WireField("codec_hash", 20, 8),
         WireField("round", 28, 4), WireField("sender", 32, 4), WireField("n_tensors", 36, 4)]
    n_tensors = struct.unpack_from("<I", message, 36)[0]
    off = 40
    for ti in range(n_tensors):
        _, _, ndim, _, n_parts = struct.unpack_from("<IBBHB", message, off)
        t = f"tensor[{ti}]"
        f += [WireField(f"{t}.index", off, 4), WireField(f"{t}.dtype", off + 4, 1),
              WireField(f"{t}.ndim", off + 5, 1), WireField(f"{t}.flags", off + 6, 2),
              WireField(f"{t}.n_parts", off + 8, 1)]
        off += 9
        f += [WireField(f"{t}.shape[{d}]", off + 4 * d, 4) for d in range(ndim)]
        off += 4 * ndim
        for pi in range(n_parts):
            p = f"{t}.part[{pi}]"
            f += [WireField(f"{p}.key", off, 1), WireField(f"{p}.dtype", off + 1, 1),
                  WireField(f"{p}.coding", off + 2, 1), WireField(f"{p}.nbytes", off + 3, 8)]
            off += 11
    return f


def fix_framing(data: bytearray) -> None:
    """Make ``total_len`` match the length and recompute the CRC trailer, if flagged."""
    if len(data) < 40 or data[:4] != b"HPFL":
        return
    struct.pack_into("<Q", data, 12, len(data))
    flags = struct.unpack_from("<H", data, 6)[0]
    if flags & 1 and len(data) >= 48:
        end = len(data) - 8
        struct.pack_into("<II", data, end, zlib.crc32(bytes(data[:end])), 0)


# ------------------------------------------------------------------ targets

def _case_parts(case: Any) -> tuple[str, dict]:
    """(name, config) of a codec case: a ``Case`` (``.name``, ``.config``), a pair, a dict or an id."""
    if isinstance(case, str):
        return case, {"id": case}
    if isinstance(case, Mapping):
        return str(case.get("id")), copy.deepcopy(dict(case))
    if isinstance(case, tuple):
        return str(case[0]), copy.deepcopy(dict(case[1]))
    if getattr(case, "error", ""):
        raise ValueError(f"case {case.name} cannot run: {case.error}")
    return case.name, copy.deepcopy(dict(case.config))


def _update(params, round: int, salt: str) -> dict:
    """A deterministic float32 update, ~30% exact zeros (sparse codecs and byte codecs see structure)."""
    import torch

    from hpcfl.seeding import derive_seed

    g = torch.Generator().manual_seed(derive_seed(SEED, "fuzz", salt, CLIENT, round))
    out = {}
    for name, shape in params:
        x = torch.randn(shape, generator=g) * 0.1
        out[name] = x * (torch.rand(shape, generator=g) < 0.7)
    return out


@dataclass(eq=False)
class Target:
    """A codec case on one tensor table: the root's decoder, a valid message and the root's state."""

    name: str
    codec: Any                # UpdateCodec
    message: bytes            # a valid message of round ``round`` from client ``client``
    state: Any                # the root's CodecState before that round (copied for every decode)
    client: int = CLIENT
    round: int = ROUNDS - 1
    glob: Any = None          # the round's global-model view, for needs_global codecs
    fields: list[WireField] = field(default_factory=list)

    @property
    def n_elements(self) -> int:
        return sum(s.numel for s in self.codec.slots)

    def fresh_state(self):
        """A copy of the root's state (decoding mutates state)."""
        from hpcfl.codecs.state import CodecState, TensorState

        st = CodecState()
        for name, ts in self.state.tensors.items():
            shared = copy.deepcopy(ts.shared) if any(ts.shared.values()) else {}
            st.tensors[name] = TensorState(enc={}, shared=shared, last_round=ts.last_round)
        return st

    def decode(self, data: bytes, *, strict: bool = True):
        """Decode like the root (``strict``: hash, round and sender checked) with a fresh state copy."""
        st = self.fresh_state()
        if strict:
            return self.codec.decode(data, client=self.client, round=self.round, state=st, glob=self.glob)
        return self.codec.decode(data, client=None, round=None, state=st, verify_hash=False, glob=self.glob)


def _global_view(uc, round: int):
    """A deterministic global model (and its last step) for ``needs_global`` codecs, per round."""
    import torch

    from hpcfl.codecs.update import GlobalView
    from hpcfl.seeding import derive_seed

    n = sum(math.prod(s) for _, s in uc.params)
    g = torch.Generator().manual_seed(derive_seed(SEED, "fuzz-global"))
    thetas = [torch.randn(n, generator=g)]
    for _ in range(round):
        thetas.append(thetas[-1] + 0.01 * torch.randn(n, generator=g))
    delta = thetas[-1] - thetas[-2] if round else None
    return uc.global_slots(GlobalView(thetas[-1], delta))


def decode_target(case: Any, layout: str = "tensor", *, checksum: bool = False) -> Target:
    """Build the :class:`Target` of one codec case (``Case``, ``(name, config)``, config dict or id).

    Rounds ``0 .. ROUNDS-2`` are encoded by one client and decoded by the root (so
    codecs with decoder state reach their steady state); the target is round
    ``ROUNDS-1``'s message and the root's state before it.
    """
    from hpcfl.codecs import CodecState, UpdateCodec, get_codec

    name, cfg = _case_parts(case)
    params, routing = LAYOUTS[layout]
    routing = copy.deepcopy(routing)
    need = get_codec(copy.deepcopy(cfg)).required_scope
    if need is not None:  # e.g. igc codes the whole model as one slot
        routing["scope"] = need
    uc = UpdateCodec(cfg, routing, params, seed=SEED, checksum=checksum)
    cstate, rstate = CodecState(), CodecState()
    for r in range(ROUNDS):
        glob = _global_view(uc, r) if uc.needs_global else None
        msg = bytes(uc.encode(_update(params, r, name), client=CLIENT, round=r, state=cstate, glob=glob).data)
        if r < ROUNDS - 1:
            uc.decode(msg, client=CLIENT, round=r, state=rstate, glob=glob)
    t = Target(f"{name}/{layout}{'+crc' if checksum else ''}", uc, msg, rstate, glob=glob,
               fields=wire_fields(msg))
    t.decode(msg)  # warm up every code path of a valid decode (lazy imports, first-call setup)
    return t


# ------------------------------------------------------------------- checks

def memory_bound(message_len: int, n_elements: int) -> int:
    """Bytes one decode may allocate (tracemalloc peak): see the module docstring."""
    return max(MIN_BOUND, 20 * int(message_len)) + 16 * int(n_elements)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def check_decode(target: Target, data: bytes, *, strict: bool = True, time_limit: float = TIME_LIMIT) -> str:
    """Decode ``data`` against ``target`` and enforce the contract; ``"decoded"`` or ``"rejected"``.

    Raises :class:`DecodeFailure` on any breach (see the module docstring). Starts
    ``tracemalloc`` for the decode if it is not running (and stops it again).
    """
    from hpcfl.errors import WireFormatError

    data = bytes(data)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    outcome, err, res = "rejected", None, None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            rss0 = _maxrss()
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                res = target.decode(data, strict=strict)
                outcome = "decoded"
            except WireFormatError:
                pass
            except Exception as e:  # noqa: BLE001 - anything else breaks the contract
                err = e
            cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            rss = _maxrss() - rss0
    finally:
        if started:
            tracemalloc.stop()
    if err is not None:
        import traceback

        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
        raise DecodeFailure("exception", target.name, data, f"{type(err).__name__}: {err}\n{tb}") from err
    if caught:
        w = caught[0]
        raise DecodeFailure("warning", target.name, data, f"{w.category.__name__}: {w.message} "
                            f"({w.filename}:{w.lineno})")
    if cpu > time_limit or wall > WALL_FACTOR * time_limit:
        raise DecodeFailure("time", target.name, data, f"decode took {cpu:.3f} s of CPU, {wall:.3f} s of wall "
                            f"time (limits {time_limit} s, {WALL_FACTOR * time_limit} s)")
    used, bound = peak - base, memory_bound(len(data), target.n_elements)
    if used > bound:
        raise DecodeFailure("memory", target.name, data, f"decode allocated {used} B (tracemalloc peak) > "
                            f"bound {bound} B for a {len(data)}-byte message and {target.n_elements} elements")
    if rss > RSS_SLACK + bound:
        raise DecodeFailure("memory", target.name, data, f"peak RSS grew by {rss} B during one decode")
    if res is not None:
        import torch

        upd = res.update
        for pname, shape in target.codec.params:
            t = upd.get(pname)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != torch.float32:
                raise DecodeFailure("output", target.name, data, f"decoded {pname!r} is "
                                    f"{None if t is None else (tuple(t.shape), t.dtype)}, expected {shape} float32")
    return outcome


# ---------------------------------------------------------------- mutations
#
# An operation is a tuple ("name", args...). Structural operations edit the parsed
# message and re-pack it (framing stays valid); byte operations edit the bytes.

STRUCTURAL = ("part_data", "part_meta", "part_drop", "part_add", "part_xor", "part_bomb", "tensor_meta",
              "tensor_shape", "tensor_drop", "tensor_swap")
BYTE_OPS = ("flip", "set_byte", "field", "field_rel", "truncate", "extend", "insert", "delete")
OPS = STRUCTURAL + BYTE_OPS


_BOMB_FILLS = (0, 0xFF, 0x3F, 0x80)


def _bomb(kind: int, log2_size: int, fill: int) -> bytes:
    """A compressed frame of ``2**log2_size`` equal bytes (zstd or lz4; at most 16 MiB): a bomb."""
    return _bomb_cached(kind % 2, min(int(log2_size), 24), _BOMB_FILLS[fill % len(_BOMB_FILLS)])


_BOMBS: dict[tuple[int, int, int], bytes] = {}


def _bomb_cached(kind: int, log2_size: int, fill: int) -> bytes:
    key = (kind, log2_size, fill)
    b = _BOMBS.get(key)
    if b is None:
        raw = bytes([fill]) * (1 << log2_size)
        if kind == 0:
            import zstandard

            b = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(raw)
        else:
            import lz4.frame

            b = lz4.frame.compress(raw, store_size=True)
        _BOMBS[key] = b
    return b


def _apply_structural(msg, op: tuple) -> None:
    import numpy as np

    from hpcfl.codecs.wire import MAX_NDIM, PartRecord

    kind = op[0]
    parts = [(t, p) for t in msg.tensors for p in t.parts]
    if kind.startswith("part_") and kind != "part_add":
        if not parts:
            return
        t, p = parts[op[1] % len(parts)]
        if kind == "part_data":
            p.data = np.frombuffer(bytes(op[2]), dtype=np.uint8)
        elif kind == "part_meta":
            which, v = op[2] % 3, op[3] & 0xFF
            if which == 0:
                p.key = v
            elif which == 1:
                p.dtype = v
            else:
                p.coding = v
        elif kind == "part_drop":
            t.parts = [q for q in t.parts if q is not p]
        elif kind == "part_xor":
            b = bytearray(np.ascontiguousarray(p.data).reshape(-1).view(np.uint8).tobytes())
            if b:
                b[op[2] % len(b)] ^= (op[3] & 0xFF) or 1
            p.data = np.frombuffer(bytes(b), dtype=np.uint8)
        elif kind == "part_bomb":
            p.data = np.frombuffer(_bomb(op[2], op[3], op[4]), dtype=np.uint8)
            p.coding = max(p.coding, 1) if op[5] else p.coding
        return
    if kind == "part_add":
        if not msg.tensors:
            return
        t = msg.tensors[op[1] % len(msg.tensors)]
        if len(t.parts) < 255:
            t.parts.append(PartRecord(op[2] & 0xFF, op[3] & 0xFF, op[4] & 0xFF,
                                      np.frombuffer(bytes(op[5]), dtype=np.uint8)))
        return
    if not msg.tensors:
        return
    t = msg.tensors[op[1] % len(msg.tensors)]
    if kind == "tensor_meta":
        which, v = op[2] % 3, op[3]
        if which == 0:
            t.index = v & 0xFFFFFFFF
        elif which == 1:
            t.dtype = v & 0xFF
        else:
            t.flags = v & 0xFFFF
    elif kind == "tensor_shape":
        t.shape = tuple(int(s) & 0xFFFFFFFF for s in op[2][:MAX_NDIM])
    elif kind == "tensor_drop":
        msg.tensors = [u for u in msg.tensors if u is not t]
    elif kind == "tensor_swap":
        j = op[2] % len(msg.tensors)
        i = op[1] % len(msg.tensors)
        msg.tensors[i], msg.tensors[j] = msg.tensors[j], msg.tensors[i]


def _apply_bytes(data: bytearray, fields: list[WireField], op: tuple) -> bytearray:
    kind = op[0]
    n = len(data)
    if kind == "flip":
        if n:
            bit = op[1] % (8 * n)
            data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "set_byte":
        if n:
            data[op[1] % n] = op[2] & 0xFF
    elif kind in ("field", "field_rel"):
        if fields:
            f = fields[op[1] % len(fields)]
            v = op[2] if kind == "field" else f.read(data) + op[2]
            f.write(data, v)
    elif kind == "truncate":
        del data[op[1] % (n + 1):]
    elif kind == "extend":
        data += bytes(op[1])
    elif kind == "insert":
        pos = op[1] % (n + 1)
        data[pos:pos] = bytes(op[2])
    elif kind == "delete":
        if n:
            pos = op[1] % n
            del data[pos:pos + max(1, op[2])]
    return data


def apply_ops(target: Target, ops: Sequence[tuple], *, fix: bool = False) -> bytes:
    """The target's valid message with ``ops`` applied (structural first, then bytes; see :data:`OPS`).

    ``fix`` repairs ``total_len`` and the CRC afterwards, so byte edits reach past the framing checks.
    """
    from hpcfl.codecs.wire import pack, unpack

    structural = [op for op in ops if op[0] in STRUCTURAL]
    if structural:
        msg = unpack(target.message)
        for t in msg.tensors:  # own copies: parts are views into the (immutable) message
            t.parts = [copy.copy(p) for p in t.parts]
        msg.tensors = [copy.copy(t) for t in msg.tensors]
        for op in structural:
            _apply_structural(msg, op)
        data = bytearray(pack(msg))
        fields = wire_fields(bytes(data))
    else:
        data = bytearray(target.message)
        fields = target.fields
    for op in ops:
        if op[0] in BYTE_OPS:
            data = _apply_bytes(data, fields, op)
        elif op[0] not in STRUCTURAL:
            raise ValueError(f"unknown operation {op[0]!r}")
    if fix:
        fix_framing(data)
    return bytes(data)


def typed_part_data(rng, dtype_code: int, size: int) -> bytes:
    """Bytes of ``size`` items of the wire dtype ``dtype_code`` with edge values (``rng``: random.Random).

    Integers cluster around small values, the extremes and -1; floats include 0, -0.0,
    subnormals, huge values, +-inf and NaN; sorted and unsorted runs both occur.
    """
    import numpy as np

    from hpcfl.codecs.wire import _NP_OF

    dt = _NP_OF.get(dtype_code, np.dtype("uint8"))
    size = max(0, int(size))
    if dt.kind == "f":
        pool = np.array([0.0, -0.0, 1.0, -1.0, 0.5, 1e-3, -1e-3, 1e-45, 1e30, -1e30, 65504.0, 3.4e38,
                         np.inf, -np.inf, np.nan], dtype=np.float64)
        a = np.where(np.array([rng.random() < 0.5 for _ in range(size)], bool),
                     pool[[rng.randrange(len(pool)) for _ in range(size)]],
                     np.array([rng.gauss(0.0, 0.1) for _ in range(size)]))
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(dt)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        hi = min(int(info.max), 1 << 20)
        pool = [0, 1, 2, 3, 7, 8, 255, 256, int(info.max), int(info.min), -1 if info.min < 0 else 0,
                rng.randrange(0, hi + 1)]
        vals = [pool[rng.randrange(len(pool))] if rng.random() < 0.3 else rng.randrange(0, 64)
                for _ in range(size)]
        if rng.random() < 0.5:
            vals.sort()
        a = np.array([min(max(v, int(info.min)), int(info.max)) for v in vals], dtype=dt)
    else:  # bool
        a = np.array([rng.random() < 0.5 for _ in range(size)], dtype=dt)
    return a.tobytes()


def random_ops(rng, target: Target, max_ops: int = 6) -> list[tuple]:
    """A random mutation program for ``target`` (``rng``: random.Random), mostly structure-aware."""
    from hpcfl.codecs.wire import unpack

    msg = unpack(target.message)
    parts = [p for t in msg.tensors for p in t.parts]
    ops: list[tuple] = []

    def val() -> int:
        return rng.choice(INTERESTING) if rng.random() < 0.7 else rng.getrandbits(rng.choice((8, 16, 32, 64)))

    for _ in range(rng.randrange(1, max_ops + 1)):
        kind = rng.choice(OPS + ("part_typed",) * 4 + ("field",) * 2)
        pi = rng.randrange(max(1, len(parts)))
        ti = rng.randrange(max(1, len(msg.tensors)))
        if kind == "part_typed":
            if not parts:
                continue
            p = parts[pi]
            n = p.data.size
            size = rng.choice((n, n, n, n + 1, max(0, n - 1), 0, 1, 2 * n))
            ops.append(("part_data", pi, typed_part_data(rng, p.dtype if not p.coding else 1, size)))
        elif kind == "part_data":
            ops.append((kind, pi, rng.randbytes(rng.randrange(0, 64))))
        elif kind == "part_meta":
            ops.append((kind, pi, rng.randrange(3), rng.choice((0, 1, 2, 3, 11, 12, 13, 14, 255,
                                                                 rng.randrange(256)))))
        elif kind in ("part_drop", "tensor_drop"):
            ops.append((kind, pi if kind == "part_drop" else ti))
        elif kind == "part_add":
            ops.append((kind, ti, rng.randrange(8), rng.choice((1, 5, 6, 11)), rng.choice((0, 0, 1, 2)),
                        rng.randbytes(rng.choice((0, 4, 8, 12)))))
        elif kind == "part_xor":
            ops.append((kind, pi, rng.getrandbits(16), rng.getrandbits(8)))
        elif kind == "part_bomb":
            ops.append((kind, pi, rng.randrange(2), rng.randrange(25), rng.randrange(4), rng.randrange(2)))
        elif kind == "tensor_meta":
            ops.append((kind, ti, rng.randrange(3), val()))
        elif kind == "tensor_shape":
            ops.append((kind, ti, tuple(val() for _ in range(rng.randrange(9)))))
        elif kind == "tensor_swap":
            ops.append((kind, ti, rng.randrange(max(1, len(msg.tensors)))))
        elif kind == "flip":
            ops.append((kind, rng.randrange(8 * len(target.message))))
        elif kind == "set_byte":
            ops.append((kind, rng.randrange(len(target.message)), rng.getrandbits(8)))
        elif kind == "field":
            ops.append((kind, rng.randrange(len(target.fields)), val()))
        elif kind == "field_rel":
            ops.append((kind, rng.randrange(len(target.fields)), rng.choice((-8, -1, 1, 8, 16, -16))))
        elif kind == "truncate":
            ops.append((kind, rng.randrange(len(target.message) + 1)))
        elif kind == "extend":
            ops.append((kind, rng.randbytes(rng.choice((1, 7, 8, 16)))))
        elif kind == "insert":
            ops.append((kind, rng.randrange(len(target.message)), rng.randbytes(rng.choice((1, 8)))))
        else:
            ops.append(("delete", rng.randrange(len(target.message)), rng.choice((1, 8))))
    return ops


# ------------------------------------------------------------ case registry

_TESTS_COMMON = Path(__file__).resolve().parent.parent / "tests" / "codecs" / "common.py"


def _registry_cases() -> list[tuple[str, dict]]:
    """A case per registered codec id and recipe, from the registry alone (no tests/ checkout)."""
    from hpcfl.codecs import codec_classes, get_codec, recipes
    from hpcfl.codecs.base import CodecParam

    inner = {"id": "topk", "ratio": 0.1}
    out: list[tuple[str, dict]] = []
    for cid, cls in sorted(codec_classes().items()):
        if cls.kind == "transform":
            cfg: dict = {"id": "pipeline", "transforms": [{"id": cid}], "encoder": {"id": "identity"}}
        else:
            cfg = {"id": cid}
            for pname, p in cls.params.items():
                if isinstance(p, CodecParam) and p.required:
                    cfg[pname] = [dict(inner)] if p.many else dict(inner)
        cands = [(cid, cfg)]
        if cls.kind == "bytes":
            cands.append((f"{cid}-in-pipeline", {"id": "pipeline", "encoder": {"id": "topk", "ratio": 0.1,
                                                                                "index": "delta"},
                                                  "bytes": [{"id": cid}]}))
        for name, c in cands:
            try:
                get_codec(copy.deepcopy(c))
            except Exception:  # noqa: BLE001 - a codec that needs more than defaults: skipped here
                continue
            out.append((name, c))
    out += [(f"recipe-{r}", {"id": r}) for r in sorted(recipes())]
    return out


def fuzz_cases(source: str = "auto") -> list[tuple[str, dict]]:
    """The codec cases to fuzz, as ``(name, config)``.

    ``source = "tests"``: ``codec_cases()`` of the checkout's ``tests/codecs/common.py`` (every
    registered codec and recipe plus hand-picked variants: index modes, byte codecs, ...);
    ``"registry"``: one generic case per id; ``"auto"``: tests when the checkout has them.
    """
    if source in ("auto", "tests") and _TESTS_COMMON.exists():
        mod = sys.modules.get("common")
        if mod is None or Path(getattr(mod, "__file__", "")).resolve() != _TESTS_COMMON:
            spec = importlib.util.spec_from_file_location("hpcfl_fuzz_codec_cases", _TESTS_COMMON)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod  # dataclasses look their module up
            spec.loader.exec_module(mod)
        return [(c.name, dict(c.config)) for c in mod.codec_cases(strict=False) if not c.error]
    if source == "tests":
        raise FileNotFoundError(f"{_TESTS_COMMON} not found (not a source checkout)")
    return _registry_cases()


class TargetSet:
    """Targets for every (case, layout, checksum) of a case list, built on first use and cached."""

    def __init__(self, cases: list[tuple[str, dict]]):
        if not cases:
            raise ValueError("no codec cases to fuzz")
        self.cases = cases
        self._built: dict[tuple[int, str, bool], Target] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def get(self, i: int, layout: str = "tensor", checksum: bool = False) -> Target:
        key = (i % len(self.cases), layout, bool(checksum))
        t = self._built.get(key)
        if t is None:
            tracing = tracemalloc.is_tracing()
            if tracing:  # building encodes whole rounds: ~10x slower under tracemalloc, and not measured
                tracemalloc.stop()
            try:
                t = self._built[key] = decode_target(self.cases[key[0]], layout, checksum=checksum)
            finally:
                if tracing:
                    tracemalloc.start()
        return t


_TARGETS: TargetSet | None = None


def targets(cases: list[tuple[str, dict]] | None = None) -> TargetSet:
    """The process-wide target set (built from :func:`fuzz_cases` unless ``cases`` is given)."""
    global _TARGETS
    if cases is not None:
        _TARGETS = TargetSet(cases)
    elif _TARGETS is None:
        _TARGETS = TargetSet(fuzz_cases())
    return _TARGETS


# ------------------------------------------------------------ input program

class _Reader:
    """Consumes an input from the front: little-endian integers, length-prefixed bytes."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def uint(self, nbytes: int) -> int:
        b = self.data[self.pos:self.pos + nbytes]
        self.pos += len(b)
        return int.from_bytes(b, "little")

    def sint(self, nbytes: int) -> int:
        v = self.uint(nbytes)
        return v - (1 << (8 * nbytes)) if v >> (8 * nbytes - 1) else v

    def blob(self, len_bytes: int = 1) -> bytes:
        n = self.uint(len_bytes)
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b

    def rest(self) -> bytes:
        b = self.data[self.pos:]
        self.pos = len(self.data)
        return b


def _interesting(r: _Reader) -> int:
    return INTERESTING[r.uint(1) % len(INTERESTING)]


def _read_op(r: _Reader) -> tuple:
    kind = OPS[r.uint(1) % len(OPS)]
    if kind == "part_data":
        return (kind, r.uint(1), r.blob(2))
    if kind == "part_meta":
        return (kind, r.uint(1), r.uint(1), r.uint(1))
    if kind == "part_drop":
        return (kind, r.uint(1))
    if kind == "part_add":
        return (kind, r.uint(1), r.uint(1), r.uint(1), r.uint(1), r.blob(1))
    if kind == "part_xor":
        return (kind, r.uint(1), r.uint(2), r.uint(1))
    if kind == "part_bomb":
        return (kind, r.uint(1), r.uint(1), r.uint(1) % 25, r.uint(1), r.uint(1) & 1)
    if kind == "tensor_meta":
        return (kind, r.uint(1), r.uint(1), _interesting(r) if r.uint(1) & 1 else r.uint(4))
    if kind == "tensor_shape":
        nd = r.uint(1) % 9
        return (kind, r.uint(1), tuple(_interesting(r) if r.uint(1) & 1 else r.uint(4) for _ in range(nd)))
    if kind == "tensor_drop":
        return (kind, r.uint(1))
    if kind == "tensor_swap":
        return (kind, r.uint(1), r.uint(1))
    if kind == "flip":
        return (kind, r.uint(2))
    if kind == "set_byte":
        return (kind, r.uint(2), r.uint(1))
    if kind == "field":
        return (kind, r.uint(1), _interesting(r) if r.uint(1) & 1 else r.uint(8))
    if kind == "field_rel":
        return (kind, r.uint(1), r.sint(2))
    if kind == "truncate":
        return (kind, r.uint(2))
    if kind == "extend":
        return (kind, r.blob(1))
    if kind == "insert":
        return (kind, r.uint(2), r.blob(1))
    return (kind, r.uint(2), r.uint(1))  # delete


MAX_OPS = 16


def parse_input(data: bytes, n_cases: int) -> tuple[int, str, bool, bool, bool, bytes | list[tuple]]:
    """``(case index, layout, checksum, raw, fix, message or ops)`` of one fuzz input."""
    r = _Reader(bytes(data))
    case = r.uint(2) % n_cases
    b = r.uint(1)
    layout = LAYOUT_NAMES[(b & 3) % len(LAYOUT_NAMES)]
    checksum, raw, fix = bool(b & 4), not (b >> 3) & 3, bool(b & 32)
    if raw:
        return case, layout, checksum, True, fix, r.rest()
    ops = []
    while r.remaining() and len(ops) < MAX_OPS:
        ops.append(_read_op(r))
    return case, layout, checksum, False, fix, ops


def run_input(data: bytes, tset: TargetSet | None = None) -> str:
    """Interpret one fuzz input (see the module docstring) and check the decode of the result."""
    tset = tset or targets()
    case, layout, checksum, raw, fix, body = parse_input(data, len(tset))
    t = tset.get(case, layout, checksum)
    if raw:
        return check_decode(t, body, strict=False)
    return check_decode(t, apply_ops(t, body, fix=fix), strict=True)


def test_one_input(data: bytes) -> None:
    """The atheris entry point: raises :class:`DecodeFailure` (a crash to libFuzzer) on a breach."""
    run_input(data)


test_one_input.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def encode_program(case: int, *, layout: str = "tensor", checksum: bool = False, raw: bool = False,
                   fix: bool = False, body: bytes = b"") -> bytes:
    """The input bytes selecting a target (inverse of :func:`parse_input`'s prefix)."""
    b = LAYOUT_NAMES.index(layout) | (4 if checksum else 0) | (0 if raw else 8) | (32 if fix else 0)
    return struct.pack("<HB", case, b) + body


def seed_inputs(tset: TargetSet, every_layout: bool = True) -> Iterable[tuple[str, bytes]]:
    """A starting corpus: every target's valid message, as a zero-op program and as raw bytes.

    ``every_layout=False``: only each case's ``tensor`` layout without CRC (the fuzzer reaches the
    others by mutating byte 2); a quarter of the targets to build, for short runs."""
    for i in range(len(tset)):
        for layout in LAYOUT_NAMES if every_layout else LAYOUT_NAMES[:1]:
            for crc in (False, True) if every_layout else (False,):
                yield f"seed-{i}-{layout}-{int(crc)}", encode_program(i, layout=layout, checksum=crc)
        yield f"seed-{i}-raw", encode_program(i, raw=True, body=tset.get(i).message)


# ---------------------------------------------------------------------- CLI

def _select(cases: list[tuple[str, dict]], codec: str | None) -> list[tuple[str, dict]]:
    if not codec:
        return cases
    from hpcfl.codecs import expand

    def ids(cfg) -> set[str]:
        out, stack = set(), [expand(copy.deepcopy(cfg))]
        while stack:
            c = stack.pop()
            if isinstance(c, dict):
                if isinstance(c.get("id"), str):
                    out.add(c["id"])
                stack += list(c.values())
            elif isinstance(c, list):
                stack += c
        return out

    sel = [(n, c) for n, c in cases if n == codec or n.startswith(codec + "-") or codec in ids(c)
           or n == f"recipe-{codec}"]
    if not sel:
        raise SystemExit(f"hpcfl.fuzz: no codec case matches {codec!r}; cases: {', '.join(n for n, _ in cases)}")
    return sel


def _write_seeds(tset: TargetSet, corpus: Path, every_layout: bool) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seed_inputs(tset, every_layout):
        p = corpus / name
        if not p.exists():
            p.write_bytes(data)


def _random_engine(tset: TargetSet, seconds: float, runs: int, seed: int) -> int:
    """Fallback without atheris: random programs and random raw bytes (not coverage-guided)."""
    import random

    rng = random.Random(seed)
    t_end = time.monotonic() + seconds
    n = 0
    counts = {"decoded": 0, "rejected": 0}
    while (runs <= 0 or n < runs) and (seconds <= 0 or time.monotonic() < t_end):
        t = tset.get(rng.randrange(len(tset)), rng.choice(LAYOUT_NAMES), rng.random() < 0.3)
        if rng.random() < 0.1:  # raw bytes: a prefix of the message, then noise
            data, strict = t.message[:rng.randrange(len(t.message) + 1)] + rng.randbytes(rng.randrange(64)), False
        else:
            data, strict = apply_ops(t, random_ops(rng, t), fix=rng.random() < 0.8), True
        try:
            counts[check_decode(t, data, strict=strict)] += 1
        except DecodeFailure as e:
            path = Path(f"crash-{zlib.crc32(data):08x}.hpfl")
            path.write_bytes(data)
            print(f"hpcfl.fuzz: {e}\nhpcfl.fuzz: message written to {path} (decode it against {t.name})",
                  file=sys.stderr)
            return 1
        n += 1
    print(f"hpcfl.fuzz: random engine, {n} inputs over {len(tset)} cases: {counts['decoded']} decoded, "
          f"{counts['rejected']} rejected, no failure", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpcfl.fuzz", description="Fuzz the wire decoder of every codec.")
    p.add_argument("--seconds", type=float, default=60.0, help="time budget (0 = unbounded)")
    p.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0 = unbounded)")
    p.add_argument("--codec", help="only cases whose name or expanded config involves this id or recipe")
    p.add_argument("--corpus", help="corpus directory: seeded, read and extended (default: a temporary one)")
    p.add_argument("--cases", choices=("auto", "tests", "registry"), default="auto",
                   help="where the codec cases come from (see fuzz_cases)")
    p.add_argument("--engine", choices=("atheris", "random"), default=None,
                   help="atheris (coverage-guided, the default when installed) or random")
    p.add_argument("--seed", type=int, default=1, help="fuzzer seed")
    p.add_argument("--seeds", choices=("all", "cases"), default="all",
                   help="starting corpus: every case x layout x CRC (all), or each case once (cases: "
                        "faster start for short runs)")
    p.add_argument("--reproduce", nargs="+", metavar="FILE", help="run these inputs once each and report")
    p.add_argument("--list", action="store_true", help="list the codec cases and exit")
    p.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags after --, e.g. -- -jobs=2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    engine = args.engine
    if engine is None:
        engine = "atheris" if importlib.util.find_spec("atheris") and not args.reproduce else "random"
    if engine == "atheris" and not args.reproduce and not args.list:
        import atheris

        if any(m.startswith("hpcfl.codecs") for m in sys.modules):
            print("hpcfl.fuzz: warning: hpcfl.codecs imported before instrumentation; coverage is partial",
                  file=sys.stderr)
        # instrument hpcfl (codecs, wire, errors, config, seeding) for coverage feedback
        with atheris.instrument_imports(include=["hpcfl"]):
            import hpcfl.codecs.catalog  # noqa: F401
            import hpcfl.codecs.update  # noqa: F401
            cases = fuzz_cases(args.cases)
    else:
        cases = fuzz_cases(args.cases)
    cases = _select(cases, args.codec)
    if args.list:
        for i, (n, c) in enumerate(cases):
            print(f"{i:3d} {n}")
        return 0
    tset = targets(cases)
    if args.reproduce:
        bad = 0
        for f in args.reproduce:
            try:
                print(f"{f}: {run_input(Path(f).read_bytes(), tset)}")
            except DecodeFailure as e:
                bad += 1
                print(f"{f}: FAIL {e}")
        return 1 if bad else 0
    if engine == "random":
        return _random_engine(tset, args.seconds, args.runs, args.seed)
    import tempfile

    tmp = None
    if args.corpus:
        corpus = Path(args.corpus)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="hpcfl-fuzz-")
        corpus = Path(tmp.name)
    t0 = time.perf_counter()
    for i in range(len(tset)):  # build every target now: coverage then counts decoding only
        for layout in LAYOUT_NAMES:
            for crc in (False, True):
                tset.get(i, layout, crc)
    print(f"hpcfl.fuzz: built {len(tset) * len(LAYOUT_NAMES) * 2} targets in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    _write_seeds(tset, corpus, args.seeds == "all")
    flags = [f"-seed={args.seed}", "-timeout=10", "-rss_limit_mb=4096", "-max_len=4096",
             "-print_final_stats=1", "-artifact_prefix=" + os.path.join(os.getcwd(), "")]
    if args.seconds > 0:
        flags.append(f"-max_total_time={max(1, int(args.seconds))}")
    if args.runs > 0:
        flags.append(f"-runs={args.runs}")
    print(f"hpcfl.fuzz: {len(tset)} codec cases x {len(LAYOUT_NAMES)} layouts x crc on/off; corpus {corpus}",
          file=sys.stderr, flush=True)
    atheris.Setup([sys.argv[0], *flags, *args.libfuzzer, str(corpus)], test_one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


if __name__ == "__main__":
    raise SystemExit(main())
