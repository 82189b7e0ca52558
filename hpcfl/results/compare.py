"""Compare runs: one row per run (accuracy, rounds and bytes to a target, bytes, time by phase, per-bit accuracy).

Pure functions over :func:`hpcfl.results.load_run`; no MPI, no torch.

Definitions (rounds are counted as *completed rounds*: the accuracy in row r of
``/rounds`` is the accuracy after r + 1 rounds):

- ``rounds_to_target``: completed rounds until the first evaluated accuracy >= target
  (None if the run never reached it);
- ``uplink_bytes_to_target``: uplink bytes (all clients, payload + header) of those rounds;
- ``per_bit_accuracy``: PBA_total, see :func:`per_bit_accuracy`; ``per_bit_marginal``: the marginal
  definition against the next lower-rate run (:func:`compare`); ``per_bit``: both, with Acc_0, its
  source and the per-round series. Both definitions: :mod:`hpcfl.results.perbit` (methods.md §4.5).

Inputs (:func:`collect`): run files, sweep directories (``sweep.json``: runs in point order,
labelled by their grid values) and other directories (every ``*.h5`` run file below them).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hpcfl.errors import UsageError
from hpcfl.results.perbit import marginal_per_bit
from hpcfl.results.reader import Run, load_run
from hpcfl.results.report import summarize

__all__ = ["Entry", "collect", "chance_accuracy", "per_bit_accuracy", "rounds_to_target", "uplink_to_target",
           "default_target", "varying_params", "time_split", "TIME_SPLIT", "run_row", "per_bit_fields", "compare",
           "flat_row", "to_csv", "to_json_lines", "format_table", "per_bit_table", "PER_BIT_FOOTER", "CSV_COLUMNS"]


@dataclass
class Entry:
    """One run to compare: the run, a short label, and the parameters that distinguish it."""

    run: Run
    label: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # sweep point name (NNNN-...) or file stem


# ------------------------------------------------------------------ metrics

def _evaluated(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, accuracies) of the rounds that were evaluated."""
    acc = run.rounds["accuracy"] if run.n_rounds else np.zeros(0)
    idx = np.flatnonzero(~np.isnan(acc))
    return idx, acc[idx]


def n_classes(run: Run) -> int:
    job = run.job
    data = job.get("data", {})
    if data.get("dataset") == "synthetic":
        return int(data.get("synthetic_classes", 10))
    from hpcfl.config.validate import INPUT_SHAPES

    return int(INPUT_SHAPES.get(data.get("dataset", ""), ((), 10))[1])


def chance_accuracy(run: Run) -> float:
    """1 / number of classes: chance level. Acc_0 of per-bit accuracy only for an older file without
    the logged ``initial_accuracy`` (:func:`hpcfl.results.perbit.initial_accuracy`)."""
    return 1.0 / n_classes(run)


def per_bit_accuracy(run: Run) -> float:
    """PBA_total of methods.md §4.5: (Acc_final - Acc_0) / (total uplink bits over training).

    Defined once, in :mod:`hpcfl.results.perbit` (both definitions, documented
    there): Acc_0 is the initial model's accuracy the run logged
    (``initial_accuracy``), or chance level for older files. NaN if no round was
    evaluated or nothing was sent.
    """
    from hpcfl.results.perbit import per_bit_accuracy as _pba

    return float(_pba(run)["total"])


def rounds_to_target(run: Run, target: float) -> int | None:
    """Completed rounds until the first evaluated accuracy >= target; None if never reached."""
    idx, acc = _evaluated(run)
    hit = np.flatnonzero(acc >= target)
    return int(idx[hit[0]]) + 1 if hit.size else None


def uplink_to_target(run: Run, target: float) -> int | None:
    """Uplink bytes sent in the rounds up to and including the one that reached the target."""
    n = rounds_to_target(run, target)
    return None if n is None else int(run.rounds["uplink_bytes"][:n].sum())


def wall_to_target(run: Run, target: float) -> float | None:
    n = rounds_to_target(run, target)
    return None if n is None else float(run.rounds["wall_time"][n - 1])


