"""``hpcfl codecs`` (list) and ``hpcfl codec roundtrip|encode|decode`` (inspect one codec).

Tensors come from ``.npy`` (one array, named ``x``) or ``.npz`` (a model update as
named arrays); results are written in the same format, and an output whose
suffix names another format is refused (never silently renamed). A SPEC is a
recipe or codec id (``topk_ef``), a JSON config (``'{"id": "topk", "ratio": 0.01}'``)
or ``@file.json``. Every usage error, including argument errors and unreadable or
unwritable paths, exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

import numpy as np

from hpcfl.cli import register
from hpcfl.errors import UsageError, WireFormatError

if TYPE_CHECKING:
    from hpcfl.codecs.wire import Message

MAX_ELEMENTS = 2**28  # default cap of `codec decode` without --like/--run: 1 GiB of float32


def _one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Argument errors as one line and exit 2 (argparse would print the usage block too)."""
    def error(message: str) -> NoReturn:
        p.exit(2, f"{p.prog}: error: {message}\n")
    p.error = error  # type: ignore[method-assign]
    return p


def int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int in ``[lo, hi]``, else an error naming the range and why."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside [{lo}, {hi}] ({what})")
        return v
    return parse


U32 = int_in(0, 2**32 - 1, "a u32 field of the wire header")


@register("codecs", "list every codec and recipe with its parameters and defaults")
def add_codecs(p: argparse.ArgumentParser) -> None:
    _one_line_errors(p)
    p.add_argument("--json", action="store_true", help="machine-readable description")


@register("codec", "encode/decode tensors with one codec: roundtrip, encode, decode")
def add_codec(p: argparse.ArgumentParser) -> None:
    _one_line_errors(p)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--codec", required=False, metavar="SPEC", help="recipe/codec id, JSON config or @file")
    common.add_argument("--routing", metavar="JSON", help="routing policy (default: every tensor lossy)")
    common.add_argument("--seed", type=int_in(-2**63, 2**63 - 1, "a signed 64-bit seed"), default=0,
                        help="job seed for derived seeds")
    common.add_argument("--client", type=U32, default=0)
    common.add_argument("--json", action="store_true", help="print metrics as JSON")
    rt = _one_line_errors(sub.add_parser("roundtrip", parents=[common],
                                         help="encode then decode; print sizes, errors, times"))
    rt.add_argument("input", help=".npy or .npz")
    rt.add_argument("output", help="decoded result, same format (same suffix)")
    rt.add_argument("--rounds", type=int_in(1, 2**32 - 1, "the round is a u32 wire field"), default=1,
                    help="repeat N rounds with persistent codec state")
    en = _one_line_errors(sub.add_parser("encode", parents=[common], help="write the wire message for one update"))
    en.add_argument("input")
    en.add_argument("message")
    en.add_argument("--round", type=U32, default=0)
    de = _one_line_errors(sub.add_parser("decode", parents=[common],
                                         help="decode a wire message (e.g. saved by a run)"))
    de.add_argument("message")
    de.add_argument("output", help=".npz (or .npy for one tensor; with --like: the format of that file)")
    de.add_argument("--round", type=U32, default=None, help="expected round (default: the message's)")
    de.add_argument("--like", help=".npy/.npz whose names and shapes define the tensor table")
    de.add_argument("--run", help="run file: take codec, routing, tensor table and seed from it")
    de.add_argument("--max-elements", type=int_in(1, 2**62, "elements"), default=MAX_ELEMENTS,
                    help="without --like/--run, refuse a message whose shapes declare more elements in "
                         "total (default 2**28)")


def run(args: argparse.Namespace) -> int:
    if args.command == "codecs":
        return _list(args)
    return {"roundtrip": _roundtrip, "encode": _encode, "decode": _decode}[args.action](args)


# ------------------------------------------------------------------ helpers

def parse_spec(spec: str | None) -> dict:
    if not spec:
        raise UsageError("--codec SPEC is required (a recipe or codec id, JSON config, or @file.json)")
    text = spec
    if spec.startswith("@"):
        try:
            text = Path(spec[1:]).read_text()
        except OSError as e:
            raise UsageError(f"cannot read codec spec {spec[1:]}: {e.strerror}") from None
    text = text.strip()
    if text.startswith("{"):
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--codec is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise UsageError("--codec JSON must be an object with an 'id'")
        return cfg
    return {"id": text}


def _routing(text: str | None) -> dict:
    if not text:
        return {"scope": "tensor"}
    try:
        r = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--routing is not valid JSON: {e}") from None
    from hpcfl.config import job_from_dict

    job_from_dict({"routing": r})  # schema check, names the bad key
    return r


