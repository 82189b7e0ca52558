"""docs/reproduction.md: the five published methods, the papers' figures beside ours, from a manifest and run files.

``hpcfl analyze reproduction [--runs runs/] [--run-missing] [--out docs/reproduction.md]``

The manifest (``docs/reproduction.toml``, data) names per method the runs (job file, ``--set``
overrides, output path under ``--runs``), what the paper reports (copied from methods.md with its
confidence tag), and which tables and figures to draw. This module reads it, finds each run file
and classifies it, computes every "ours" figure from the HDF5 files (through
:mod:`hpcfl.results`), draws the PNGs and writes the Markdown. Paper figures come only from the
manifest's ``paper`` strings; measured figures only from run files, so one is never shown as the
other. Runs without a usable file are listed (with the command that makes them) instead of
failing the report; ``--run-missing`` makes them first with ``hpcfl run``.

The report is never replaced by a poorer one by accident: when fewer runs are usable than the
existing report at ``--out`` was built from (its run inventory), generation refuses (UsageError,
exit 2) unless ``force``. Figures are drawn into a staging directory and replace the old ones, and
figures no longer drawn are removed, only after the new report has been written.

Table and figure kinds specific to one method are in :mod:`hpcfl.analysis.reproduction_kinds`.
No MPI; torch is imported only when a FalCom kind reads its per-slot helpers (``hpcfl.codecs``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hpcfl.errors import UsageError
from hpcfl.results.reader import Run, load_run

__all__ = ["TAGS", "RunSpec", "MethodSpec", "Manifest", "RunState", "load_manifest", "resolve_runs",
           "run_missing", "report_inventory", "generate", "METRICS", "main"]

#: Confidence tags of methods.md §0.1; every paper claim in the manifest carries one.
TAGS = ("CODE", "CODE-rel", "ABS", "MEM", "INF", "TBD")
#: A file still marked "running" but untouched for this long is taken as a killed run (re-run by --run-missing).
STALE_S = 900.0
#: States whose run file holds results the report uses: finished, or stopped on non-finite updates.
USABLE = ("complete", "diverged")
_IGNORED_KEYS = ("log.", "run.name")


# ------------------------------------------------------------------ manifest

@dataclass(frozen=True)
class RunSpec:
    """One run of the manifest: ``hpcfl run JOB --set S ... --out RUNS/OUT``."""

    id: str
    label: str
    job: str
    sets: tuple[str, ...]
    out: str

    def command(self, runs_dir: Path | str) -> str:
        parts = ["hpcfl", "run", self.job, *itertools.chain.from_iterable(("--set", s) for s in self.sets),
                 "--out", str(Path(runs_dir) / self.out)]
        return " ".join(shlex.quote(p) for p in parts)


@dataclass
class MethodSpec:
    key: str
    title: str
    paper: str
    spec_section: str
    confidence: str
    doc: str
    key_metric: str
    differences: list[str]
    claims: list[dict]
    runs: list[RunSpec]
    tables: list[dict]
    figures: list[dict]

    def run(self, rid: str) -> RunSpec:
        for r in self.runs:
            if r.id == rid:
                return r
        raise KeyError(rid)

    def match(self, patterns: Sequence[str]) -> list[RunSpec]:
        """Runs whose id matches any of the shell patterns, in manifest order."""
        return [r for r in self.runs if any(fnmatch.fnmatchcase(r.id, p) for p in patterns)]


@dataclass
class Manifest:
    path: Path
    title: str
    spec: str
    methods: list[MethodSpec]


_FIELD = re.compile(r"\{(\w+)\}")


def _fill(template: str, values: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise UsageError(f"{where}: {{{m.group(1)}}} is not a grid axis (have {', '.join(sorted(values))})")
        return values[m.group(1)]

    return _FIELD.sub(sub, template)


def _expand_run(d: dict, where: str) -> list[RunSpec]:
    for k in ("id", "job", "out"):
        if not isinstance(d.get(k), str) or not d[k]:
            raise UsageError(f"{where}: a run needs a string {k!r}")
    sets = d.get("set", [])
    grid = d.get("grid", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise UsageError(f"{where}: 'set' must be a list of override strings")
    if not isinstance(grid, list) or not all(isinstance(a, list) and len(a) == 2 and isinstance(a[0], str)
                                             and isinstance(a[1], list) and a[1] for a in grid):
        raise UsageError(f"{where}: 'grid' must be a list of [KEY, [VALUE, ...]] pairs")
    keys = [a[0] for a in grid]
    dotted = [k for k in keys if "." in k]
    out = []
    for combo in itertools.product(*([str(v) for v in a[1]] for a in grid)):
        texts = dict(zip(keys, combo))
        values = {k.split(".")[-1]: t for k, t in texts.items()}
        sub = itertools.product(*([str(v) for v in a[1]] for a in grid if "." in a[0]))
        index = list(sub).index(tuple(texts[k] for k in dotted)) if dotted else 0
        values["i"] = f"{index:04d}"
        label = d.get("label", d["id"])
        out.append(RunSpec(_fill(d["id"], values, where), _fill(label, values, where), _fill(d["job"], values, where),
                           tuple(f"{k}={t}" for k, t in texts.items() if "." in k) + tuple(sets),
                           _fill(d["out"], values, where)))
    return out


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check the manifest: tags, unique run ids, known kinds, patterns that match runs."""
    from hpcfl.analysis.reproduction_kinds import FIGURES, TABLES

    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no such manifest: {p}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{p}: not a readable TOML manifest: {e}") from None
    methods = []
    for mi, m in enumerate(raw.get("method", [])):
        where = f"{p}: method {m.get('key', mi)!r}"
        runs: list[RunSpec] = []
        for ri, r in enumerate(m.get("run", [])):
            runs += _expand_run(r, f"{where}, run {r.get('id', ri)!r}")
        ids = [r.id for r in runs]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise UsageError(f"{where}: run ids not unique: {', '.join(dup)}")
        spec = MethodSpec(m.get("key", f"m{mi}"), m.get("title", ""), m.get("paper", ""), m.get("spec_section", ""),
                          m.get("confidence", ""), m.get("doc", ""), m.get("key_metric", ""),
                          list(m.get("differences", [])), list(m.get("claim", [])), runs, list(m.get("table", [])),
                          list(m.get("figure", [])))
        for c in spec.claims:
            if c.get("tag") not in TAGS:
                raise UsageError(f"{where}: claim {c.get('text', '')[:40]!r}: tag {c.get('tag')!r} is not one of "
                                 f"{', '.join(TAGS)} (methods.md §0.1)")
            for ref in c.get("ours", []):
                if ref.startswith("@"):
                    continue
                rid, _, metric = ref.rpartition(":")
                if rid not in ids:
                    raise UsageError(f"{where}: claim reference {ref!r}: no run {rid!r}")
                if metric not in METRICS:
                    raise UsageError(f"{where}: claim reference {ref!r}: unknown metric {metric!r}")
        for kind_table, items, what in ((TABLES, spec.tables, "table"), (FIGURES, spec.figures, "figure")):
            for t in items:
                if t.get("kind") not in kind_table:
                    raise UsageError(f"{where}: {what} kind {t.get('kind')!r} unknown (have {', '.join(kind_table)})")
                for pat in _patterns(t):
                    if pat and not spec.match([pat]):
                        raise UsageError(f"{where}: {what} {t.get('title', t.get('file', t['kind']))!r}: "
                                         f"pattern {pat!r} matches no run")
                for col in t.get("columns", []):
                    if col not in METRICS and not col.startswith("param:"):
                        raise UsageError(f"{where}: {what} column {col!r} unknown (have {', '.join(METRICS)})")
            if what == "figure" and any("file" not in t for t in items):
                raise UsageError(f"{where}: every figure needs a 'file' name")
        methods.append(spec)
    if not methods:
        raise UsageError(f"{p}: no [[method]] in the manifest")
    return Manifest(p, raw.get("title", "Reproduction report"), raw.get("spec", ""), methods)