def default_target(runs: Sequence[Run]) -> float | None:
    """The best accuracy every run reached (min over runs of the best accuracy), floored to 0.01."""
    best = []
    for r in runs:
        _, acc = _evaluated(r)
        if acc.size:
            best.append(float(acc.max()))
    if not best:
        return None
    return math.floor(min(best) * 100 + 1e-9) / 100


#: A partition of the root's round time (round_s = the sum of these, per round): the measured phases
#: of the critical path (docs/timing.md), with the slowest worker's compute in place of the root's
#: wait_s (wait_s = that compute + part of overhead_s, so wait and overhead must not be added).
TIME_SPLIT = ("bcast_s", "compute_s", "gather_s", "records_s", "decode_s", "aggregate_s", "eval_s", "overhead_s")


def time_split(run: Run) -> dict[str, float]:
    """Seconds per phase summed over rounds; the phases of TIME_SPLIT add up to sum(round_s).

    ``compute_s`` is the largest ``/ranks`` compute_s of a worker each round (training +
    encoding of the slowest worker), or the root's ``wait_s`` if the run has no rank table.
    Phases never logged count as 0.
    """
    r = run.rounds
    if not r.size:
        return {p: 0.0 for p in TIME_SPLIT}
    if run.ranks and "compute_s" in run.ranks and run.ranks["compute_s"].shape[1] > 1:
        comp = run.ranks["compute_s"][:, 1:].astype(float)
        m = np.where(np.isnan(comp), -np.inf, comp).max(axis=1)
        compute = np.where(np.isinf(m), np.nan, m)
    else:
        compute = r["wait_s"].astype(float)
    out = {}
    for p in TIME_SPLIT:
        v = compute if p == "compute_s" else r[p].astype(float)
        out[p] = float(np.nansum(v))
    return out


# ------------------------------------------------------------------ parameters and labels

_IGNORED = ("log.", "run.name")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def varying_params(runs: Sequence[Run]) -> list[str]:
    """Job keys (dotted, codec parameters included) whose values differ between the runs."""
    flats = [_flatten(r.job) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    out = []
    for k in keys:
        if k.startswith(_IGNORED[0]) or k == _IGNORED[1]:
            continue
        vals = [json.dumps(f.get(k), sort_keys=True) for f in flats]
        if len(set(vals)) > 1:
            out.append(k)
    # a codec id first, then its parameters, then the rest in key order
    return sorted(out, key=lambda k: (not k.startswith("codec."), k != "codec.id", k))


def _short(keys: Sequence[str]) -> dict[str, str]:
    leaf = [k.split(".")[-1] for k in keys]
    return {k: (lf if leaf.count(lf) == 1 else k) for k, lf in zip(keys, leaf)}


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _label_runs(entries: list[Entry]) -> None:
    """Fill missing labels and params from the job keys that differ; keep labels unique."""
    missing = [e for e in entries if not e.params]
    if missing:
        keys = varying_params([e.run for e in entries])
        short = _short(keys)
        for e in missing:
            flat = _flatten(e.run.job)
            e.params = {k: flat.get(k) for k in keys}
            if not e.label:
                e.label = " ".join(f"{short[k]}={_fmt_value(flat.get(k))}" for k in keys if k in flat)
    for e in entries:
        e.name = e.name or e.run.path.stem
        e.label = e.label or e.run.job.get("run", {}).get("name", "") or e.name
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.label] = seen.get(e.label, 0) + 1
    for e in entries:
        if seen[e.label] > 1:
            e.label = f"{e.label} ({e.name})"


# ------------------------------------------------------------------ inputs

def _sweep_entries(d: Path, skipped: list[str]) -> list[Entry]:
    meta = json.loads((d / "sweep.json").read_text())
    out = []
    for p in meta.get("points", []):
        path = d / p["run"]
        if not path.exists():
            skipped.append(f"{path}: not run yet")
            continue
        try:
            run = load_run(path)
        except UsageError as e:
            skipped.append(str(e))
            continue
        out.append(Entry(run, p.get("label", ""), dict(p.get("values", {})), p.get("name", path.stem)))
    return out


