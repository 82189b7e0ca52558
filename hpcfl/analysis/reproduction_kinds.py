"""Table and figure kinds of docs/reproduction.md (see :mod:`hpcfl.analysis.reproduction`).

A table kind is ``f(ctx, spec) -> Markdown``; a figure kind is ``f(ctx, spec, out) -> Path | None``.
``spec`` is the manifest entry. Kinds read only usable run files (``ctx.select``), compute with
:mod:`hpcfl.results` and the per-method helpers that already exist (``recycling``,
``gradient_space``, ``_falcom_eval``, ``perbit``), and publish values that claims cite as
``@name.key`` into ``ctx.values``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hpcfl.analysis.reproduction import (Context, RunState, energy_per_round, energy_window, header, md_table,
                                         metric_text, metric_value, run_label)

__all__ = ["TABLES", "FIGURES"]


def _f(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _missing_note(states: Sequence[RunState]) -> str:
    gone = [s for s in states if not s.usable]
    return "" if not gone else ("\n\nNo usable file yet: " + ", ".join(f"`{s.spec.id}` ({s.state})" for s in gone)
                                + ".")


# ------------------------------------------------------------------ generic tables

def table_runs(ctx: Context, t: dict) -> str:
    """One row per run: the label, then the manifest's columns (metrics of METRICS or ``param:KEY``)."""
    opts = {"target": t.get("target")}
    cols = list(t.get("columns", ["final", "best", "uplink", "ratio"]))
    rows = [[run_label(s)] + [metric_text(s, c, opts) for c in cols] for s in ctx.select(t["runs"])]
    return md_table(["run"] + [header(c, opts) for c in cols], rows)