def _patterns(t: dict) -> list[str]:
    """Every run pattern a table or figure names (runs, rows, groups, series, refs, reference)."""
    out = list(t.get("runs", [])) + list(t.get("refs", []))
    for key in ("reference", "qsgd"):
        if t.get(key):
            out.append(t[key])
    for row in t.get("rows", []):
        out += [x for x in row[1:] if x]
    for _, pats in t.get("groups", []) + t.get("series", []):
        out += list(pats)
    return out


# ------------------------------------------------------------------ run files

@dataclass
class RunState:
    """A manifest run and what is on disk: state, detail, the run's job, differences from the manifest.

    The run file itself is loaded on first use of ``run`` and dropped by ``release()``, so a report
    holds the files of one method at a time.
    """

    spec: RunSpec
    path: Path
    state: str  # complete | diverged | missing | in progress | interrupted | failed | unreadable
    detail: str = ""
    job: dict | None = None  # the job the run file records
    n_rounds: int = 0
    differs: list[str] = field(default_factory=list)
    n_params: int | None = None
    wall_s: float | None = None  # the file's last wall_time: round 0 to the last evaluation (start-up excluded)
    _run: Run | None = field(default=None, repr=False)

    @property
    def run(self) -> Run | None:
        if self._run is None and self.job is not None:
            self._run = load_run(self.path)
        return self._run

    def release(self) -> None:
        self._run = None

    @property
    def usable(self) -> bool:
        return self.state in USABLE and self.n_rounds > 0

    @property
    def needs_run(self) -> bool:
        """What --run-missing runs: no file, a failure other than divergence, a killed or unreadable run."""
        return self.state in ("missing", "interrupted", "failed", "unreadable")

    def describe(self) -> str:
        return self.state + (f" ({self.detail})" if self.detail else "")