def collect(paths: Iterable[str | os.PathLike]) -> tuple[list[Entry], list[str]]:
    """Entries for run files and directories, and a list of what was skipped (and why).

    A directory with ``sweep.json`` yields its points in order, labelled by grid values;
    any other directory yields every ``*.h5`` run file below it (other HDF5 files are skipped).
    """
    entries: list[Entry] = []
    skipped: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            if (p / "sweep.json").exists():
                entries += _sweep_entries(p, skipped)
                continue
            files = sorted(f for f in p.rglob("*.h5") if f.is_file())
            if not files:
                raise UsageError(f"{p}: no .h5 run files in this directory")
            for f in files:
                try:
                    entries.append(Entry(load_run(f)))
                except UsageError as e:
                    skipped.append(str(e))
        else:
            entries.append(Entry(load_run(p)))
    if not entries:
        raise UsageError("no run files to report" + (f" ({skipped[0]})" if skipped else ""))
    _label_runs(entries)
    return entries, skipped


# ------------------------------------------------------------------ rows

def run_row(entry: Entry, target: float | None = None) -> dict[str, Any]:
    """summarize() of the run plus the comparison figures; JSON-able (NaN where undefined)."""
    run = entry.run
    s = summarize(run)
    r = run.rounds
    idx, acc = _evaluated(run)
    raw, up = s["raw_bytes"], s["uplink_bytes"]
    s.update({
        "label": entry.label,
        "point": entry.name,
        "params": dict(entry.params),
        "world_size": int(run.attrs.get("world_size", 0) or 0),
        "best_round": int(idx[np.argmax(acc)]) + 1 if acc.size else None,
        "target_accuracy": target,
        "rounds_to_target": rounds_to_target(run, target) if target is not None else None,
        "uplink_bytes_to_target": uplink_to_target(run, target) if target is not None else None,
        "wall_s_to_target": wall_to_target(run, target) if target is not None else None,
        "bits_per_param": 32.0 * up / raw if raw else math.nan,
        "chance_accuracy": chance_accuracy(run),
        "round_s_total": float(np.nansum(r["round_s"])) if r.size else 0.0,
        "time_s": time_split(run),
    })
    s.update(per_bit_fields(run))
    _set_marginal(s, marginal_per_bit([run], auto_rate=True)[0], {})
    return s


def per_bit_fields(run: Run) -> dict[str, Any]:
    """Row keys ``acc0``, ``acc0_source`` (logged / chance), ``per_bit_accuracy`` (PBA_total, accuracy
    per uplink bit) and ``per_bit``: both definitions' texts, Acc_0 and where it came from, the totals
    and the per-round series of :func:`hpcfl.results.perbit.per_bit_accuracy` (uplink bits), one
    entry per evaluated round: ``round`` (the ``/rounds`` field: the model after round + 1 rounds),
    ``accuracy``, ``bits_cum`` (uplink bits up to and including that round), ``per_round``
    (accuracy gained since the previous evaluation per bit sent since) and ``cumulative``
    ((accuracy - Acc_0) / bits_cum)."""
    from hpcfl.results.perbit import DEFINITION_MARGINAL, DEFINITION_TOTAL, acc0_kind
    from hpcfl.results.perbit import per_bit_accuracy as _pba

    p = _pba(run)
    rnd = run.rounds["round"][p["rounds"]] if run.n_rounds and "round" in run.rounds.dtype.names else p["rounds"]
    return {
        "acc0": p["acc0"],
        "acc0_source": acc0_kind(p["acc0_source"]),
        "per_bit_accuracy": float(p["total"]),
        "per_bit": {
            "definition_total": DEFINITION_TOTAL, "definition_marginal": DEFINITION_MARGINAL,
            "acc0": p["acc0"], "acc0_source": p["acc0_source"], "bits": p["bits"], "bits_total": p["bits_total"],
            "bits_per_entry": p["bits_per_entry"], "total": float(p["total"]),
            "round": [int(v) for v in rnd], "accuracy": [float(v) for v in p["accuracy"]],
            "bits_cum": [float(v) for v in p["bits_cum"]], "per_round": [float(v) for v in p["per_round"]],
            "cumulative": [float(v) for v in p["cumulative"]],
        },
    }