def table_mean_over(ctx: Context, t: dict) -> str:
    """Mean of one metric over groups of runs (e.g. seeds); publishes ``@name.GROUP``."""
    metric = t.get("metric", "final")
    rows = []
    for label, pats in t["groups"]:
        states = ctx.select(pats)
        vals = [(s, metric_value(s, metric)) for s in states]
        got = [v for _, v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        mean = float(np.mean(got)) if got else None
        each = ", ".join(f"{_f(v)}" if s.usable else f"— ({s.state})" for s, v in vals)
        rows.append([label, f"{len(got)} of {len(states)}", each, _f(mean),
                     f"{_f(min(got))}–{_f(max(got))}" if got else "—"])
        if mean is not None and t.get("name"):
            ctx.values[f"{t['name']}.{label}"] = f"{label}: {mean:.4f} (mean of {len(got)})"
    return md_table(["group", "runs used", f"{header(metric)} per run", "mean", "range"], rows)


def table_d_for_fraction(ctx: Context, t: dict) -> str:
    """Smallest d (``codec.dim``) whose final accuracy reaches ``fraction`` of a reference run's."""
    ref = ctx.one(t["reference"])
    frac = float(t.get("fraction", 0.9))
    ref_acc = metric_value(ref, "final") if ref else None
    rows = []
    for label, pats in t["groups"]:
        states = sorted(ctx.select(pats), key=lambda s: float(metric_value(s, "param:codec.dim") or 0))
        pts = [(int(metric_value(s, "param:codec.dim")), metric_value(s, "final")) for s in states if s.usable]
        if ref_acc is None:
            rows.append([label, "—", "reference run missing", ""])
            continue
        thr = frac * ref_acc
        hit = next(((d, a) for d, a in pts if a is not None and a >= thr), None)
        allpts = ", ".join(f"d={d}: {_f(a)}" for d, a in pts) or "no usable run"
        low = " (the smallest tested)" if hit and pts and hit[0] == pts[0][0] else ""
        rows.append([label, f"{thr:.4f}", f"{hit[0]} ({hit[1]:.4f}){low}" if hit else "none tested", allpts])
        if t.get("name"):
            ctx.values[f"{t['name']}.{label}"] = (
                f"{label}: d = {hit[0]}{low} ({hit[1]:.4f} ≥ {frac:g} × {ref_acc:.4f})" if hit else
                f"{label}: no d tested reached {frac:g} × {ref_acc:.4f}")
    return md_table(["group", f"{frac:g} × reference final", "smallest d reaching it", "all (d: final acc)"],
                    rows) + f"\n\nReference: `{t['reference']}` (final {_f(ref_acc)})."


# ------------------------------------------------------------------ LBGM

def table_lbgm_gradient_space(ctx: Context, t: dict) -> str:
    """Principal components of the saved updates (hpcfl.analysis.gradient_space, authors' centring)."""
    from hpcfl.analysis.gradient_space import analyze
    from hpcfl.errors import UsageError

    rows = []
    for s in ctx.select(t["runs"]):
        if not s.usable:
            rows.append([run_label(s), "—", "—", "—", "—", "—"])
            continue
        try:
            res = analyze(s.path, center="vector", per_tensor=False)
        except UsageError as e:
            rows.append([run_label(s), f"no saved updates ({e})", "—", "—", "—", "—"])
            continue
        pc = res.get("per_client", [])
        n95 = np.array([c["components"]["95%"] for c in pc])
        n99 = np.array([c["components"]["99%"] for c in pc])
        top1 = np.array([c["top_share"][0] for c in pc])
        o = res["overall"]["components"]
        rows.append([run_label(s), f"{res['n_vectors']} × {res['n_dims']} ({len(pc)} clients)",
                     f"{n95.mean():.1f} ({n95.min()}–{n95.max()})", f"{n99.mean():.1f} ({n99.min()}–{n99.max()})",
                     f"{100 * top1.mean():.1f}%", f"{o['95%']} / {o['99%']}"])
        if t.get("name"):
            ctx.values[f"{t['name']}.{s.spec.id}"] = (
                f"{s.spec.label}: {n95.mean():.1f} components for 95%, {n99.mean():.1f} for 99% per client "
                f"(mean of {len(pc)}); {o['95%']} / {o['99%']} for all clients' updates together")
    return md_table(["run", "saved updates × coordinates", "components for 95% per client, mean (range)",
                     "for 99% per client", "top-1 share per client", "all clients together: 95% / 99%"], rows) + (
        "\n\nCentring as the authors' `sklearn.decomposition.PCA` on the coordinates × rounds matrix "
        "(`hpcfl analyze gradient-space`, center `vector`).")


# ------------------------------------------------------------------ FalCom

def _conv_ratio(s: RunState, lo: int, hi: int | None = None) -> float:
    from hpcfl.codecs.methods._falcom_eval import lossy_slots, slot_bytes

    raw, pay = slot_bytes(s.run, lossy_slots(s.run))
    sel = slice(lo, hi)
    return float(raw[sel].sum() / pay[sel].sum()) if pay[sel].sum() > 0 else math.nan


def table_falcom_vs_sz3(ctx: Context, t: dict) -> str:
    """FalCom against SZ3 (and ZFP) at the same bound, conv layers; publishes ``@name.all``, ``.late``, ``.qsgd``."""
    lo = int(t.get("from_round", 2))
    rows, best_all, best_late, vs_q = [], [], [], []
    qs = ctx.one(t.get("qsgd", ""))
    q_ratio = metric_value(qs, "ratio") if qs and qs.usable else None
    for label, fid, sid, zid in t["rows"]:
        fa, sz, zf = ctx.one(fid), ctx.one(sid), ctx.one(zid)
        if not (fa and fa.usable and sz and sz.usable):
            gone = ", ".join(x.spec.id for x in (fa, sz) if x and not x.usable)
            rows.append([label] + ["—"] * 7 + [f"missing: {gone}"])
            continue
        n = min(fa.run.n_rounds, sz.run.n_rounds)
        late = n - n // 4
        f_all, s_all = _conv_ratio(fa, lo, n), _conv_ratio(sz, lo, n)
        f_late, s_late = _conv_ratio(fa, late, n), _conv_ratio(sz, late, n)
        z_all = _conv_ratio(zf, lo, n) if zf and zf.usable else math.nan
        best_all.append((f_all / s_all, label))
        best_late.append((f_late / s_late, f"{label}, rounds {late}–{n - 1}"))
        if q_ratio:
            vs_q.append((metric_value(fa, "ratio") / q_ratio, label))
        rows.append([label, _f(f_all, ".3f"), _f(s_all, ".3f"), f"**{f_all / s_all:.3f}**", f"{late}–{n - 1}",
                     f"**{f_late / s_late:.3f}**", _f(z_all, ".3f"),
                     f"{metric_text(fa, 'final')} / {metric_text(sz, 'final')}"
                     + (f" / {metric_text(zf, 'final')}" if zf and zf.usable else ""), ""])
    name = t.get("name")
    if name and best_all:
        v, lab = max(best_all)
        ctx.values[f"{name}.all"] = f"up to {v:.3f}× SZ3 ({lab}, rounds ≥ {lo})"
        v, lab = max(best_late)
        ctx.values[f"{name}.late"] = f"up to {v:.3f}× SZ3 ({lab})"
    if name and vs_q:
        v, lab = max(vs_q)
        ctx.values[f"{name}.qsgd"] = f"up to {v:.3f}× QSGD's whole-message ratio ({lab})"
    return md_table(["bound", f"FalCom conv ratio (rounds ≥ {lo})", "SZ3", "FalCom / SZ3", "late rounds",
                     "FalCom / SZ3, late", "ZFP conv ratio", "final acc FalCom / SZ3 / ZFP", "note"], rows)


def _falcom_per_round(run, bws: Sequence[float], latency_s: float) -> dict[str, float]:
    """``_falcom_eval.summary`` with its run totals (``comm_s@B``, ``e2e_s@B``, ``gather_s``) turned
    into per-round means, so runs of different lengths compare; adds ``rounds`` and ``logged_up_s``
    (the run's own ``modelled_uplink_s`` per round, NaN without ``[link]``)."""
    from hpcfl.codecs.methods._falcom_eval import summary

    sm = summary(run, bws, latency_s)
    n = int(run.n_rounds)
    out = dict(sm, rounds=float(n))
    for k in sm:
        if k.startswith(("comm_s@", "e2e_s@")) or k == "gather_s":
            out[k] = sm[k] / n if n else math.nan
    up = np.asarray(run.rounds["modelled_uplink_s"], np.float64) if "modelled_uplink_s" in run.rounds.dtype.names \
        else np.full(n, np.nan)
    out["logged_up_s"] = float(up.mean()) if n and np.isfinite(up).all() else math.nan
    return out


def table_falcom_comm(ctx: Context, t: dict) -> str:
    """Modelled uplink time and measured codec time per round (``_falcom_eval.summary``, per-round means,
    so an 80-round run compares with the 40-round reference); publishes reduction ranges."""
    bws = [float(b) for b in t.get("bandwidths", [10e6, 100e6])]
    lat = float(t.get("latency_ms", 0.0)) / 1e3
    ref = ctx.one(t["reference"])
    ref_sum = _falcom_per_round(ref.run, bws, lat) if ref and ref.usable else None
    b0 = f"{bws[0] / 1e6:g}Mbit"
    rows, red, red_codec = [], [], []
    for s in ctx.select(t["runs"]):
        if not s.usable:
            rows.append([run_label(s)] + ["—"] * (6 + 2 * len(bws)))
            continue
        sm = _falcom_per_round(s.run, bws, lat)
        cells = [run_label(s), f"{int(sm['rounds'])}", _f(sm["ratio"], ".2f")]
        cells += [_f(1e3 * sm[f"comm_s@{b / 1e6:g}Mbit"], ".3g") for b in bws]
        r = 1 - sm[f"comm_s@{b0}"] / ref_sum[f"comm_s@{b0}"] if ref_sum else math.nan
        rc = 1 - sm[f"e2e_s@{b0}"] / ref_sum[f"e2e_s@{b0}"] if ref_sum else math.nan
        cells.append(_f(100 * r, ".1f") + "%")
        cells += [_f(1e3 * sm[f"e2e_s@{b / 1e6:g}Mbit"], ".3g") for b in bws]
        cells += [_f(1e3 * sm["logged_up_s"], ".3g"), _f(1e3 * sm["gather_s"], ".3g")]
        cells += [_f(sm["encode_ms"], ".1f"), _f(sm["decode_ms"], ".1f")]
        rows.append(cells)
        if s.spec.id.startswith("falcom") and math.isfinite(r):
            red.append(r)
            red_codec.append(rc)
    name = t.get("name")
    if name and red:
        ctx.values[f"{name}.reduction"] = (f"{100 * min(red):.1f}%–{100 * max(red):.1f}% modelled link time per "
                                           f"round at {bws[0] / 1e6:g} Mbit/s, latency {1e3 * lat:g} ms "
                                           f"({len(red)} FalCom runs, per-round means)")
        ctx.values[f"{name}.reduction_codec"] = (f"{100 * min(red_codec):+.1f}% to {100 * max(red_codec):+.1f}% "
                                                 "with the measured codec time added (negative: slower than "
                                                 "uncompressed)")
    head = ["run", "rounds", "whole-message ratio"]
    head += [f"modelled uplink, {b / 1e6:g} Mbit/s, ms/round" for b in bws]
    head += [f"reduction vs {t['reference']} ({bws[0] / 1e6:g} Mbit/s, per round)"]
    head += [f"+codec, {b / 1e6:g} Mbit/s, ms/round" for b in bws]
    head += ["run file's modelled_uplink_s, ms/round", "measured gather_s, ms/round", "encode ms/msg",
             "decode ms/msg"]
    return md_table(head, rows)


# ------------------------------------------------------------------ MWQ

def table_mwq_best_m(ctx: Context, t: dict) -> str:
    """Per rate R (``codec.bits``): the M with the best final accuracy against M = 0; publishes ``@name``."""
    from hpcfl.results.compare import chance_accuracy

    by_r: dict[float, list[RunState]] = {}
    for s in ctx.select(t["runs"]):
        by_r.setdefault(float(metric_value(s, "param:codec.bits") or 0), []).append(s)
    rows, pub = [], []
    for r in sorted(by_r):
        states = by_r[r]
        ok = [s for s in states if s.state == "complete" and metric_value(s, "final") is not None
              and metric_value(s, "final") >= chance_accuracy(s.run) + 0.02]
        out = [s for s in states if s not in ok]
        m0 = next((s for s in states if metric_value(s, "param:codec.m") is not None
                   and float(metric_value(s, "param:codec.m")) == 0.0), None)
        if not ok:
            rows.append([f"{r:g}", "—", "—", "—", ", ".join(f"{s.spec.id} ({s.state})" for s in out)])
            continue
        best = max(ok, key=lambda s: metric_value(s, "final"))
        m = float(metric_value(best, "param:codec.m"))
        m0_txt = (f"{metric_text(m0, 'final')} / {metric_text(m0, 'last5')}" if m0 and m0.usable else "—")
        excluded = ", ".join(f"M={float(metric_value(s, 'param:codec.m') or 0):g} ({_why(s)})" for s in out)
        rows.append([f"{r:g}", f"{m:g}", f"{metric_text(best, 'final')} / {metric_text(best, 'last5')}", m0_txt,
                     excluded or "—"])
        pub.append(f"R={r:g}: M={m:g} ({metric_text(best, 'final')} vs M=0 "
                   f"{metric_text(m0, 'final') if m0 and m0.usable else '—'})")
    if t.get("name") and pub:
        ctx.values[t["name"]] = "; ".join(pub)
    return md_table(["R", "best M", "its final / last 5", "M = 0 final / last 5", "excluded (diverged or at chance)"],
                    rows)


def _why(s: RunState) -> str:
    if not s.usable:
        return s.state
    return "diverged" if s.state == "diverged" else "ended at chance"


def table_marginal(ctx: Context, t: dict) -> str:
    """Marginal per-bit accuracy across rates (``hpcfl.results.perbit``); publishes ``@name.first_bit``."""
    from hpcfl.results.perbit import acc0_kind, marginal_per_bit, markdown_table

    states = ctx.select(t["runs"])
    used = [s for s in states if s.usable]
    if not used:
        return "No usable run." + _missing_note(states)
    rows = marginal_per_bit([s.run for s in used])
    first: dict[str, dict] = {}
    for w in rows:
        first.setdefault(w["group"], w)
    if t.get("name"):
        ctx.values[f"{t['name']}.first_bit"] = "first bit: " + "; ".join(
            f"{w['label']} {w['marginal']:+.3f} acc per bit/entry (R={w['rate']:g})" for w in first.values())
    kinds = {acc0_kind(w["acc0_source"]) for w in rows}
    acc0 = ("chance 1/classes, as these runs predate the logged initial accuracy" if kinds == {"chance"} else
            "the logged initial accuracy, before round 0" if kinds == {"logged"} else
            "the logged initial accuracy before round 0, or chance 1/classes for runs without it")
    return markdown_table(rows) + "\n\nd acc and marginal are against the next lower rate of the same group (the " \
        f"lowest rate against Acc_0 at 0 bits: {acc0}); bits per entry are measured." + _missing_note(states)


# ------------------------------------------------------------------ AltSpace

def table_altspace_energy(ctx: Context, t: dict) -> str:
    """Top-k energy share before → after the map, per run and round window."""
    wins = [tuple(w) for w in t.get("windows", [[1, 10], [1, 99]])]
    rows = []
    for s in ctx.select(t["runs"]):
        if not s.usable:
            rows.append([run_label(s)] + ["—"] * len(wins))
            continue
        cells = [run_label(s)]
        for lo, hi in wins:
            o, m = energy_window(s.run, lo, hi)
            cells.append(f"{_f(o, '.3f')} → {_f(m, '.3f')}")
        rows.append(cells)
    return md_table(["run"] + [f"rounds {lo}–{hi}" for lo, hi in wins], rows)


TABLES: dict[str, Callable[[Context, dict], str]] = {
    "runs": table_runs,
    "mean_over": table_mean_over,
    "d_for_fraction": table_d_for_fraction,
    "lbgm_gradient_space": table_lbgm_gradient_space,
    "falcom_vs_sz3": table_falcom_vs_sz3,
    "falcom_comm": table_falcom_comm,
    "mwq_best_m": table_mwq_best_m,
    "marginal": table_marginal,
    "altspace_energy": table_altspace_energy,
}


# ------------------------------------------------------------------ figures

def _entries(ctx: Context, f: dict):
    from hpcfl.results.compare import Entry

    return [Entry(s.run, s.spec.label, {}, s.spec.id) for s in ctx.select(f["runs"]) if s.usable]


def fig_accuracy_vs_rounds(ctx: Context, f: dict, out: Path) -> Path | None:
    from hpcfl.results.plots import accuracy_vs_rounds

    e = _entries(ctx, f)
    return accuracy_vs_rounds(e, out, f.get("target")) if e else None


def fig_accuracy_vs_uplink(ctx: Context, f: dict, out: Path) -> Path | None:
    from hpcfl.results.plots import accuracy_vs_uplink

    e = _entries(ctx, f)
    return accuracy_vs_uplink(e, out, f.get("target")) if e else None


def fig_compression_ratio(ctx: Context, f: dict, out: Path) -> Path | None:
    from hpcfl.results.plots import compression_ratio

    e = _entries(ctx, f)
    return compression_ratio(e, out) if e else None


def fig_lbgm_floats(ctx: Context, f: dict, out: Path) -> Path | None:
    from hpcfl.analysis.recycling import plot_accuracy_vs_floats
    from hpcfl.analysis.reproduction import _recycling

    used = [s for s in ctx.select(f["runs"]) if s.usable]
    if not used:
        return None
    return plot_accuracy_vs_floats([_recycling(s) for s in used], [s.spec.label for s in used], out,
                                   f.get("title", ""))


def _num_of(s: RunState, name: str) -> float:
    v = metric_value(s, name)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _failed(s: RunState) -> bool:
    """Diverged, or finished at chance level: such points would only stretch a figure's axes."""
    from hpcfl.results.compare import chance_accuracy

    f = metric_value(s, "final")
    return s.state == "diverged" or f is None or f < chance_accuracy(s.run) + 0.02


def fig_xy(ctx: Context, f: dict, out: Path) -> tuple[Path, str] | None:
    """One line per series: metric/param ``y`` against ``x`` over its usable runs; ``refs`` as horizontal lines.

    Runs that diverged or ended at chance are left out (named in the caption note).
    """
    from hpcfl.results.plots import _figure, _label_lines, _style

    fig = _figure()
    ax = fig.add_subplot()
    ends = []
    left_out = [s.spec.id for _, pats in f["series"] for s in ctx.select(pats) if s.usable and _failed(s)]
    for i, (label, pats) in enumerate(f["series"]):
        pts = sorted((_num_of(s, f["x"]), _num_of(s, f["y"])) for s in ctx.select(pats)
                     if s.usable and not _failed(s))
        pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if not pts:
            continue
        st = _style(i)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label, markersize=5, linewidth=1.4, **st)
        ends.append((xs[-1], ys[-1], label, {**st, "xs": xs}))
    if not ends:
        return None
    for j, rid in enumerate(f.get("refs", [])):
        s = ctx.one(rid)
        if s and s.usable:
            y = _num_of(s, f["y"])
            ax.axhline(y, color="#777777", linestyle=(0, (2, 3 + j)), linewidth=0.9, zorder=0)
            ax.annotate(f"{s.spec.label} ({y:.3f})", xy=(0.01, y), xycoords=("axes fraction", "data"),
                        xytext=(3, 2 if j % 2 == 0 else -2), textcoords="offset points", fontsize=7.5,
                        color="#555555", va="bottom" if j % 2 == 0 else "top")
    if f.get("xlog"):
        ax.set_xscale("log")
    xs_all = sorted({x for _, _, _, st in ends for x in st["xs"]})
    if 0 < len(xs_all) <= 12:  # tick the values that were run, not powers of ten
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f.get("xlabel", f["x"]))
    ax.set_ylabel(f.get("ylabel", f["y"]))
    ax.grid(True, alpha=0.3)
    ax.set_title(f.get("title", ""), fontsize=11, loc="left")
    _label_lines(ax, ends, "series")
    fig.savefig(out)
    return out, (f"Left out (diverged or ended at chance): {', '.join(left_out)}." if left_out else "")