def _peek(path: Path) -> tuple[str, dict, int, int | None, float | None]:
    """(status, job, rounds written, parameters, wall seconds of the last round) of a run file, without
    loading its tables (UsageError if it is not one)."""
    import h5py

    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            if "rounds" not in f or "schema_version" not in f.attrs:
                raise UsageError(f"{path} is an HDF5 file but not an hpcfl run file")
            status, job = f.attrs.get("status", ""), f.attrs.get("job_json", "{}")
            rounds = f["rounds"]
            n = int(rounds.shape[0])
            params = int(f.attrs["n_params"]) if "n_params" in f.attrs else None
            names = rounds.dtype.names or ()
            wall = float(rounds[n - 1]["wall_time"]) if n and "wall_time" in names else None
    except OSError as e:
        raise UsageError(f"{path} is not a readable HDF5 run file: {e}") from None
    status = status.decode() if isinstance(status, bytes) else str(status)
    job = job.decode() if isinstance(job, bytes) else str(job)
    return status, json.loads(job), n, params, (wall if wall is not None and math.isfinite(wall) else None)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def job_differences(spec: RunSpec, job: dict) -> list[str]:
    """Job keys whose value in the run file (``job``) differs from the manifest's job file + overrides.

    ``log.*`` and ``run.name`` are ignored, and so are keys the run file does not have (added to
    the schema after the run was made). A job file that no longer loads is reported as such.
    """
    from hpcfl.config import load_job
    from hpcfl.errors import HpcflError

    try:
        want = _flatten(load_job(spec.job, list(spec.sets)).to_dict())
    except (HpcflError, OSError) as e:
        return [f"job file does not load: {e}"]
    have = _flatten(job)
    out = []
    for k in sorted(have):
        if k.startswith(_IGNORED_KEYS[0]) or k == _IGNORED_KEYS[1]:
            continue
        if k not in want:
            out.append(f"{k} = {json.dumps(have[k])} (not in the manifest's job)")
        elif json.dumps(have[k], sort_keys=True) != json.dumps(want[k], sort_keys=True):
            out.append(f"{k} = {json.dumps(have[k])} (manifest: {json.dumps(want[k])})")
    return out


def resolve(spec: RunSpec, runs_dir: Path, now: float | None = None) -> RunState:
    """Find and classify the run file of one manifest run (never raises for a bad file; loads no table)."""
    path = runs_dir / spec.out
    if not path.exists():
        return RunState(spec, path, "missing")
    try:
        status, job, n, params, wall = _peek(path)
    except UsageError as e:
        return RunState(spec, path, "unreadable", str(e))
    total = int(job.get("run", {}).get("rounds", 0) or 0)
    done = f"{n} of {total} rounds"
    if status == "complete":
        state, detail = "complete", ""
    elif status.startswith("failed: NumericalFault"):
        m = re.search(r"in round (\d+)", status)
        state, detail = "diverged", f"{done}: non-finite update" + (f" in round {m.group(1)}" if m else "")
    elif status == "running":
        age = (now if now is not None else time.time()) - path.stat().st_mtime
        state = "interrupted" if age > STALE_S else "in progress"
        detail = f"{done}, file untouched for {age / 60:.0f} min" if age > STALE_S else done
    else:
        state, detail = "failed", f"{done}: {status.removeprefix('failed: ')}"
    return RunState(spec, path, state, detail, job, n, job_differences(spec, job), params, wall)


def resolve_runs(manifest: Manifest, runs_dir: str | os.PathLike) -> dict[tuple[str, str], RunState]:
    """States of every manifest run, keyed by (method key, run id)."""
    d = Path(runs_dir)
    now = time.time()
    return {(m.key, r.id): resolve(r, d, now) for m in manifest.methods for r in m.runs}


def run_missing(manifest: Manifest, runs_dir: str | os.PathLike, *, python: str | None = None,
                echo: Callable[[str], None] = print) -> list[tuple[RunSpec, int]]:
    """Run, one after another with ``hpcfl run``, every manifest run without a usable file.

    A run marked "running" whose file changed in the last STALE_S seconds is being written by
    someone else and is skipped. Diverged runs are results, not re-run. Returns (run, exit code).
    """
    states = resolve_runs(manifest, runs_dir)
    todo = [s for s in states.values() if s.needs_run]
    for s in states.values():
        if s.state == "in progress":
            echo(f"skipped {s.spec.id}: {s.path} is being written ({s.detail})")
    results = []
    for n, s in enumerate(todo, 1):
        s.path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [python or sys.executable, "-m", "hpcfl", "run", s.spec.job,
               *itertools.chain.from_iterable(("--set", x) for x in s.spec.sets),
               "--out", str(s.path), "--overwrite", "--progress", "off"]
        echo(f"[{n}/{len(todo)}] {s.spec.id} ({s.describe()}): {s.spec.command(runs_dir)}")
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        echo(f"[{n}/{len(todo)}] {s.spec.id}: exit {rc} ({time.perf_counter() - t0:.0f} s)")
        results.append((s.spec, rc))
    return results


# ------------------------------------------------------------------ per-run metrics

def fmt_bytes(n: float | None) -> str:
    """Decimal units, 3 significant digits: 5.25 GB, 59.9 kB."""
    if n is None or not math.isfinite(n):
        return "—"
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n:.0f} B"


def _num(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, str):
        return v
    return format(v, spec)


@dataclass(frozen=True)
class Metric:
    header: str
    fn: Callable[["RunState", dict], Any]
    fmt: Callable[[Any], str]
    help: str


def _evaluated(run: Run) -> np.ndarray:
    acc = run.rounds["accuracy"].astype(np.float64) if run.n_rounds else np.zeros(0)
    return acc[np.isfinite(acc)]


def _final(s: RunState, _: dict) -> float | None:
    a = _evaluated(s.run)
    return float(a[-1]) if a.size else None


def _best(s: RunState, _: dict) -> float | None:
    a = _evaluated(s.run)
    return float(a.max()) if a.size else None