def _set_marginal(row: dict[str, Any], w: dict[str, Any], labels: dict[int, str]) -> None:
    """Copy one :func:`~hpcfl.results.perbit.marginal_per_bit` row into a report row.
    ``labels``: report label by run index, to name the run it is measured against."""
    vs = "0 bits" if w["vs_index"] is None else labels.get(w["vs_index"], str(w["vs_index"]))
    row["per_bit_marginal"] = w["marginal"]
    row["per_bit_marginal_vs"] = vs
    row["per_bit"]["marginal"] = {"value": w["marginal"], "vs": vs, "rate": w["rate"], "rate_param": w["rate_param"],
                                  "d_acc": w["d_acc"], "d_bits_per_entry": w["d_bits_per_entry"],
                                  "bits_per_entry": w["bits_per_entry"]}


def compare(entries: Sequence[Entry], target: float | None = None) -> list[dict[str, Any]]:
    """One row per entry (:func:`run_row`), with the marginal per-bit accuracy of each run against the
    next lower-rate run among these entries that differs only in the codec's rate parameter
    (:func:`hpcfl.results.perbit.marginal_per_bit` with ``auto_rate``), or against 0 bits at Acc_0."""
    rows = [run_row(e, target) for e in entries]
    labels = {i: e.label for i, e in enumerate(entries)}
    for w in marginal_per_bit([e.run for e in entries], auto_rate=True):
        _set_marginal(rows[w["index"]], w, labels)
    return rows


CSV_COLUMNS = ("label", "point", "path", "status", "name", "codec", "rounds", "world_size", "final_accuracy",
               "best_accuracy", "best_round", "final_loss", "target_accuracy", "rounds_to_target",
               "uplink_bytes_to_target", "wall_s_to_target", "uplink_bytes", "downlink_bytes", "payload_bytes",
               "header_bytes", "raw_bytes", "compression_ratio", "bits_per_param", "chance_accuracy", "acc0",
               "acc0_source", "per_bit_accuracy", "per_bit_marginal", "per_bit_marginal_vs",
               "per_bit_marginal_d_acc", "per_bit_marginal_d_bits_per_entry", "wall_s", "round_s_mean",
               "round_s_total")


def _cell(row: dict[str, Any], k: str) -> Any:
    if k.startswith("per_bit_marginal_d_"):  # nested in per_bit.marginal
        return row.get("per_bit", {}).get("marginal", {}).get(k[len("per_bit_marginal_"):])
    return row.get(k)


def flat_row(row: dict[str, Any], param_keys: Sequence[str] = ()) -> dict[str, Any]:
    """One flat dict: the CSV columns, grid/varying parameters, then time per phase (s) and share."""
    out = {k: row.get(k) for k in CSV_COLUMNS[:2]}
    for k in param_keys:
        v = row.get("params", {}).get(k)
        out[k] = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else v
    out.update({k: _cell(row, k) for k in CSV_COLUMNS[2:]})
    total = row.get("round_s_total") or math.nan
    split = row.get("time_s", {})
    for p in TIME_SPLIT:
        out[f"time_{p}"] = split.get(p)
    out["time_wait_s"] = row.get("phases_s", {}).get("wait_s")
    for p in TIME_SPLIT:
        out[f"share_{p[:-2]}"] = split[p] / total if p in split and total else None
    for k in ("client_train_s_mean", "client_encode_s_mean", "client_decode_s_mean"):
        out[k] = row.get(k)
    return out