def load_tensors(path: str) -> tuple[dict[str, np.ndarray], bool]:
    """Arrays by name, and whether the file was a single ``.npy``."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no such file: {p}")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            single = False
        elif p.suffix == ".npy":
            arrays = {"x": np.load(p, allow_pickle=False)}
            single = True
        else:
            raise UsageError(f"{p}: expected a .npy or .npz file")
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{p}: not a readable numpy file ({e})") from None
    if not arrays:
        raise UsageError(f"{p}: holds no arrays")
    for k, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise UsageError(f"{p}: array {k!r} has dtype {a.dtype}; codecs take floating-point tensors")
        if not np.isfinite(a).all():
            raise UsageError(f"{p}: array {k!r} holds NaN or inf")
    return arrays, single


def output_path(path: str, single: bool, source: str) -> Path:
    """The output file; its suffix must name the format of ``source`` (never silently changed)."""
    p = Path(path)
    want = ".npy" if single else ".npz"
    if p.suffix != want:
        raise UsageError(f"{p}: the output must end in {want}, the format of {source}")
    if p.is_dir() or not p.parent.is_dir():  # fail before the work (write errors are caught too)
        raise UsageError(f"cannot write {p}: {'is a directory' if p.is_dir() else 'no such directory'}")
    return p


def save_tensors(p: Path, arrays: dict[str, np.ndarray], single: bool) -> None:
    try:
        if single:
            np.save(p, next(iter(arrays.values())))
        else:
            np.savez(p, **arrays)
    except OSError as e:
        raise UsageError(f"cannot write {p}: {e.strerror or e}") from None


def read_bytes(p: Path, what: str) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {what} {p}: {e.strerror or e}") from None


def write_bytes(p: Path, data: bytes, what: str) -> None:
    try:
        p.write_bytes(data)
    except OSError as e:
        raise UsageError(f"cannot write {what} {p}: {e.strerror or e}") from None


def check_declared_size(msg: Message, limit: int) -> None:
    """Refuse a message whose own shapes declare more than ``limit`` elements in total,
    before anything of that size is allocated. The offsets follow docs/wire.md: a
    40-byte fixed header, then per tensor 9 bytes, 4 per dimension and 11 per part."""
    total, off = 0, 40
    for ti, t in enumerate(msg.tensors):
        total += math.prod(t.shape)
        if total > limit:
            raise WireFormatError(f"tensor[{ti}].shape", off + 9, f"shape {tuple(t.shape)} brings the declared "
                                  f"total to {total} elements, above --max-elements {limit}: pass --like or "
                                  "--run, or raise --max-elements")
        off += 9 + 4 * len(t.shape) + 11 * len(t.parts)


def _update_codec(cfg: dict, routing: dict, arrays_or_table, seed: int):
    from hpcfl.codecs import UpdateCodec

    table = arrays_or_table if isinstance(arrays_or_table, list) else \
        [(k, a.shape) for k, a in arrays_or_table.items()]
    return UpdateCodec(cfg, routing, table, seed=seed)


def _metrics(x: dict, y: dict) -> dict:
    num = den = dot = yy = 0.0
    mx = 0.0
    for k, a in x.items():
        a64 = a.astype(np.float64).ravel()
        b64 = y[k].astype(np.float64).ravel()
        d = a64 - b64
        if d.size:
            mx = max(mx, float(np.abs(d).max()))
        num += float(d @ d)
        den += float(a64 @ a64)
        dot += float(a64 @ b64)
        yy += float(b64 @ b64)
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    cos = dot / math.sqrt(den * yy) if den > 0 and yy > 0 else (1.0 if num == 0 else 0.0)
    return {"max_abs_error": mx, "rel_l2_error": rel, "cosine": cos}


def _print(rec: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rec))
        return
    print(f"round {rec['round']}: {rec['message_bytes']} B on the wire (payload {rec['payload_bytes']}, "
          f"header {rec['header_bytes']}) for {rec['raw_bytes']} B raw, ratio {rec['ratio']:.3f}x; "
          f"max|err| {rec['max_abs_error']:.3g}, rel L2 {rec['rel_l2_error']:.3g}, cos {rec['cosine']:.6f}; "
          f"encode {rec['encode_s'] * 1e3:.3f} ms, decode {rec['decode_s'] * 1e3:.3f} ms")


# ----------------------------------------------------------------- commands

def _list(args) -> int:
    from hpcfl.codecs import codec_classes, recipes

    rows = []
    for cid, cls in sorted(codec_classes().items()):
        params = {}
        for k, p in cls.params.items():
            params[k] = {"default": getattr(p, "default", None), "doc": p.doc,
                         "allowed": p.describe_allowed() if hasattr(p, "describe_allowed") else "codec table"}
        rows.append({"id": cid, "kind": cls.kind, "summary": cls.summary, "params": params})
    recs = [{"id": r.name, "kind": "recipe", "summary": r.doc,
             "params": {k: {"default": v} for k, v in r.params.items()},
             "expands_to": r.build(dict(r.params))} for r in sorted(recipes().values(), key=lambda r: r.name)]
    if args.json:
        print(json.dumps(rows + recs, indent=1, default=str))
        return 0
    for r in rows + recs:
        print(f"{r['id']:<14} {r['kind']:<9} {r['summary']}")
        for k, p in r["params"].items():
            extra = f"  ({p['allowed']}) {p['doc']}" if "doc" in p else ""
            print(f"{'':<16}{k} = {json.dumps(p['default'], default=str)}{extra}")
    return 0


def _roundtrip(args) -> int:
    import torch

    from hpcfl.codecs import CodecState

    torch.set_num_threads(1)
    cfg = parse_spec(args.codec)
    arrays, single = load_tensors(args.input)
    output = output_path(args.output, single, f"the input {args.input}")
    uc = _update_codec(cfg, _routing(args.routing), arrays, args.seed)
    update = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in arrays.items()}
    cstate, rstate = CodecState(), CodecState()
    out = None
    for r in range(args.rounds):
        t0 = time.perf_counter()
        enc = uc.encode(update, client=args.client, round=r, state=cstate)
        t1 = time.perf_counter()
        dec = uc.decode(enc.data, client=args.client, round=r, state=rstate)
        t2 = time.perf_counter()
        out = {k: dec.update[k].numpy().astype(arrays[k].dtype, copy=False) for k in arrays}
        rec = {"round": r, "codec": uc.codec.get_config(), "raw_bytes": enc.raw_bytes,
               "payload_bytes": enc.payload_bytes, "header_bytes": enc.header_bytes,
               "message_bytes": len(enc.data), "ratio": enc.raw_bytes / len(enc.data),
               **_metrics(arrays, out), "encode_s": t1 - t0, "decode_s": t2 - t1}
        _print(rec, args.json)
    save_tensors(output, out, single)
    return 0


def _encode(args) -> int:
    import torch

    from hpcfl.codecs import CodecState

    cfg = parse_spec(args.codec)
    arrays, _ = load_tensors(args.input)
    uc = _update_codec(cfg, _routing(args.routing), arrays, args.seed)
    update = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in arrays.items()}
    enc = uc.encode(update, client=args.client, round=args.round, state=CodecState())
    write_bytes(Path(args.message), enc.data, "message")
    rec = {"message": args.message, "message_bytes": len(enc.data), "payload_bytes": enc.payload_bytes,
           "header_bytes": enc.header_bytes, "raw_bytes": enc.raw_bytes}
    print(json.dumps(rec) if args.json else f"wrote {args.message}: {len(enc.data)} B "
          f"(payload {enc.payload_bytes}, header {enc.header_bytes}) for {enc.raw_bytes} B raw")
    return 0


def _decode(args) -> int:
    from hpcfl.codecs import CodecState
    from hpcfl.codecs.wire import unpack

    p = Path(args.message)
    if not p.exists():
        raise UsageError(f"no such message file: {p}")
    data = read_bytes(p, "message")
    seed = args.seed
    if args.run:
        from hpcfl.results import load_run

        try:
            run = load_run(args.run)
        except UsageError as e:  # HDF5's messages can span lines
            raise UsageError(" ".join(str(e).split())) from None
        cc = run.codec
        table = [(n, tuple(s)) for n, s in json.loads(run.attrs["param_table_json"])]
        cfg = parse_spec(args.codec) if args.codec else cc["codec"]
        routing = {**cc["routing"], "dense": cc["dense"]}
        seed, single = int(run.attrs["seed"]), False
        output = output_path(args.output, single, f"a run's update (named arrays, like {args.run})")
    else:
        cfg = parse_spec(args.codec)
        routing = _routing(args.routing)
        if args.like:
            like, single = load_tensors(args.like)
            output = output_path(args.output, single, f"--like {args.like}")
            table = [(k, a.shape) for k, a in like.items()]
        else:  # names and shapes from the message's own table of contents, sizes capped first
            msg = unpack(data)
            check_declared_size(msg, args.max_elements)
            table = [(f"t{t.index}", t.shape) for t in sorted(msg.tensors, key=lambda t: t.index)]
            single = Path(args.output).suffix == ".npy" and len(table) == 1
            output = output_path(args.output, single, "the message's tensors (.npz; .npy for one tensor)")
    msg = unpack(data)
    uc = _update_codec(cfg, routing, table, seed)
    rnd = msg.round if args.round is None else args.round
    # names unknown without --like/--run: the codec hash (which covers them) cannot be checked
    dec = uc.decode(data, client=msg.sender, round=rnd, state=CodecState(),
                    verify_hash=bool(args.run or args.like))
    arrays = {k: v.numpy() for k, v in dec.update.items()}
    save_tensors(output, arrays, single)
    rec = {"output": args.output, "round": msg.round, "client": msg.sender, "message_bytes": len(data),
           "payload_bytes": dec.payload_bytes, "header_bytes": dec.header_bytes}
    print(json.dumps(rec) if args.json else f"decoded round {msg.round}, client {msg.sender} "
          f"({len(data)} B) -> {args.output}")
    return 0