def _last5(s: RunState, _: dict) -> float | None:
    a = _evaluated(s.run)
    return float(a[-5:].mean()) if a.size else None


def _to_target(s: RunState, opts: dict) -> Any:
    from hpcfl.results.compare import rounds_to_target

    t = opts.get("target")
    if t is None:
        return None
    n = rounds_to_target(s.run, float(t))
    return "not reached" if n is None else n


def _sum(s: RunState, col: str) -> float:
    return float(s.run.rounds[col].astype(np.float64).sum())


def _participations(s: RunState) -> float:
    c = s.run.clients
    return float(c["participated"].astype(bool).sum()) if c and "participated" in c else math.nan


def _ratio(s: RunState, _: dict) -> float | None:
    up = _sum(s, "uplink_bytes")
    return _sum(s, "raw_bytes") / up if up > 0 else None


def _up_ratio(s: RunState, _: dict) -> float | None:
    pay = _sum(s, "payload_bytes")
    return _sum(s, "raw_bytes") / pay if pay > 0 else None


def _per_participation(s: RunState, col: str, scale: float = 1.0) -> float | None:
    n = _participations(s)
    return _sum(s, col) / n / scale if n and math.isfinite(n) else None


def _down_over_up(s: RunState, _: dict) -> float | None:
    pay = _sum(s, "payload_bytes")
    return _sum(s, "downlink_bytes") / pay if pay > 0 else None


def _bits(s: RunState, _: dict) -> float:
    from hpcfl.results.perbit import bits_per_entry

    return bits_per_entry(s.run, "uplink")


def _pba(s: RunState, _: dict) -> float:
    from hpcfl.results.perbit import per_bit_accuracy

    return float(per_bit_accuracy(s.run)["total"]) * 1e6


def _stat(s: RunState, name: str) -> np.ndarray:
    return s.run.codec_stat(name) if name in s.run.codec_stat_names() else np.full((0,), np.nan)


def _max_err(s: RunState, _: dict) -> float | None:
    v = _stat(s, "max_err_over_eb")
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else None


def _beta_median(s: RunState, _: dict) -> float | None:
    v = _stat(s, "beta")
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


_RECYCLING: dict[str, dict] = {}


def _recycling(s: RunState) -> dict:
    from hpcfl.analysis.recycling import recycling_summary

    key = f"{s.path}:{s.path.stat().st_mtime_ns}"
    if key not in _RECYCLING:
        _RECYCLING[key] = recycling_summary(s.path)
    return _RECYCLING[key]