def _param_keys(rows: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r.get("params", {}):
            if k not in keys:
                keys.append(k)
    return keys


def _csv_cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def to_csv(rows: Sequence[dict]) -> str:
    """One CSV line per run; empty cells where a value is undefined (NaN, target not reached)."""
    flats = [flat_row(r, _param_keys(rows)) for r in rows]
    buf = io.StringIO()
    if not flats:
        return ""
    w = csv.DictWriter(buf, fieldnames=list(flats[0]), lineterminator="\n")
    w.writeheader()
    for f in flats:
        w.writerow({k: _csv_cell(v) for k, v in f.items()})
    return buf.getvalue()


def nan_to_none(v: Any) -> Any:
    """Strict JSON: NaN/inf become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [nan_to_none(x) for x in v]
    return v


def to_json_lines(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(nan_to_none(r), allow_nan=False) + "\n" for r in rows)


# ------------------------------------------------------------------ text table

def _bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _table(header: list[str], body: list[list[str]], left: int = 1, text: Sequence[int] = ()) -> list[str]:
    """Aligned columns: the first ``left`` and those in ``text`` left-justified, the rest right-justified."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left or i in text else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]


_PHASE_SHORT = {"bcast_s": "bcast", "compute_s": "compute", "gather_s": "gather", "records_s": "unpack",
                "decode_s": "decode", "aggregate_s": "aggregate", "eval_s": "eval", "overhead_s": "overhead"}


def format_table(rows: Sequence[dict], target: float | None = None) -> str:
    """Two tables for people: results per run, then time per round by phase."""
    if not rows:
        return "no runs"
    t = f"{target:.4g}" if target is not None else None
    head = ["run", "status", "rounds", "final acc", "best acc"]
    if t is not None:
        head += [f"rounds to {t}", f"uplink to {t}"]
    head += ["uplink", "downlink", "bits/param", "wall s"]
    body = []
    for r in rows:
        status = r["status"] if r["status"] in ("complete", "running") else "failed"
        cells = [r["label"], status, str(r["rounds"]), _num(r["final_accuracy"], ".4f"),
                 _num(r["best_accuracy"], ".4f")]
        if t is not None:
            cells += [_num(r["rounds_to_target"], "d") if r["rounds_to_target"] is not None else "not reached",
                      _bytes(r["uplink_bytes_to_target"])]
        cells += [_bytes(r["uplink_bytes"]), _bytes(r["downlink_bytes"]), _num(r["bits_per_param"], ".3g"),
                  _num(r["wall_s"], ".2f")]
        body.append(cells)
    lines = [f"{len(rows)} runs" + (f"; target accuracy {t}" if t is not None else "")]
    lines += _table(head, body)
    lines += ["", "mean time per round by phase, ms (the phases add up to the round; compute = the slowest "
              "worker's training + encoding)"]
    head2 = ["run"] + [_PHASE_SHORT[p] for p in TIME_SPLIT] + ["round"]
    body2 = []
    for r in rows:
        n = max(int(r["rounds"]), 1)
        ph = r.get("time_s", {})
        body2.append([r["label"]] + [_num(ph.get(p, math.nan) * 1e3 / n, ".2f") for p in TIME_SPLIT]
                     + [_num(r["round_s_total"] * 1e3 / n, ".2f")])
    lines += _table(head2, body2)
    lines += ["", "per-bit accuracy (methods.md §4.5), both definitions"]
    lines += _table(*per_bit_table(rows), text=(2, 5))
    lines += ["", "bits/param: uplink bits per parameter per participating client (32 = float32).",
              PER_BIT_FOOTER]
    return "\n".join(lines)


PER_BIT_FOOTER = textwrap.fill(
    "acc/Mbit (PBA_total): (final accuracy - Acc0) per Mbit of uplink, all clients and rounds (per_bit_accuracy "
    "x 1e6). Acc0: the initial model's test accuracy logged before round 0 (logged), or chance 1/classes for an "
    "older file without it (chance). marginal: (final accuracy - that of the 'vs' run) / (bits/entry - its "
    "bits/entry), accuracy per extra uplink bit per entry; 'vs' is the next lower-rate run that differs only in "
    "the codec's rate (bits, or the one codec parameter that varies), else 0 bits at Acc0.", width=110)


def per_bit_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the per-bit table: Acc0 and its source, PBA_total in accuracy per Mbit,
    measured uplink bits per entry, and the marginal definition with the run it is measured against."""
    head = ["run", "Acc0", "from", "acc/Mbit", "bits/entry", "marginal vs", "d acc", "d bits/entry",
            "acc per bit/entry"]
    body = []
    for r in rows:
        pb = r.get("per_bit", {})
        m = pb.get("marginal", {})
        total = r.get("per_bit_accuracy")
        body.append([r["label"], _num(r.get("acc0"), ".4f"), str(r.get("acc0_source", "")),
                     _num(total * 1e6 if total is not None else None, ".4g"), _num(pb.get("bits_per_entry"), ".3f"),
                     str(m.get("vs", "-")), _num(m.get("d_acc"), "+.4f"), _num(m.get("d_bits_per_entry"), ".3f"),
                     _num(m.get("value"), "+.4g")])
    return head, body