def fig_falcom_ratio_rounds(ctx: Context, f: dict, out: Path) -> Path | None:
    """FalCom / SZ3 conv-layer ratio per round, one line per bound."""
    from hpcfl.codecs.methods._falcom_eval import lossy_slots, slot_ratios
    from hpcfl.results.plots import _figure, _integer_x, _label_lines, _style

    fig = _figure()
    ax = fig.add_subplot()
    ends = []
    for i, (label, fid, sid) in enumerate(f["rows"]):
        fa, sz = ctx.one(fid), ctx.one(sid)
        if not (fa and fa.usable and sz and sz.usable):
            continue
        n = min(fa.run.n_rounds, sz.run.n_rounds)
        r = slot_ratios(fa.run, lossy_slots(fa.run))[:n] / slot_ratios(sz.run, lossy_slots(sz.run))[:n]
        x = np.arange(1, n + 1)
        ok = np.isfinite(r)
        st = _style(i)
        ax.plot(x[ok], r[ok], label=label, markersize=3, linewidth=1.2, markevery=max(1, n // 12), **st)
        ends.append((float(x[ok][-1]), float(r[ok][-1]), label, st))
    if not ends:
        return None
    ax.axhline(1.0, color="#888888", linestyle=(0, (2, 3)), linewidth=0.9, zorder=0)
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("FalCom / SZ3 compression ratio, conv layers")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    _integer_x(ax)
    ax.set_title(f.get("title", ""), fontsize=11, loc="left")
    _label_lines(ax, ends, "bound")
    fig.savefig(out)
    return out


def fig_altspace_energy_rounds(ctx: Context, f: dict, out: Path) -> Path | None:
    """Top-k energy share per round: mapped (solid) and original space (dashed, same colour)."""
    from hpcfl.results.plots import _figure, _integer_x, _label_lines, _style

    fig = _figure()
    ax = fig.add_subplot()
    ends = []
    for i, s in enumerate(x for x in ctx.select(f["runs"]) if x.usable):
        o, m = energy_per_round(s.run)
        x = np.arange(1, s.run.n_rounds + 1)
        st = _style(i)
        ok_m, ok_o = np.isfinite(m), np.isfinite(o)
        if not ok_m.any():
            continue
        ax.plot(x[ok_m], m[ok_m], color=st["color"], linestyle="-", linewidth=1.4, label=s.spec.label)
        ax.plot(x[ok_o], o[ok_o], color=st["color"], linestyle="--", linewidth=1.0, alpha=0.8)
        ends.append((float(x[ok_m][-1]), float(m[ok_m][-1]), s.spec.label, st))
    if not ends:
        return None
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("share of ‖update‖² in the top-k entries")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    _integer_x(ax)
    ax.set_title(f.get("title", ""), fontsize=10, loc="left")
    _label_lines(ax, ends, "run")
    fig.savefig(out)
    return out


FIGURES: dict[str, Callable[[Context, dict, Path], Path | tuple[Path, str] | None]] = {
    "accuracy_vs_rounds": fig_accuracy_vs_rounds,
    "accuracy_vs_uplink": fig_accuracy_vs_uplink,
    "compression_ratio": fig_compression_ratio,
    "lbgm_floats": fig_lbgm_floats,
    "xy": fig_xy,
    "falcom_ratio_rounds": fig_falcom_ratio_rounds,
    "altspace_energy_rounds": fig_altspace_energy_rounds,
}