def energy_per_round(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Per round: mean over reporting clients and slots of ``energy_topk_orig`` and ``energy_topk_mapped``."""
    out = []
    for name in ("energy_topk_orig", "energy_topk_mapped"):
        v = run.codec_stat(name) if name in run.codec_stat_names() else np.full((run.n_rounds, 1, 1), np.nan)
        with _quiet():
            out.append(np.nanmean(v.reshape(v.shape[0], -1), axis=1))
    return out[0], out[1]


@contextlib.contextmanager
def _quiet():
    """Silence numpy's "mean of empty slice" for rounds without a statistic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def energy_window(run: Run, lo: int, hi: int) -> tuple[float, float]:
    """Mean (original, mapped) top-k energy share over rounds lo..hi (0-based, inclusive)."""
    o, m = energy_per_round(run)
    sel = slice(max(lo, 0), min(hi, run.n_rounds - 1) + 1)
    with _quiet():
        return float(np.nanmean(o[sel])) if o[sel].size else math.nan, \
            float(np.nanmean(m[sel])) if m[sel].size else math.nan


def _energy(s: RunState, _: dict) -> str | None:
    o, m = energy_window(s.run, 1, s.run.n_rounds - 1)
    if not (math.isfinite(o) and math.isfinite(m)):
        return None
    return f"{o:.3f} → {m:.3f}"


def _status(s: RunState, _: dict) -> str:
    from hpcfl.results.compare import chance_accuracy

    text = s.describe()
    f = _final(s, {}) if s.usable else None
    if s.state == "complete" and f is not None and f < chance_accuracy(s.run) + 0.02:
        text += ", ended at chance"
    return text


def _pct(v: Any) -> str:
    return _num(v * 100 if isinstance(v, float) else v, ".1f") + ("%" if isinstance(v, float) else "")


_F4 = lambda v: _num(v, ".4f")  # noqa: E731

#: Per-run metrics for ``runs`` tables and claim references ("RUN:metric").
METRICS: dict[str, Metric] = {
    "status": Metric("status", _status, str, "state of the run file"),
    "rounds": Metric("rounds", lambda s, o: s.run.n_rounds, str, "rounds in the file"),
    "final": Metric("final acc", _final, _F4, "last evaluated test accuracy"),
    "best": Metric("best acc", _best, _F4, "best evaluated test accuracy"),
    "last5": Metric("last 5", _last5, _F4, "mean of the last five evaluations"),
    "to_target": Metric("rounds to target", _to_target, lambda v: _num(v, "d"),
                        "completed rounds until the first evaluation >= the table's target"),
    "uplink": Metric("uplink total", lambda s, o: _sum(s, "uplink_bytes"), fmt_bytes,
                     "uplink bytes (payload + header), all clients and rounds"),
    "downlink": Metric("downlink total", lambda s, o: _sum(s, "downlink_bytes"), fmt_bytes,
                       "downlink bytes the method's protocol sends, all clients and rounds"),
    "uplink_round": Metric("uplink/round", lambda s, o: _sum(s, "uplink_bytes") / max(s.run.n_rounds, 1), fmt_bytes,
                           "mean uplink bytes per round, all sampled clients"),
    "ratio": Metric("vs uncompressed", _ratio, lambda v: _num(v, ".2f") + ("×" if v else ""),
                    "raw float32 bytes / uplink bytes (headers included)"),
    "up_ratio": Metric("up ratio D/d", _up_ratio, lambda v: _num(v, ".1f") + ("×" if v else ""),
                       "raw float32 bytes / payload bytes"),
    "up_floats": Metric("up floats/client/round", lambda s, o: _per_participation(s, "payload_bytes", 4.0),
                        lambda v: _num(v, ".0f"), "payload floats per sampled client per round"),
    "down_floats": Metric("down floats/client/round", lambda s, o: _per_participation(s, "downlink_bytes", 4.0),
                          lambda v: _num(v, ".0f"), "downlink floats per sampled client per round"),
    "down_over_up": Metric("downlink/uplink", _down_over_up, lambda v: _num(v, ".2f") + ("×" if v else ""),
                           "downlink bytes over uplink payload bytes"),
    "bits": Metric("bits/entry", _bits, lambda v: _num(v, ".3f"),
                   "measured uplink bits per model entry per sampled client"),
    "pba": Metric("PBA_total (acc/Mbit)", _pba, lambda v: _num(v, ".4f"),
                  "(final − chance) / uplink bits, per Mbit"),
    "max_err": Metric("max err/eb", _max_err, lambda v: _num(v, ".3f"),
                      "max over lossy tensors and messages of max |x − x̂| / eb"),
    "beta_median": Metric("median β", _beta_median, lambda v: _num(v, ".2f"), "median fitted GenNorm β"),
    "recycled": Metric("recycled", lambda s, o: _recycling(s)["mean_recycled_fraction"], lambda v: _num(v, ".3f"),
                       "mean fraction of tensors recycled"),
    "floats_client": Metric("floats/client", lambda s, o: _recycling(s)["cum_floats_per_client"],
                            lambda v: _num(v, ".3g"), "cumulative payload floats per client"),
    "floats_saved": Metric("saved", lambda s, o: _recycling(s)["floats_saved"], _pct,
                           "1 − floats / uncompressed floats"),
    "root_state_mb": Metric("root state MB", lambda s, o: _recycling(s)["root_state_bytes_max"] / 1e6,
                            lambda v: _num(v, ".1f"), "largest root codec state"),
    "energy": Metric("top-k energy orig → mapped", _energy, lambda v: _num(v, ""),
                     "mean top-k energy share before and after the map, rounds >= 1"),
}


def param(s: RunState, key: str) -> Any:
    """A job value of a run ("codec.dim"), from the run file, else from the manifest's job."""
    if s.job is not None:
        v = _flatten(s.job).get(key)
        if v is not None:
            return v
    try:
        from hpcfl.config import load_job

        return _flatten(load_job(s.spec.job, list(s.spec.sets)).to_dict()).get(key)
    except Exception:  # noqa: BLE001 - a missing job file shows as "—"
        return None


def metric_value(s: RunState, name: str, opts: dict | None = None) -> Any:
    """The raw value of a metric or ``param:KEY`` for a usable run (None otherwise)."""
    if name.startswith("param:"):
        return param(s, name[6:])
    if name == "status":
        return _status(s, {})
    if not s.usable:
        return None
    return METRICS[name].fn(s, opts or {})


def metric_text(s: RunState, name: str, opts: dict | None = None) -> str:
    v = metric_value(s, name, opts)
    if name.startswith("param:"):
        return "—" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))
    if v is None and not s.usable and name != "status":
        return "—"
    return METRICS[name].fmt(v)


def header(name: str, opts: dict | None = None) -> str:
    if name.startswith("param:"):
        return name[6:].split(".")[-1]
    if name == "to_target" and opts and opts.get("target") is not None:
        return f"rounds to {opts['target']:g}"
    return METRICS[name].header


# ------------------------------------------------------------------ Markdown

def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(c: Any) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def run_label(s: RunState) -> str:
    return s.spec.label if s.usable and s.state == "complete" else f"{s.spec.label} ({s.state})"


@dataclass
class Context:
    """What a table or figure kind gets: the method, its run states, where figures go, published values."""

    method: MethodSpec
    states: dict[str, RunState]  # run id -> state (this method)
    img_dir: Path
    img_rel: str  # the figure directory relative to the report
    values: dict[str, str]  # "@name" references for claims
    figures: dict[str, str] = field(default_factory=dict)  # figure file stem -> markdown link

    def select(self, patterns: Sequence[str]) -> list[RunState]:
        return [self.states[r.id] for r in self.method.match(patterns)]

    def one(self, rid: str) -> RunState | None:
        return self.states.get(rid) if rid else None


# ------------------------------------------------------------------ the document

