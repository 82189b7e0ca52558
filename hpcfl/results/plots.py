"""Figures comparing runs: one PNG per quantity, readable without matching colours to a legend.

- ``accuracy_vs_rounds.png``: test accuracy after each completed round;
- ``accuracy_vs_uplink.png``: test accuracy against cumulative uplink bytes (log scale);
- ``time_by_phase.png``: mean time per round split by phase, one bar per run;
- ``compression_ratio.png``: raw / uplink bytes per round (log scale).

Lines carry their label at their right end (labels pushed apart so they never overlap,
with a thin leader to the line's end); above 12 runs a legend sorted by final value is used
instead. Colours and line styles both change from one run to the next. No pyplot: figures
are plain ``matplotlib.figure.Figure`` objects rendered by Agg, so nothing depends on a display
or on the global backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcfl.results.compare import TIME_SPLIT, Entry, _evaluated, time_split

__all__ = ["plot_all", "FIGURES"]

FIGURES = ("accuracy_vs_rounds.png", "accuracy_vs_uplink.png", "time_by_phase.png", "compression_ratio.png")

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_PHASE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
_PHASE_NAMES = {"bcast_s": "broadcast", "compute_s": "compute (slowest worker)", "gather_s": "gather (uplink)",
                "records_s": "unpack", "decode_s": "decode", "aggregate_s": "aggregate", "eval_s": "evaluate",
                "overhead_s": "overhead"}
_DIRECT_MAX = 12
_DPI = 110


def _style(i: int) -> dict:
    return {"color": _COLORS[i % len(_COLORS)], "linestyle": _STYLES[i % len(_STYLES)],
            "marker": _MARKERS[i % len(_MARKERS)]}


def _figure(width: float = 8.0, height: float = 4.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _common(entries: Sequence[Entry]) -> str:
    """What all runs share (data set, model, algorithm, clients), for the subtitle."""
    jobs = [e.run.job for e in entries]

    def same(sec: str, key: str):
        vals = {json_key(j.get(sec, {}).get(key)) for j in jobs}
        return jobs[0].get(sec, {}).get(key) if len(vals) == 1 else None

    parts = []
    for sec, key, fmt in (("data", "dataset", "{}"), ("model", "name", "{}"), ("train", "algorithm", "{}"),
                          ("data", "n_clients", "{} clients"), ("data", "partition", "{} partition"),
                          ("codec", "id", "codec {}")):
        v = same(sec, key)
        if v is not None:
            parts.append(fmt.format(v))
    return " · ".join(parts)


def json_key(v) -> str:
    import json

    return json.dumps(v, sort_keys=True)


def _direct_labels(ax, ends: list[tuple[float, float, str, str]], fontsize: float = 8.5) -> None:
    """Write each label right of the axes at its line's final y, pushed apart to avoid overlaps."""
    if not ends:
        return
    y0, y1 = ax.get_ylim()
    log = ax.get_yscale() == "log"

    def to_frac(y):
        if log:
            return (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0))
        return (y - y0) / (y1 - y0)

    fig = ax.figure
    height_px = fig.get_figheight() * fig.dpi * 0.72  # the axes' share after the constrained layout
    gap = fontsize * 1.25 / 72 * fig.dpi / height_px  # one text line, in axes fraction
    order = sorted(range(len(ends)), key=lambda i: to_frac(ends[i][1]))
    pos = [to_frac(ends[i][1]) for i in order]
    for k in range(1, len(pos)):  # push up
        pos[k] = max(pos[k], pos[k - 1] + gap)
    if pos and pos[-1] > 1.0:  # then down from the top if needed
        pos[-1] = 1.0
        for k in range(len(pos) - 2, -1, -1):
            pos[k] = min(pos[k], pos[k + 1] - gap)
    for k, i in enumerate(order):
        x, y, label, color = ends[i]
        ax.annotate(label, xy=(x, y), xycoords="data", xytext=(1.02, pos[k]), textcoords="axes fraction",
                    va="center", ha="left", fontsize=fontsize, color=color, annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.6,
                                "shrinkA": 0, "shrinkB": 2})


