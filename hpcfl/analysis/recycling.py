"""Per-round recycling figures of a run: LBGM's axes (accuracy vs "#params shared").

``floats`` are float32 equivalents of the uplink payload (payload bytes / 4):
exactly the authors' count for standalone LBGM (+1 per recycled tensor, +numel
per full tensor) and, for any other codec, the payload it really sent. The
per-client cumulative figure is the federation's total divided by the number
of clients (the authors' per-worker average; with full participation every
client sends every round). The recycled fraction is the mean of the ``lbgm``
codec statistic ``recycled`` over the participating clients' slots (absent
for codecs that never recycle).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["recycling_summary", "format_recycling"]


def recycling_summary(path: str | Path) -> dict[str, Any]:
    """Per-round and whole-run recycling figures of one run file."""
    from hpcfl.results import load_run

    run = load_run(path)
    R = run.n_rounds
    C = int(run.attrs.get("n_clients", run.clients["payload_bytes"].shape[1]))
    part = run.clients["participated"].astype(bool)
    floats = run.clients["payload_bytes"].astype(np.float64) / 4.0
    raw = run.clients["raw_bytes"].astype(np.float64) / 4.0
    per_round = floats.sum(axis=1) / C
    cum = np.cumsum(per_round)
    cum_raw = np.cumsum(raw.sum(axis=1) / C)
    has_rec = "recycled" in run.codec_stat_names()
    rec = run.codec_stat("recycled") if has_rec else None
    frac = np.full(R, np.nan)
    if rec is not None:
        for r in range(R):
            v = rec[r][part[r]]
            v = v[np.isfinite(v)]
            frac[r] = float(v.mean()) if v.size else math.nan
    acc = run.rounds["accuracy"].astype(np.float64)
    state = run.rounds["root_state_bytes"].astype(np.int64) if "root_state_bytes" in run.rounds.dtype.names \
        else np.zeros(R, np.int64)
    ok = np.isfinite(acc)
    rows = [{"round": int(r), "accuracy": None if not ok[r] else float(acc[r]),
             "recycled_fraction": None if not np.isfinite(frac[r]) else float(frac[r]),
             "floats_per_client": float(per_round[r]), "cum_floats_per_client": float(cum[r]),
             "root_state_bytes": int(state[r])} for r in range(R)]
    return {
        "path": str(path), "codec": run.codec.get("codec", {}), "rounds": R, "clients": C,
        "final_accuracy": float(acc[ok][-1]) if ok.any() else None,
        "best_accuracy": float(acc[ok].max()) if ok.any() else None,
        "cum_floats_per_client": float(cum[-1]) if R else 0.0,
        "cum_raw_floats_per_client": float(cum_raw[-1]) if R else 0.0,
        "floats_saved": float(1.0 - cum[-1] / cum_raw[-1]) if R and cum_raw[-1] else None,
        "mean_recycled_fraction": float(np.nanmean(frac)) if np.isfinite(frac).any() else None,
        "root_state_bytes_max": int(state.max()) if R else 0,
        "per_round": rows,
    }


def format_recycling(s: dict[str, Any], every: int = 10) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"recycling in {s['path']} ({s['rounds']} rounds, {s['clients']} clients)",
             f"{'round':>5s} {'accuracy':>8s} {'recycled':>8s} {'floats/client':>13s} "
             f"{'cum floats/client':>17s} {'root state MB':>13s}"]
    for row in s["per_round"]:
        r = row["round"]
        if (r + 1) % every and r != s["rounds"] - 1:
            continue
        lines.append(f"{r:5d} {f(row['accuracy'], '8.4f')} {f(row['recycled_fraction'], '8.3f')} "
                     f"{row['floats_per_client']:13.0f} {row['cum_floats_per_client']:17.4g} "
                     f"{row['root_state_bytes'] / 1e6:13.2f}")
    lines.append(f"final accuracy {f(s['final_accuracy'], '.4f')} (best {f(s['best_accuracy'], '.4f')}); "
                 f"floats per client {s['cum_floats_per_client']:.4g} of {s['cum_raw_floats_per_client']:.4g} "
                 f"uncompressed (saved {f(s['floats_saved'], '.1%')}); mean recycled fraction "
                 f"{f(s['mean_recycled_fraction'], '.3f')}; root state up to {s['root_state_bytes_max'] / 1e6:.2f} MB")
    return "\n".join(lines)


def format_recycling_table(summaries: list[dict[str, Any]], labels: list[str]) -> str:
    """One line per run: accuracy, floats per client, saving, recycled fraction, root state."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    w = max([len(x) for x in labels] + [3])
    lines = [f"{'run':{w}s} {'final acc':>9s} {'best acc':>8s} {'floats/client':>13s} {'saved':>6s} "
             f"{'recycled':>8s} {'root MB':>8s}"]
    for lab, s in zip(labels, summaries):
        lines.append(f"{lab:{w}s} {f(s['final_accuracy'], '9.4f')} {f(s['best_accuracy'], '8.4f')} "
                     f"{s['cum_floats_per_client']:13.4g} {f(s['floats_saved'], '6.1%')} "
                     f"{f(s['mean_recycled_fraction'], '8.3f')} {s['root_state_bytes_max'] / 1e6:8.2f}")
    return "\n".join(lines)


def plot_accuracy_vs_floats(summaries: list[dict[str, Any]], labels: list[str], out: str | Path,
                            title: str = "") -> Path:
    """Test accuracy against cumulative floats uploaded per client (log x): the paper's plot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    styles = ("-", "--", "-.", ":")
    for i, (lab, s) in enumerate(zip(labels, summaries)):
        pts = [(r["cum_floats_per_client"], r["accuracy"]) for r in s["per_round"] if r["accuracy"] is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, linestyle=styles[i % len(styles)], linewidth=1.4, label=lab)
    ax.set_xscale("log")
    ax.set_xlabel("floats uploaded per client, cumulative (#params shared)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    out = Path(out)
    fig.savefig(out, format="png")
    return out