def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _claim_ours(ctx: Context, refs: Sequence[str]) -> str:
    parts = []
    for ref in refs:
        if ref.startswith("@fig."):
            stem = ref[5:]
            parts.append(f"figure [{stem}](#{_anchor(stem)})" if stem in ctx.figures else
                         f"figure {stem}: not drawn (runs missing)")
        elif ref.startswith("@"):
            parts.append(ctx.values.get(ref[1:], f"{ref[1:]}: — (not computed: its runs are missing)"))
        else:
            rid, _, metric = ref.rpartition(":")
            s = ctx.states[rid]
            if not s.usable:
                parts.append(f"{s.spec.label}: — ({s.state})")
            else:
                extra = " (diverged)" if s.state == "diverged" else ""
                parts.append(f"{s.spec.label}, {header(metric)}: {metric_text(s, metric)}{extra}")
    return "<br>".join(parts) if parts else "not measured here"


def _heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def _anchor(text: str) -> str:
    a = re.sub(r"[^\w\- ]", "", text.lower()).strip().replace(" ", "-")
    return f"figure-{a}"


def _setup_rows(ctx: Context) -> list[list[str]]:
    from hpcfl.config import load_job

    by_job: dict[str, list[RunState]] = {}
    for r in ctx.method.runs:
        by_job.setdefault(r.job, []).append(ctx.states[r.id])
    rows = []
    for job, states in by_job.items():
        used = next((s for s in states if s.job is not None), None)
        try:
            j = used.job if used else load_job(job, list(states[0].spec.sets)).to_dict()
        except Exception as e:  # noqa: BLE001 - the row says why
            rows.append([f"`{job}`", str(len(states)), f"job does not load: {e}", "", "", "", "", ""])
            continue
        d, mdl, tr, sv, rn = (j.get(k, {}) for k in ("data", "model", "train", "server", "run"))
        part = d.get("partition", "")
        if part == "shards":
            part += f", {d.get('classes_per_client')} classes per client"
        elif part == "dirichlet":
            part += f"({d.get('alpha')})"
        n = int(d.get("n_clients", 0) or 0)
        per = tr.get("clients_per_round") or round(n * float(tr.get("client_fraction", 1.0) or 0))
        if tr.get("algorithm") == "fedsgd":
            how = "FedSGD, " + ("full local batch" if tr.get("full_batch") else f"batch {tr.get('batch_size')}")
        else:
            steps = (f"{tr.get('local_epochs'):g} epoch(s)" if tr.get("local_epochs") else
                     f"{tr.get('local_steps')} steps")
            how = f"FedAvg, {steps} of batch {tr.get('batch_size')}, lr {tr.get('lr')}"
        params = used.n_params if used else None
        model = str(mdl.get("name", "")) + (f" ({int(params):,} parameters)" if params else "")
        rows.append([f"`{job}`", str(len(states)), f"{d.get('dataset')}, {part}", model, f"{n} ({per} per round)",
                     how, f"SGD lr {sv.get('lr')}, momentum {sv.get('momentum')}", str(rn.get("rounds"))])
    return rows


def _method_section(ctx: Context, number: int, manifest: Manifest, runs_dir: Path, out_dir: Path) -> str:
    from hpcfl.analysis.reproduction_kinds import FIGURES, TABLES

    m = ctx.method
    # tables and figures first: they publish the "@" values the claims table shows
    blocks = []
    for t in m.tables:
        title = t.get("title", t["kind"])
        body = TABLES[t["kind"]](ctx, t)
        cap = f"\n\n{t['caption']}" if t.get("caption") else ""
        blocks.append(f"#### {title}\n\n{body}{cap}")
    figs = []
    for f in m.figures:
        out = ctx.img_dir / f"{f['file']}.png"
        used = [s for s in ctx.select(_patterns(f)) if s.usable]
        skipped = [s for s in ctx.select(_patterns(f)) if not s.usable]
        title = f.get("title") or f["file"]
        if not used:
            figs.append(f"<a id=\"{_anchor(f['file'])}\"></a>**{title}**: not drawn, none of its runs has a "
                        "usable file.")
            continue
        path = FIGURES[f["kind"]](ctx, f, out)
        extra = ""
        if isinstance(path, tuple):
            path, extra = path
        if path is None:
            figs.append(f"<a id=\"{_anchor(f['file'])}\"></a>**{title}**: not drawn (no data in its runs).")
            continue
        link = f"{ctx.img_rel}/{out.name}"
        ctx.figures[f["file"]] = link
        note = f" Not in the figure (no usable file): {', '.join(s.spec.id for s in skipped)}." if skipped else ""
        note += f" {extra}" if extra else ""
        figs.append(f"<a id=\"{_anchor(f['file'])}\"></a>**{title}** (`{out.name}`; runs: "
                    f"{', '.join(s.spec.id for s in used)}).{note}\n\n![{title}]({link})")

    notes = f" *Our method notes:* [{m.doc}]({Path(os.path.relpath(m.doc, out_dir)).as_posix()})." if m.doc else ""
    lines = [f"## {number}. {m.title}", "",
             f"*Paper:* {m.paper}. *Spec:* `{manifest.spec}` {m.spec_section}; overall confidence: "
             f"{m.confidence}.{notes}", "",
             f"*Key metric:* {m.key_metric}.", "",
             "### What the paper reports, and what we measured", ""]
    rows = []
    for c in m.claims:
        rows.append([c.get("text", ""), f"[{c['tag']}]", c.get("paper", ""), _claim_ours(ctx, c.get("ours", [])),
                     c.get("note", "")])
    lines += [md_table(["claim", "source", "paper reports (methods.md)", "ours (measured, from run files)", "note"],
                       rows), ""]
    lines += ["### Our setup", "", md_table(["job file", "runs", "data", "model", "clients", "training", "server",
                                             "rounds"], _setup_rows(ctx)), "",
              "Per-run overrides and output files are in the run list at the end of this section.", ""]
    lines += ["### Measured", ""] + [b + "\n" for b in blocks]
    if figs:
        lines += ["### Figures", ""] + [f + "\n" for f in figs]
    lines += ["### Differences from the paper, honestly", ""]
    lines += [f"- {d}" for d in m.differences]
    states = [ctx.states[r.id] for r in m.runs]
    absent = [s for s in states if not s.usable]
    if absent:
        lines.append(f"- At generation time {len(absent)} of {len(states)} runs had no usable file: "
                     + ", ".join(f"`{s.spec.id}` ({s.describe()})" for s in absent)
                     + ". Their cells read \"—\"; `--run-missing` makes them.")
    div = [s for s in states if s.state == "diverged"]
    if div:
        lines.append("- Stopped on non-finite updates (kept as results: they diverged): "
                     + ", ".join(f"`{s.spec.id}` ({s.detail})" for s in div) + ".")
    for s in states:
        if s.differs:
            lines.append(f"- `{s.spec.id}`: the run file's job differs from the manifest's: "
                         + "; ".join(s.differs[:4]) + (" …" if len(s.differs) > 4 else "") + ".")
    lines += ["", "<details><summary>Run list: commands and files</summary>", "",
              md_table(["run", "status", "file", "command"],
                       [[s.spec.id, s.describe(), f"`{s.path}`", f"`{s.spec.command(runs_dir)}`"] for s in states]),
              "", "</details>", ""]
    return "\n".join(x for x in lines if x is not None)


