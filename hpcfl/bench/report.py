"""Output of ``hpcfl bench``: provenance, a text table, HDF5 and JSON.

The HDF5 file holds one compound table per action (``/codecs``) with
``units_json`` and ``doc_json`` attributes, and the same provenance root
attributes as a run file (``hpcfl_version``, ``versions_json``, ``git_commit``,
``command``, ``created``) plus ``hostname`` and the load average.
"""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hpcfl.errors import UsageError

__all__ = ["CODEC_FIELDS", "provenance_attrs", "format_codec_table", "format_codec_markdown", "write_h5", "to_json"]

# name -> (HDF5 dtype, unit, meaning); "str" means a variable-length UTF-8 string.
CODEC_FIELDS: dict[str, tuple[str, str, str]] = {
    "codec": ("str", "", "Codec label (id, recipe, or id(params)); baselines: memcpy, torch.clone, torch.topk."),
    "kind": ("str", "", "'codec' or 'baseline'."),
    "config_json": ("str", "", "Expanded codec config."),
    "data": ("str", "", "Test tensor kind (gaussian, heavy, lowrank, real)."),
    "n": ("i8", "1", "Elements of the float32 test tensor."),
    "shape": ("str", "", "Shape the codec saw (rows x cols)."),
    "raw_bytes": ("i8", "B", "4 x n."),
    "message_bytes": ("i8", "B", "Wire message length (payload + header) of round 0."),
    "payload_bytes": ("i8", "B", "The codec's parts."),
    "header_bytes": ("i8", "B", "Fixed header, tables, padding."),
    "ratio": ("f8", "x", "raw_bytes / message_bytes."),
    "encode_min_s": ("f8", "s", "Fastest encode sample (UpdateCodec.encode incl. packing), per call."),
    "encode_median_s": ("f8", "s", "Median encode sample, per call."),
    "encode_max_s": ("f8", "s", "Slowest encode sample, per call."),
    "decode_min_s": ("f8", "s", "Fastest decode sample (unpack, validate, decode), per call."),
    "decode_median_s": ("f8", "s", "Median decode sample, per call."),
    "decode_max_s": ("f8", "s", "Slowest decode sample, per call."),
    "encode_number": ("i8", "1", "Calls per encode sample."),
    "decode_number": ("i8", "1", "Calls per decode sample."),
    "repeat": ("i8", "1", "Samples per statistic."),
    "memcpy_s": ("f8", "s", "Fastest np.copyto of the same tensor into a preallocated buffer, same run."),
    "clone_s": ("f8", "s", "Fastest torch.clone of the same tensor, same run."),
    "encode_MBps": ("f8", "MB/s", "raw_bytes / encode_min_s / 1e6."),
    "decode_MBps": ("f8", "MB/s", "raw_bytes / decode_min_s / 1e6."),
    "encode_vs_memcpy": ("f8", "1", "memcpy_s / encode_min_s (1 = as fast as memcpy)."),
    "decode_vs_memcpy": ("f8", "1", "memcpy_s / decode_min_s."),
    "max_abs_error": ("f8", "1", "max |x - decode(encode(x))|, round 0."),
    "rel_l2_error": ("f8", "1", "||x - decode(encode(x))|| / ||x||, round 0."),
    "breakeven_MBps": ("f8", "MB/s", "Link bandwidth below which compressing pays: "
                       "S (1 - 1/R) / (t_enc + t_dec), fastest samples; NaN if R <= 1."),
    "breakeven_Gbps": ("f8", "Gbit/s", "breakeven_MBps x 8 / 1000."),
}


def provenance_attrs(**extra: Any) -> dict[str, Any]:
    """Root attributes shared with run files, plus host facts and ``extra``."""
    from hpcfl.run import provenance

    v = provenance.versions()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"hpcfl_version": v["hpcfl"], "versions_json": provenance.as_json(v),
            "git_commit": provenance.git_commit(), "command": provenance.command_line(),
            "hostname": socket.gethostname(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count() or 0, "loadavg_start": np.array(load, dtype=np.float64), **extra}


def _fmt(v: float) -> str:
    """3 significant digits; thousands separators from 1,000; scientific below 0.01."""
    if v is None or math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


