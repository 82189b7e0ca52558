"""Single-thread codec micro-benchmark: speed, size and error of every codec.

For each tensor size and codec, :func:`bench_codecs` encodes and decodes
through :class:`~hpcfl.codecs.UpdateCodec` (so the bytes are the real wire
message, header included) with one persistent client state and one root state,
exactly as in a run: round ``r`` is encoded, then decoded, in order. Errors
come from round 0 (fresh state); times from ``repeat`` later samples. In the
same run and on the same tensor it times a memcpy (``np.copyto`` into a
preallocated buffer) and a ``torch.clone`` as the reference, plus a
``torch.topk`` baseline when a top-k codec is selected.

Break-even link bandwidth (landscape.md §4.3): sending ``S`` raw bytes
compressed ``R``-fold pays when ``t_enc + t_dec + S/(R B) < S/B``, i.e. below
``B* = S (1 - 1/R) / (t_enc + t_dec)``. ``B*`` is NaN when ``R <= 1`` (it never
pays). Derived figures (MB/s, share of memcpy, ``B*``) use the fastest sample.
"""

from __future__ import annotations

import gc
import json
import math
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from hpcfl.bench.data import make_tensor, matrix_shape
from hpcfl.bench.timing import Stats, pick_number, time_calls

__all__ = ["DEFAULT_SIZES", "TOPK_BASELINE_RATIO", "all_specs", "resolve_specs", "bench_codecs", "breakeven",
           "errors", "routing_for"]

DEFAULT_SIZES = (1024, 65536, 1048576, 16777216)
TOPK_BASELINE_RATIO = 0.01
_ROUTING = {"scope": "tensor"}

Spec = tuple[str, dict]  # (label, codec config)


def routing_for(cfg: Mapping) -> dict:
    """``routing.scope = "tensor"``, or the scope the codec requires (igc codes the whole model: "model";
    with the benchmarks' single tensor both scopes code the same numbers, the model scope flattened)."""
    from hpcfl.codecs import get_codec

    return {"scope": get_codec(dict(cfg)).required_scope or _ROUTING["scope"]}


def all_specs() -> list[Spec]:
    """Every codec that runs on its own with default parameters, then every recipe.

    Encoders and byte codecs, plus wrappers whose defaults name an inner codec (``lbgm``
    wraps ``identity``; ``ef`` has no default inner codec and appears through recipes).
    """
    from hpcfl.codecs import codec_classes, get_codec, recipes
    from hpcfl.errors import ConfigError

    def runs_alone(cid: str, kind: str) -> bool:
        if kind in ("encoder", "bytes"):
            return True
        if kind != "wrapper":
            return False
        try:
            get_codec({"id": cid})
        except ConfigError:
            return False
        return True

    out = [(cid, {"id": cid}) for cid, cls in sorted(codec_classes().items()) if runs_alone(cid, cls.kind)]
    return out + [(name, {"id": name}) for name in sorted(recipes())]


def _label(cfg: Mapping) -> str:
    rest = {k: v for k, v in cfg.items() if k != "id"}
    if not rest:
        return str(cfg["id"])
    return f"{cfg['id']}(" + ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in rest.items()) + ")"


def resolve_specs(items: Iterable[str | Mapping]) -> list[Spec]:
    """Labels and configs for ids, recipe names or config dicts; ``"all"`` expands.

    Each config is built once, so an unknown id or bad parameter raises
    :class:`~hpcfl.errors.ConfigError` here, before anything is timed.
    """
    from hpcfl.codecs import UpdateCodec, get_codec

    out: list[Spec] = []
    for i, it in enumerate(items):
        if it == "all":
            out += all_specs()
            continue
        cfg = {"id": it} if isinstance(it, str) else dict(it)
        get_codec(cfg, key=f"codecs[{i}]")  # names the bad entry
        out.append((_label(cfg), cfg))
    for _, cfg in out:
        UpdateCodec(cfg, routing_for(cfg), [("x", (4, 4))])  # transforms and other misfits
    return out