def report_inventory(path: str | os.PathLike) -> dict[str, int] | None:
    """The run counts an existing report states in its "Run inventory" table, summed over methods:
    {"runs", "complete", "diverged", "usable", "unusable"}; None if there is no such file or table."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    try:
        start = lines.index("## Run inventory")
    except ValueError:
        return None
    table = list(itertools.takewhile(lambda ln: ln.startswith("|"),
                                     itertools.dropwhile(lambda ln: not ln.startswith("|"), lines[start + 1:])))
    if len(table) < 3:
        return None
    head = [c.strip() for c in table[0].strip("|").split("|")]
    cols = {"runs": "runs", "complete": "complete", "diverged": "diverged (kept)", "unusable": "no usable file"}
    if any(h not in head for h in cols.values()):
        return None
    tot = dict.fromkeys(cols, 0)
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for k, h in cols.items():
            try:
                tot[k] += int(cells[head.index(h)])
            except (IndexError, ValueError):
                return None
    tot["usable"] = tot["runs"] - tot["unusable"]
    return tot


def _hours(s: float) -> str:
    return (f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else
            f"{s:.0f} s" if s >= 10 else f"{s:.1f} s")


def _wall_line(states: Sequence[RunState]) -> str | None:
    """One sentence on how long the usable runs took (their files' wall_time), or None if none records it."""
    walls = sorted((s.wall_s, s.spec.id) for s in states if s.usable and s.wall_s is not None)
    if not walls:
        return None
    total = sum(w for w, _ in walls)
    longest, lid = walls[-1]
    return (f"Wall time recorded in the {len(walls)} usable run files (round 0 to the last evaluation; process "
            f"start-up not included): {_hours(total)} in total, median {_hours(walls[len(walls) // 2][0])} per "
            f"run, longest {_hours(longest)} (`{lid}`). `--run-missing` makes runs one after another, so making "
            "them all again takes at least that total on a machine like the one that made them.")


def generate(manifest_path: str | os.PathLike, runs_dir: str | os.PathLike, out: str | os.PathLike,
             img_dir: str | os.PathLike | None = None, *, command: str | None = None,
             force: bool = False) -> dict[str, Any]:
    """Write the report and its figures; returns {"present": [...], "missing": [...], "out": path}.

    Missing runs never fail the report: they are listed, and every cell that needs them reads "—".
    But when fewer runs are usable than the existing report at ``out`` was built from (its run
    inventory), nothing is drawn or written and UsageError says so, unless ``force``.
    The figure directory belongs to the report: figures are drawn into a staging directory, and only
    after the report has been written do they replace the old ones and are PNGs this generation did
    not draw removed (an error or a refusal leaves report and figures as they were).
    """
    manifest = load_manifest(manifest_path)
    runs = Path(runs_dir)
    out = Path(out)
    img = Path(img_dir) if img_dir is not None else out.parent / "img" / "reproduction"
    states = resolve_runs(manifest, runs)
    n_usable = sum(s.usable for s in states.values())
    before = report_inventory(out)
    if before is not None and n_usable < before["usable"] and not force:
        raise UsageError(
            f"not overwriting {out}: only {n_usable} of {len(states)} manifest runs have a usable file under "
            f"{runs}/, but the existing report was built from {before['usable']} ({before['complete']} complete, "
            f"{before['diverged']} diverged); --force writes it anyway, --run-missing first makes the missing runs")
    img.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{img.name}.new-", dir=img.parent))
    try:
        text, drawn = _document(manifest, states, runs, out, img, stage, command)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
        # the report is written: its figures replace the old ones, and the directory (which belongs to the
        # report) loses the PNGs this generation did not draw
        for png in stage.glob("*.png"):
            os.replace(png, img / png.name)
        for png in img.glob("*.png"):
            if png.name not in drawn:
                png.unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"out": str(out), "present": [s.spec.id for s in states.values() if s.usable],
            "missing": [(k, s.spec.id, s.describe()) for (k, _), s in states.items() if not s.usable]}