def _time(s: float) -> str:
    if math.isnan(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _size(n: int) -> str:
    for unit, m in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def format_codec_table(records: Sequence[Mapping]) -> str:
    """Fixed-width text table; times are the fastest sample."""
    head = ("size", "codec", "ratio", "encode", "decode", "enc MB/s", "dec MB/s", "enc/cpy", "max|err|",
            "rel L2", "B* Gbit/s")
    rows = [head]
    for r in records:
        be = "never" if r["kind"] == "codec" and not r["ratio"] > 1 else _fmt(r["breakeven_Gbps"])
        rows.append((_size(r["n"]), r["codec"][:34], _fmt(r["ratio"]), _time(r["encode_min_s"]),
                     _time(r["decode_min_s"]), _fmt(r["encode_MBps"]), _fmt(r["decode_MBps"]),
                     f"{100 * r['encode_vs_memcpy']:.1f}%", _fmt(r["max_abs_error"]), _fmt(r["rel_l2_error"]),
                     be))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_codec_markdown(records: Sequence[Mapping]) -> str:
    """Markdown tables, one per tensor size (for docs generated from a real run)."""
    out = []
    for n in sorted({r["n"] for r in records}, reverse=True):
        rows = [r for r in records if r["n"] == n]
        out += [f"### {_size(n)} elements ({4 * n:,} bytes of float32)", "",
                "| codec | ratio | encode | decode | encode MB/s | decode MB/s | encode % memcpy | "
                "max abs err | rel L2 err | B* Gbit/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            be = "never" if r["kind"] == "codec" and not r["ratio"] > 1 else _fmt(r["breakeven_Gbps"])
            out.append(f"| {r['codec']} | {_fmt(r['ratio'])} | {_time(r['encode_min_s'])} | "
                       f"{_time(r['decode_min_s'])} | {_fmt(r['encode_MBps'])} | {_fmt(r['decode_MBps'])} | "
                       f"{100 * r['encode_vs_memcpy']:.1f}% | {_fmt(r['max_abs_error'])} | "
                       f"{_fmt(r['rel_l2_error'])} | {be} |")
        out.append("")
    return "\n".join(out)


def _h5_dtype(fields: Mapping[str, tuple[str, str, str]]) -> np.dtype:
    import h5py

    return np.dtype([(k, h5py.string_dtype() if t == "str" else t) for k, (t, _, _) in fields.items()])


def write_h5(path: str | os.PathLike, table: str, records: Sequence[Mapping],
             fields: Mapping[str, tuple[str, str, str]], attrs: Mapping[str, Any], *,
             overwrite: bool = False) -> Path:
    """Write ``records`` as the compound dataset ``/table`` with root ``attrs``."""
    import h5py

    p = Path(path)
    if p.exists() and not overwrite:
        raise UsageError(f"{p} exists; pass --overwrite or choose another --out")
    p.parent.mkdir(parents=True, exist_ok=True)
    dt = _h5_dtype(fields)
    arr = np.zeros(len(records), dtype=dt)
    for i, r in enumerate(records):
        arr[i] = tuple(r[k] for k in fields)
    try:
        f = h5py.File(p, "w")
    except OSError as e:
        raise UsageError(f"cannot write {p}: {e}") from None
    with f:
        for k, v in attrs.items():
            f.attrs[k] = v
        if hasattr(os, "getloadavg"):
            f.attrs["loadavg_end"] = np.array(os.getloadavg(), dtype=np.float64)
        d = f.create_dataset(table, data=arr)
        d.attrs["units_json"] = json.dumps({k: u for k, (_, u, _) in fields.items()})
        d.attrs["doc_json"] = json.dumps({k: doc for k, (_, _, doc) in fields.items()})
    return p


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.ndarray):
        return [_clean(float(x)) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def to_json(records: Sequence[Mapping], attrs: Mapping[str, Any]) -> str:
    """Strict JSON (NaN and inf become null): ``{"attrs": {...}, "records": [...]}``."""
    return json.dumps({"attrs": {k: _clean(v) for k, v in attrs.items()},
                       "records": [{k: _clean(v) for k, v in r.items()} for r in records]})