def breakeven(raw_bytes: float, ratio: float, seconds: float) -> float:
    """Link bandwidth (bytes/s) below which compressing pays; NaN if ``ratio <= 1``."""
    if not ratio > 1 or math.isnan(seconds):
        return math.nan
    if seconds <= 0:
        return math.inf
    return raw_bytes * (1.0 - 1.0 / ratio) / seconds


def errors(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``max |x - y|`` and ``||x - y|| / ||x||`` (float64; 0/0 counts as 0)."""
    xd = np.asarray(x, np.float64).reshape(-1)
    d = np.asarray(y, np.float64).reshape(-1) - xd
    if d.size == 0:
        return 0.0, 0.0
    num, den = float(d @ d), float(xd @ xd)
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return float(np.abs(d).max()), rel


def _timed_rounds(uc, x: torch.Tensor, repeat: int, warmup: int) -> tuple[Stats, Stats, np.ndarray, int, int]:
    """Encode round r then decode it, in order.

    Returns encode and decode stats, then round 0's decoded tensor, message
    bytes and payload bytes.
    """
    from hpcfl.codecs import CodecState

    cs, rs = CodecState(), CodecState()
    upd = {"x": x}
    rnd = 0

    def batch(number: int):
        nonlocal rnd
        msgs = []
        t0 = time.perf_counter()
        for j in range(number):
            msgs.append(uc.encode(upd, client=0, round=rnd + j, state=cs))
        t1 = time.perf_counter()
        for j in range(number):
            dec = uc.decode(msgs[j].data, client=0, round=rnd + j, state=rs)
        t2 = time.perf_counter()
        rnd += number
        return (t1 - t0) / number, (t2 - t1) / number, msgs[-1], dec.update

    _, _, msg, first = batch(1)  # round 0: fresh state, defines sizes and errors
    y0 = first["x"].numpy().copy()
    te = td = math.inf
    for _ in range(max(1, warmup)):
        e, d, _, _ = batch(1)
        te, td = min(te, e), min(td, d)
    number = pick_number(min(te, td))
    enc, dec = [], []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(1, repeat)):
            e, d, _, _ = batch(number)
            enc.append(e)
            dec.append(d)
    finally:
        if gc_was:
            gc.enable()
    return Stats.of(enc, number), Stats.of(dec, number), y0, len(msg.data), msg.payload_bytes


def _topk_baseline(x: torch.Tensor, repeat: int, warmup: int) -> tuple[Stats, Stats, np.ndarray, int]:
    """``torch.topk(|x|, k, sorted=False)`` + value gather; decode scatters into zeros."""
    from hpcfl.codecs.sparsify import count_for

    xf = x.reshape(-1)
    n = xf.numel()
    k = count_for(n, TOPK_BASELINE_RATIO)

    def enc() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.topk(xf.abs(), k, sorted=False).indices
        return idx.to(torch.int32), xf[idx]

    idx, vals = enc()

    def dec() -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.float32)
        out[idx.long()] = vals
        return out

    es = time_calls(enc, repeat=repeat, warmup=warmup)
    ds = time_calls(dec, repeat=repeat, warmup=warmup)
    return es, ds, dec().numpy(), 8 * k


def _record(label: str, kind: str, cfg: Mapping | None, data: str, a: np.ndarray, enc: Stats, dec: Stats,
            y: np.ndarray | None, message_bytes: int, payload: int, memcpy: Stats, clone: Stats) -> dict:
    raw = a.nbytes
    ratio = raw / message_bytes if message_bytes else math.inf
    max_abs, rel = errors(a, y) if y is not None else (0.0, 0.0)
    t = enc.min + (0.0 if math.isnan(dec.min) else dec.min)
    be = breakeven(raw, ratio, t)
    mbps = (lambda s: raw / s / 1e6 if s > 0 else (math.nan if math.isnan(s) else math.inf))
    return {
        "codec": label, "kind": kind, "config_json": json.dumps(cfg or {}, sort_keys=True), "data": data,
        "n": int(a.size), "shape": "x".join(map(str, a.shape)), "raw_bytes": int(raw),
        "message_bytes": int(message_bytes), "payload_bytes": int(payload),
        "header_bytes": int(message_bytes - payload), "ratio": ratio,
        "encode_min_s": enc.min, "encode_median_s": enc.median, "encode_max_s": enc.max,
        "decode_min_s": dec.min, "decode_median_s": dec.median, "decode_max_s": dec.max,
        "encode_number": enc.number, "decode_number": dec.number, "repeat": enc.repeat,
        "memcpy_s": memcpy.min, "clone_s": clone.min,
        "encode_MBps": mbps(enc.min), "decode_MBps": mbps(dec.min),
        "encode_vs_memcpy": memcpy.min / enc.min, "decode_vs_memcpy": memcpy.min / dec.min,
        "max_abs_error": max_abs, "rel_l2_error": rel,
        "breakeven_MBps": be / 1e6, "breakeven_Gbps": be * 8 / 1e9,
    }


def _wants_topk(specs: Sequence[Spec]) -> bool:
    from hpcfl.codecs import expand

    return any('"id": "topk"' in json.dumps(expand(cfg)) for _, cfg in specs)


def bench_codecs(specs: Sequence[str | Mapping] | Sequence[Spec], sizes: Sequence[int] = DEFAULT_SIZES, *,
                 data: str = "gaussian", repeat: int = 5, warmup: int = 1, seed: int = 0,
                 baselines: bool = True, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Benchmark ``specs`` on ``data`` tensors of each size; one record (dict) per (size, codec).

    ``specs`` are ids/recipes/configs (see :func:`resolve_specs`) or resolved
    ``(label, config)`` pairs. Runs with ``torch.set_num_threads(1)``
    (restored afterwards). Baseline rows (``kind == "baseline"``): memcpy,
    torch.clone and, with a top-k codec among ``specs``, torch.topk at 1%.
    """
    from hpcfl.codecs import UpdateCodec

    resolved: list[Spec] = (list(specs) if all(isinstance(s, tuple) for s in specs)  # type: ignore[arg-type]
                            else resolve_specs(specs))  # type: ignore[arg-type]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    records: list[dict] = []

    def emit(rec: dict) -> None:
        records.append(rec)
        if progress is not None:
            progress(rec)

    try:
        for n in sizes:
            a = make_tensor(data, int(n), seed)
            x = torch.from_numpy(a.copy())
            dst = np.empty_like(a)
            memcpy = time_calls(lambda: np.copyto(dst, a), repeat=repeat, warmup=warmup)
            clone = time_calls(lambda: x.clone(), repeat=repeat, warmup=warmup)
            if baselines:
                none = Stats.nan()
                emit(_record("memcpy", "baseline", None, data, a, memcpy, none, None, a.nbytes, a.nbytes,
                             memcpy, clone))
                emit(_record("torch.clone", "baseline", None, data, a, clone, none, None, a.nbytes, a.nbytes,
                             memcpy, clone))
                if _wants_topk(resolved):
                    es, ds, y, nb = _topk_baseline(x, repeat, warmup)
                    emit(_record("torch.topk", "baseline", {"id": "torch.topk", "ratio": TOPK_BASELINE_RATIO},
                                 data, a, es, ds, y.reshape(a.shape), nb, nb, memcpy, clone))
            for label, cfg in resolved:
                uc = UpdateCodec(cfg, routing_for(cfg), [("x", matrix_shape(int(n)))])
                es, ds, y, nb, payload = _timed_rounds(uc, x, repeat, warmup)
                emit(_record(label, "codec", uc.codec.get_config(), data, a, es, ds, y, nb, payload,
                             memcpy, clone))
                del uc
    finally:
        torch.set_num_threads(threads)
    return records