def _document(manifest: Manifest, states: dict[tuple[str, str], RunState], runs: Path, out: Path, img: Path,
              stage: Path, command: str | None) -> tuple[str, set[str]]:
    """The report's Markdown and the names of the figures drawn (into ``stage``; linked as in ``img``)."""
    values: dict[str, str] = {}
    drawn: set[str] = set()
    sections = []
    for i, m in enumerate(manifest.methods, 1):
        ctx = Context(m, {r.id: states[(m.key, r.id)] for r in m.runs}, stage,
                      Path(os.path.relpath(img, out.parent)).as_posix(), values)
        sections.append(_method_section(ctx, i, manifest, runs, out.parent))
        drawn.update(Path(link).name for link in ctx.figures.values())
        for s in ctx.states.values():
            s.release()  # one method's run files in memory at a time
    all_states = list(states.values())
    present = [s for s in all_states if s.usable]
    absent = [s for s in all_states if not s.usable]
    cmd = command or (f"hpcfl analyze reproduction --runs {runs} --out {out}"
                      + ("" if manifest.path == Path("docs/reproduction.toml") else f" --manifest {manifest.path}"))
    head = [f"# {manifest.title}", "",
            f"Generated by `{cmd}` from [{manifest.path.name}]({os.path.relpath(manifest.path, out.parent)}) and the "
            f"run files under `{runs}/` on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
            f"(commit {_git_commit()}). Do not edit by hand: change the manifest or the runs and regenerate "
            f"(`--run-missing` first makes the runs that have no usable file).", "",
            "**How to read it.** The *paper reports* column is copied from the methods spec "
            f"(`{manifest.spec}`) with its confidence tag: [CODE] read in the authors' code, [CODE-rel] code of the "
            "same group for related work, [ABS] the abstract, [MEM] recollection of the paper body (not verified "
            "against the PDF), [INF] our inference, [TBD] not retrieved, so no number is quoted. Every number in "
            "an *ours* column, table or figure is computed from the HDF5 run files named in the run lists; none is "
            "typed into the manifest. Our setups are small (scikit-learn digits, CPU, one seed unless stated): "
            "they test mechanisms and directions, not the papers' absolute figures.", "",
            "## Run inventory", "",
            md_table(["method", "runs", "complete", "diverged (kept)", "no usable file"],
                     [[m.title.split(":")[0], str(len(m.runs)),
                       str(sum(states[(m.key, r.id)].state == "complete" for r in m.runs)),
                       str(sum(states[(m.key, r.id)].state == "diverged" for r in m.runs)),
                       str(sum(not states[(m.key, r.id)].usable for r in m.runs))] for m in manifest.methods]), ""]
    if absent:
        head += [f"**Runs without a usable file at generation time ({len(absent)})**, with the command that makes "
                 "each (or run the generator with `--run-missing`):", "",
                 md_table(["method", "run", "status", "command"],
                          [[k, s.spec.id, s.describe(), f"`{s.spec.command(runs)}`"]
                           for (k, _), s in states.items() if not s.usable]), ""]
    else:
        head += ["Every run of the manifest had a usable file at generation time.", ""]
    wall = _wall_line(present)
    if wall:
        head += [wall, ""]
    toc = ["## Contents", ""] + [f"{i}. [{m.title}](#{_heading_anchor(f'{i}. {m.title}')})"
                                 for i, m in enumerate(manifest.methods, 1)] + [""]
    return "\n".join(head + toc + sections).rstrip() + "\n", drawn


def main(args) -> int:
    """The ``hpcfl analyze reproduction`` front end (argparse namespace from hpcfl.cli.analyze_cmds)."""
    manifest = load_manifest(args.manifest)
    if args.list:
        for (k, rid), s in resolve_runs(manifest, args.runs).items():
            flag = " [differs: " + "; ".join(s.differs) + "]" if s.differs else ""
            print(f"{k:9s} {rid:34s} {s.describe()}{flag}")
        return 0
    if args.run_missing:
        results = run_missing(manifest, args.runs)
        failed = [spec.id for spec, rc in results if rc != 0]
        if failed:
            print(f"hpcfl analyze reproduction: {len(failed)} run(s) failed: {', '.join(failed)}; "
                  "the report lists them", file=sys.stderr)
    res = generate(args.manifest, args.runs, args.out, args.img, force=getattr(args, "force", False))
    print(f"wrote {res['out']}: {len(res['present'])} runs used, {len(res['missing'])} without a usable file",
          file=sys.stderr)
    for k, rid, why in res["missing"]:
        print(f"  {k}/{rid}: {why}", file=sys.stderr)
    return 0
