"""``hpcfl report``: a human summary of one or more run files."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpcfl.results.reader import Run

__all__ = ["summarize", "format_summary", "format_per_bit", "format_calibration", "PHASES"]

PHASES = ("bcast_s", "wait_s", "gather_s", "records_s", "decode_s", "aggregate_s", "eval_s", "overhead_s")


def _nanmax(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.max()) if a.size else math.nan


def summarize(run: Run) -> dict[str, Any]:
    """Key figures of a run as a JSON-able dict."""
    r = run.rounds
    acc = r["accuracy"] if r.size else np.zeros(0)
    evaluated = ~np.isnan(acc)
    s: dict[str, Any] = {
        "path": str(run.path),
        "name": run.job.get("run", {}).get("name", ""),
        "status": run.status,
        "rounds": run.n_rounds,
        "codec": run.codec.get("codec", {}).get("id", ""),
        "final_accuracy": float(acc[evaluated][-1]) if evaluated.any() else math.nan,
        "best_accuracy": _nanmax(acc),
        "final_loss": float(r["loss"][evaluated][-1]) if evaluated.any() else math.nan,
        "uplink_bytes": int(r["uplink_bytes"].sum()) if r.size else 0,
        "payload_bytes": int(r["payload_bytes"].sum()) if r.size else 0,
        "header_bytes": int(r["header_bytes"].sum()) if r.size else 0,
        "raw_bytes": int(r["raw_bytes"].sum()) if r.size else 0,
        "downlink_bytes": int(r["downlink_bytes"].sum()) if r.size else 0,
        "wall_s": float(r["wall_time"][-1]) if r.size else 0.0,
        "round_s_mean": float(np.mean(r["round_s"])) if r.size else math.nan,
    }
    s["compression_ratio"] = s["raw_bytes"] / s["uplink_bytes"] if s["uplink_bytes"] else math.nan
    total = float(np.sum(r["round_s"])) if r.size else 0.0
    s["phases_s"] = {p: float(np.sum(r[p])) for p in PHASES if r.size}
    s["phases_share"] = {p: (v / total if total else math.nan) for p, v in s["phases_s"].items()}
    s["calibration"] = ({k: v for k, v in run.calibration.items() if k not in ("table", "resumes")}
                        if run.calibration is not None else None)
    if run.clients:
        part = run.clients["participated"].astype(bool)
        for k in ("train_s", "encode_s", "decode_s"):
            v = run.clients[k][part]
            s[f"client_{k}_mean"] = float(v.mean()) if v.size else math.nan
    return s


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _mbps(bps: Any) -> str:
    return f"{bps / 1e6:,.0f} MB/s" if isinstance(bps, (int, float)) and math.isfinite(bps) else "-"


def format_calibration(cal: dict[str, Any]) -> str:
    """One line: the network the run measured before round 0 (/calibration)."""
    lat = cal.get("latency_s", math.nan)
    lat_s = f"{lat * 1e6:.2f} us" if isinstance(lat, (int, float)) and math.isfinite(lat) else "-"
    return (f"  network before round 0 ({cal.get('elapsed_s', math.nan):.2f} s, {cal.get('peers', 0)} peers): "
            f"latency {lat_s}  ping-pong 1 MiB {_mbps(cal.get('bw_1MiB_Bps'))}, "
            f"16 MiB {_mbps(cal.get('bw_16MiB_Bps'))}  Gather 1 MiB/rank {_mbps(cal.get('gather_Bps'))}")


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"{s['path']}  [{s['status']}]",
        f"  run {s['name']!r}  codec {s['codec']}  rounds {s['rounds']}  wall {s['wall_s']:.2f} s",
        f"  accuracy final {s['final_accuracy']:.4f}  best {s['best_accuracy']:.4f}  "
        f"loss {s['final_loss']:.4f}",
        f"  uplink {_bytes(s['uplink_bytes'])} (payload {_bytes(s['payload_bytes'])}, "
        f"header {_bytes(s['header_bytes'])})  raw {_bytes(s['raw_bytes'])}  "
        f"ratio {s['compression_ratio']:.2f}x  downlink {_bytes(s['downlink_bytes'])}",
        f"  mean round {s['round_s_mean'] * 1e3:.1f} ms; time by phase (share of round time):",
    ]
    ph = "  ".join(f"{p[:-2]} {s['phases_share'][p] * 100:.1f}%" for p in PHASES if p in s["phases_share"])
    lines.append("    " + ph)
    cal = s.get("calibration")
    if cal:
        lines.append(format_calibration(cal))
    if "client_train_s_mean" in s:
        lines.append(f"  per client: train {s['client_train_s_mean'] * 1e3:.2f} ms  "
                     f"encode {s['client_encode_s_mean'] * 1e3:.3f} ms  "
                     f"decode {s['client_decode_s_mean'] * 1e3:.3f} ms")
    if s.get("per_bit"):
        lines += format_per_bit(s)
    return "\n".join(lines)


def _f(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def format_per_bit(s: dict[str, Any]) -> list[str]:
    """The per-bit block of a one-run summary (the ``per_bit`` entry of a report row): Acc_0 and where
    it came from, PBA_total, the marginal definition, and the per-round series in brief."""
    pb = s["per_bit"]
    m = pb.get("marginal", {})
    kind = s.get("acc0_source", "")
    src = {"logged": "logged: the initial model's test accuracy, before round 0",
           "chance": "chance 1/classes: this file predates the logged initial_accuracy"}.get(kind, kind)
    vs = m.get("vs", "0 bits")
    lines = [f"  per-bit accuracy (methods.md §4.5): Acc0 {_f(pb['acc0'], '.4f')} ({src})",
             f"    total:    {_f(pb['total'] * 1e6, '.4g')} acc/Mbit = (final - Acc0) / "
             f"{_f(pb['bits_total'] / 1e6, '.4g')} Mbit of uplink (all clients, all rounds)",
             f"    marginal: {_f(m.get('value', math.nan), '+.4g')} acc per bit/entry = (final - "
             + ("Acc0) / " if vs == "0 bits" else f"final of {vs}) / ")
             + f"{_f(m.get('d_bits_per_entry', math.nan), '.4g')} uplink bits/entry"
             + (" (against 0 bits)" if vs == "0 bits" else "")]
    rnd, per = pb.get("round", []), pb.get("per_round", [])
    if rnd:
        ends = [(rnd[i], per[i]) for i in sorted({0, len(rnd) - 1})]
        lines.append("    per round, acc/Mbit since the previous evaluation: "
                     + ", ".join(f"round {r + 1} {_f(v * 1e6, '.4g')}" for r, v in ends)
                     + f" ({len(rnd)} evaluation{'s' if len(rnd) != 1 else ''}: --json per_bit)")
    return lines