def _label_lines(ax, lines: list[tuple[float, float, str, dict]], legend_title: str) -> None:
    """Direct labels for few lines; otherwise a legend sorted by final value (highest first)."""
    if len(lines) <= _DIRECT_MAX:
        _direct_labels(ax, [(x, y, lab, st["color"]) for x, y, lab, st in lines])
    else:
        handles, labels = ax.get_legend_handles_labels()
        finals = {lab: y for _, y, lab, _ in lines}
        pairs = sorted(zip(handles, labels), key=lambda hl: -finals.get(hl[1], -math.inf))
        ax.legend([h for h, _ in pairs], [f"{lab}  ({finals[lab]:.3g})" for _, lab in pairs], title=legend_title,
                  fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _title(fig, ax, title: str, entries: Sequence[Entry]) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    sub = _common(entries)
    if sub:
        fig.suptitle(sub, fontsize=8.5, color="#555555", x=0.01, ha="left")


def _target(ax, target: float | None) -> None:
    if target is None:
        return
    ax.axhline(target, color="#888888", linestyle=(0, (2, 3)), linewidth=0.9, zorder=0)
    ax.annotate(f"target {target:.4g}", xy=(0.0, target), xycoords=("axes fraction", "data"),
                xytext=(3, 2), textcoords="offset points", fontsize=7.5, color="#666666", va="bottom")


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_ticks(axis, fmt) -> None:
    """Ticks at 1, 2, 5 x 10^k, all labelled with ``fmt``; unlabelled minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


def _eng_bytes(v: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= f:
            return f"{v / f:g} {unit}"
    return f"{v:g} B"


def _markevery(n: int) -> int:
    return max(1, n // 12)


def accuracy_vs_rounds(entries: Sequence[Entry], out: Path, target: float | None = None) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    ends = []
    for i, e in enumerate(entries):
        idx, acc = _evaluated(e.run)
        if not idx.size:
            continue
        st = _style(i)
        ax.plot(idx + 1, acc, label=e.label, markersize=3.5, linewidth=1.4, markevery=_markevery(idx.size), **st)
        ends.append((float(idx[-1] + 1), float(acc[-1]), e.label, st))
    _target(ax, target)
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    _integer_x(ax)
    _title(fig, ax, "Test accuracy after each round", entries)
    _label_lines(ax, ends, "final accuracy, high to low")
    fig.savefig(out)
    return out


def accuracy_vs_uplink(entries: Sequence[Entry], out: Path, target: float | None = None) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    ends = []
    for i, e in enumerate(entries):
        idx, acc = _evaluated(e.run)
        cum = np.cumsum(e.run.rounds["uplink_bytes"]).astype(float) if e.run.n_rounds else np.zeros(0)
        keep = cum[idx] > 0 if idx.size else np.zeros(0, bool)
        if not keep.any():
            continue
        x, y = cum[idx][keep], acc[keep]
        st = _style(i)
        ax.plot(x, y, label=e.label, markersize=3.5, linewidth=1.4, markevery=_markevery(x.size), **st)
        ends.append((float(x[-1]), float(y[-1]), e.label, st))
    _target(ax, target)
    if ends:
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, _eng_bytes)
    ax.set_xlabel("cumulative uplink bytes, all clients (log scale; kB = 1000 B)")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.grid(True, which="major", alpha=0.3)
    _title(fig, ax, "Test accuracy against uplink bytes sent", entries)
    _label_lines(ax, ends, "final accuracy, high to low")
    fig.savefig(out)
    return out


def compression_ratio(entries: Sequence[Entry], out: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    ends = []
    for i, e in enumerate(entries):
        r = e.run.rounds
        if not r.size:
            continue
        ratio = r["compression_ratio"].astype(float)
        ok = np.isfinite(ratio) & (ratio > 0)
        if not ok.any():
            continue
        x = (r["round"][ok] + 1).astype(float)
        st = _style(i)
        ax.plot(x, ratio[ok], label=e.label, markersize=3.5, linewidth=1.4, markevery=_markevery(int(ok.sum())),
                **st)
        ends.append((float(x[-1]), float(ratio[ok][-1]), e.label, st))
    if ends:
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.8), max(hi, 1.25))  # always show 1x (uncompressed)
        _log_ticks(ax.yaxis, lambda v: f"{v:g}x")
    ax.axhline(1.0, color="#888888", linestyle=(0, (2, 3)), linewidth=0.9, zorder=0)
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("compression ratio: raw float32 / uplink bytes (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlim(left=0)
    _integer_x(ax)
    _title(fig, ax, "Uplink compression ratio per round (headers included; 1 = uncompressed)", entries)
    _label_lines(ax, ends, "final ratio, high to low")
    fig.savefig(out)
    return out


def time_by_phase(entries: Sequence[Entry], out: Path) -> Path:
    n = len(entries)
    fig = _figure(8.0, max(2.6, 1.3 + 0.42 * n))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first run on top
    left = np.zeros(n)
    splits = [time_split(e.run) for e in entries]
    rounds = np.array([max(e.run.n_rounds, 1) for e in entries], dtype=float)
    for k, p in enumerate(TIME_SPLIT):
        ms = np.array([sp[p] for sp in splits]) / rounds * 1e3
        ms = np.maximum(np.nan_to_num(ms), 0.0)  # a slightly negative overhead draws nothing
        ax.barh(y, ms, left=left, height=0.62, color=_PHASE_COLORS[k % len(_PHASE_COLORS)],
                label=_PHASE_NAMES.get(p, p), edgecolor="white", linewidth=0.5)
        left += ms
    totals = np.array([float(np.nansum(e.run.rounds["round_s"])) if e.run.n_rounds else 0.0
                       for e in entries]) / rounds * 1e3
    for yi, tot, end in zip(y, totals, left):
        ax.annotate(f"{tot:.1f} ms", xy=(max(tot, end), yi), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(y, [e.label for e in entries], fontsize=8.5)
    ax.set_xlabel("mean time per round, ms (phases add up to the round time)")
    ax.set_xlim(0, max(float(totals.max()) if n else 1.0, float(left.max()) if n else 1.0, 1e-6) * 1.15)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(ncols=4, fontsize=7.5, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False,
              title="phase (left to right)", title_fontsize=7.5, alignment="left")
    sub = _common(entries)
    if sub:
        fig.suptitle(sub + " · time per round by phase", fontsize=8.5, color="#555555", x=0.01, ha="left")
    fig.savefig(out)
    return out


def plot_all(entries: Sequence[Entry], directory: str | Path, target: float | None = None) -> list[Path]:
    """Write the four figures into ``directory``; returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return [accuracy_vs_rounds(entries, d / FIGURES[0], target),
            accuracy_vs_uplink(entries, d / FIGURES[1], target),
            time_by_phase(entries, d / FIGURES[2]),
            compression_ratio(entries, d / FIGURES[3])]
