"""Parameter sweeps: expand a grid over a job into concrete job files, run them or write a Slurm array.

A sweep directory holds::

    DIR/sweep.json          the base job, the --set overrides, the grid and the list of points
    DIR/jobs/NNNN-<label>.toml   one concrete, validated job file per point (all defaults filled)
    DIR/runs/NNNN-<label>.h5     the run file of each point
    DIR/pending.txt, DIR/sweep.sbatch, DIR/logs/   Slurm mode only

A point is *finished* when its run file has ``status == "complete"`` and the
``job_hash`` of the job file; finished points are skipped when the sweep is run
or submitted again, everything else (missing, failed, killed while running,
written by another job) is run again. No MPI and no torch here (validation
imports torch through the model zoo).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from hpcfl.errors import ConfigError, UsageError

__all__ = ["GridAxis", "Point", "Sweep", "parse_grid", "split_values", "expand", "create_sweep", "load_sweep",
           "point_status", "run_local", "write_slurm_script", "submit", "dumps_toml", "TEMPLATE"]

SWEEP_VERSION = 1
TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "sweep-array.sbatch"
_MAX_LABEL = 80


# ------------------------------------------------------------------ grid

def split_values(text: str) -> list[str]:
    """Split ``a,b,c`` at top-level commas: commas inside [..], {..} or quotes stay ("[32,64],[128]")."""
    out, cur, depth, quote = [], [], 0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            cur.append(ch)
            if ch == "\\" and quote == '"' and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch in "[{":
            depth += 1
            cur.append(ch)
        elif ch in "]}":
            depth -= 1
            cur.append(ch)
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur).strip())
    return out


@dataclass(frozen=True)
class GridAxis:
    key: str
    texts: tuple[str, ...]  # the values as given (TOML, or bare strings)


def parse_grid(spec: str) -> GridAxis:
    """``"codec.ratio=0.1,0.01"`` -> GridAxis("codec.ratio", ("0.1", "0.01"))."""
    from hpcfl.config.load import parse_override

    if "=" not in spec:
        raise ConfigError(spec, "a grid axis must look like section.key=v1,v2,...")
    key, raw = spec.split("=", 1)
    key = key.strip()
    texts = tuple(split_values(raw))
    if any(t == "" for t in texts):
        raise ConfigError(key, f"empty value in grid {raw!r}")
    for t in texts:
        parse_override(f"{key}={t}")  # checks the key's form
    if len(set(texts)) != len(texts):
        raise ConfigError(key, f"repeated value in grid {raw!r}")
    return GridAxis(key, texts)


def _resets_table(key: str) -> bool:
    """``codec.id`` / ``codec.inner.id`` / ``routing.dense.id`` replace their whole codec table."""
    return key.endswith(".id") and (key.startswith("codec.") or key.startswith("routing.dense"))


def order_overrides(texts: Sequence[str]) -> list[str]:
    """Table-replacing ``*.id`` overrides first (outermost first), then the others in their order.

    So ``--grid codec.id=topk,randomk --grid codec.ratio=0.1`` keeps the ratio whatever the
    order of the flags (``hpcfl run --set`` applies overrides in the order given).
    """
    keyed = [(t.split("=", 1)[0].strip(), t) for t in texts]
    ids = sorted((kt for kt in keyed if _resets_table(kt[0])), key=lambda kt: kt[0].count("."))
    return [t for _, t in ids] + [t for k, t in keyed if not _resets_table(k)]


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", text.strip().strip("\"'")).strip("-")
    return s or "x"


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Last key component, or the whole key where two axes share it (codec.id vs routing.dense.id)."""
    leaf = [k.split(".")[-1] for k in keys]
    return {k: (lf if leaf.count(lf) == 1 else k) for k, lf in zip(keys, leaf)}


@dataclass
class Point:
    index: int
    values: dict[str, Any]        # grid key -> parsed value
    texts: dict[str, str]         # grid key -> value text as given
    name: str = ""                # NNNN-<slug>: file stem of the job and run files
    label: str = ""               # "id=topk ratio=0.1": for tables and figures
    job_hash: str = ""
    ranks: int = 0

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={t}" for k, t in self.texts.items()]

    @property
    def job_file(self) -> str:
        return f"jobs/{self.name}.toml"

    @property
    def run_file(self) -> str:
        return f"runs/{self.name}.h5"

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "label": self.label, "values": self.values,
                "texts": self.texts, "job": self.job_file, "run": self.run_file, "job_hash": self.job_hash,
                "ranks": self.ranks}

    @classmethod
    def from_json(cls, d: dict) -> "Point":
        return cls(d["index"], d["values"], d["texts"], d["name"], d["label"], d["job_hash"], d["ranks"])


def expand(axes: Sequence[GridAxis]) -> list[Point]:
    """The Cartesian product of the axes; the first axis varies slowest. Names and labels filled."""
    from hpcfl.config.load import parse_override

    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(dup, "given twice as a grid axis")
    short = _short_keys(keys)
    points = []
    for i, combo in enumerate(itertools.product(*(a.texts for a in axes))):
        texts = dict(zip(keys, combo))
        values = {k: parse_override(f"{k}={t}")[1] for k, t in texts.items()}
        slug = "_".join(f"{short[k]}={_slug(t)}" for k, t in texts.items()) or "base"
        label = " ".join(f"{short[k]}={t.strip(chr(34) + chr(39))}" for k, t in texts.items()) or "base"
        points.append(Point(i, values, texts, f"{i:04d}-{slug[:_MAX_LABEL]}", label))
    return points


# ------------------------------------------------------------------ TOML

def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x, where)}" for k, x in v.items()) + "}"
    raise ConfigError(where, f"cannot write {type(v).__name__} {v!r} as TOML")


def dumps_toml(job: dict, header: str = "") -> str:
    """A job dict (tables of values; nested tables inline) as TOML; checked to read back equal."""
    lines = [f"# {ln}" if ln else "#" for ln in header.splitlines()]
    for section, table in job.items():
        if not isinstance(table, dict):
            raise ConfigError(section, "a job section must be a table")
        lines += ["", f"[{_toml_key(section)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v, f'{section}.{k}')}" for k, v in table.items()]
    text = "\n".join(lines).lstrip("\n") + "\n"
    if tomllib.loads(text) != job:  # pragma: no cover - a writer bug, never a user error
        raise AssertionError("TOML writer did not round-trip the job")
    return text


# ------------------------------------------------------------------ sweep

@dataclass
class Sweep:
    dir: Path
    base: dict                     # the base job file as read (raw TOML)
    source: str                    # path of the base job file
    sets: list[str]
    axes: list[GridAxis]
    points: list[Point] = field(default_factory=list)

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def to_json(self) -> dict:
        return {"version": SWEEP_VERSION, "source": self.source, "base": self.base, "set": self.sets,
                "grid": [{"key": a.key, "values": list(a.texts)} for a in self.axes],
                "points": [p.to_json() for p in self.points]}

    def select(self, only: Iterable[int] | None) -> list[Point]:
        if only is None:
            return list(self.points)
        by_index = {p.index: p for p in self.points}
        missing = [i for i in only if i not in by_index]
        if missing:
            raise UsageError(f"--only: no point {missing[0]} in this sweep (points 0-{len(self.points) - 1})")
        return [by_index[i] for i in sorted(set(only))]


def point_job(base: dict, sets: Sequence[str], point: Point, cwd: Path):
    """The validated-schema Job of one point (codec content is checked by validate_job)."""
    from hpcfl.config.load import apply_overrides, job_from_dict

    raw = apply_overrides(base, order_overrides(list(sets) + point.overrides))
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"] \
            and not Path(data["path"]).is_absolute():
        # a job file moved into DIR/jobs/ must still find its data: hpcfl run reads data.path from the cwd
        data["path"] = str((cwd / data["path"]).resolve())
    return job_from_dict(raw, f"sweep point {point.name}")


def create_sweep(job_path: str | os.PathLike, sets: Sequence[str], grid: Sequence[str], directory: str | os.PathLike,
                 *, replace: bool = False, validate: Callable | None = None) -> Sweep:
    """Expand, validate every point, then write sweep.json and the job files.

    Nothing is written unless every point is valid; an invalid point raises a
    UsageError naming the point and the key. An existing DIR/sweep.json that
    describes a different sweep is an error unless ``replace``.
    """
    from hpcfl.config.validate import validate_job

    validate = validate or validate_job
    jp = Path(job_path)
    try:
        base = tomllib.loads(jp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("", f"job file not found: {jp}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("", f"{jp}: not a readable TOML job file: {e}") from None
    axes = [parse_grid(g) for g in grid]
    points = expand(axes)
    d = Path(directory)
    cwd = Path.cwd()
    jobs = {}
    for p in points:
        try:
            job = point_job(base, sets, p, cwd)
            validate(job)
        except UsageError as e:
            raise UsageError(f"sweep point {p.index:04d} ({p.label}): {e}") from None
        p.job_hash, p.ranks = job.hash, int(job.run.ranks)
        jobs[p.name] = job
    sw = Sweep(d, base, str(jp), list(sets), axes, points)
    meta = d / "sweep.json"
    if meta.exists() and not replace:
        old = json.loads(meta.read_text())
        if [pt["job_hash"] for pt in old.get("points", [])] != [p.job_hash for p in points] or \
                [pt["name"] for pt in old.get("points", [])] != [p.name for p in points]:
            raise UsageError(f"{meta} describes a different sweep (base job, --set or --grid changed); "
                             "use another --dir, or --replace to overwrite it")
    (d / "jobs").mkdir(parents=True, exist_ok=True)
    (d / "runs").mkdir(exist_ok=True)
    for p in points:
        header = (f"hpcfl sweep point {p.index:04d}: {p.label}\n"
                  f"base job {jp}; overrides: {' '.join(order_overrides(list(sets) + p.overrides)) or 'none'}\n"
                  f"generated by `hpcfl sweep`; job hash {p.job_hash}. Edit the base job, not this file.")
        _write_if_changed(d / p.job_file, dumps_toml(jobs[p.name].to_dict(), header))
    _write_if_changed(meta, json.dumps(sw.to_json(), indent=1) + "\n")
    return sw


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_sweep(directory: str | os.PathLike) -> Sweep:
    d = Path(directory)
    meta = d / "sweep.json"
    if not meta.exists():
        raise UsageError(f"{d} is not a sweep directory (no sweep.json); create it with hpcfl sweep JOB.toml "
                         "--grid ... --dir DIR")
    try:
        m = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{meta}: unreadable: {e}") from None
    if m.get("version") != SWEEP_VERSION:
        raise UsageError(f"{meta}: sweep version {m.get('version')!r}, this hpcfl reads {SWEEP_VERSION}")
    axes = [GridAxis(a["key"], tuple(a["values"])) for a in m["grid"]]
    return Sweep(d, m["base"], m["source"], m["set"], axes, [Point.from_json(p) for p in m["points"]])


# ------------------------------------------------------------------ status

def run_file_status(path: Path, job_hash: str | None = None) -> str:
    """'missing', 'complete', 'running', 'failed: ...', 'unreadable' or 'stale' (another job's file)."""
    if not path.exists():
        return "missing"
    import h5py

    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            status = f.attrs.get("status", "")
            fh = f.attrs.get("job_hash", "")
    except OSError:
        return "unreadable"
    status = status.decode() if isinstance(status, bytes) else str(status)
    fh = fh.decode() if isinstance(fh, bytes) else str(fh)
    if job_hash and fh and fh != job_hash:
        return "stale"
    return status or "unreadable"


def point_status(sweep: Sweep, point: Point) -> str:
    return run_file_status(sweep.path(point.run_file), point.job_hash)


def pending(sweep: Sweep, only: Iterable[int] | None = None) -> list[Point]:
    """Points to run: every unfinished point, or (``only``) the selected ones, finished or not."""
    if only is not None:
        return sweep.select(only)
    return [p for p in sweep.points if point_status(sweep, p) != "complete"]


# ------------------------------------------------------------------ local

def _echo(text: str) -> None:
    print(text, flush=True)  # before and after each child's own output


def run_local(sweep: Sweep, points: Sequence[Point], *, progress: str = "plain",
              echo: Callable[[str], None] = _echo, python: str | None = None,
              env: dict | None = None) -> list[tuple[Point, int, str]]:
    """Run points one after another with ``hpcfl run`` (which starts mpiexec). Continues after failures.

    Returns (point, exit code, final status) per point.
    """
    results = []
    for n, p in enumerate(points, 1):
        echo(f"[{n}/{len(points)}] {p.name}: {p.label}")
        cmd = [python or sys.executable, "-m", "hpcfl", "run", str(sweep.path(p.job_file)),
               "--out", str(sweep.path(p.run_file)), "--overwrite", "--progress", progress]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        status = point_status(sweep, p)
        if rc == 0 and status != "complete":
            rc = 1
        echo(f"[{n}/{len(points)}] {p.name}: {status if rc == 0 else f'exit {rc}, {status}'} "
             f"({time.perf_counter() - t0:.1f} s)")
        results.append((p, rc, status))
    return results


# ------------------------------------------------------------------ Slurm

def _array_spec(n: int, max_parallel: int | None) -> str:
    spec = "0" if n == 1 else f"0-{n - 1}"
    return f"{spec}%{max_parallel}" if max_parallel else spec


def write_slurm_script(sweep: Sweep, points: Sequence[Point], *, template: str | os.PathLike | None = None,
                       time_limit: str = "01:00:00", max_parallel: int | None = None,
                       sbatch_options: Sequence[str] = (), python: str | None = None,
                       job_name: str | None = None) -> Path:
    """Write DIR/pending.txt (one ``JOB RANKS OUT`` line per array task) and DIR/sweep.sbatch."""
    if not points:
        raise UsageError("no points to submit")
    tpl = Path(template) if template else TEMPLATE
    if not tpl.exists():
        raise UsageError(f"Slurm template not found: {tpl} (it ships in the source tree's slurm/; "
                         "pass --template PATH)")
    d = sweep.dir.resolve()
    if re.search(r"\s", str(d)):
        raise UsageError(f"the sweep directory path contains whitespace, which #SBATCH lines cannot hold: {d}")
    for opt in sbatch_options:
        if not opt.startswith("-"):
            raise UsageError(f"--sbatch {opt!r}: give an sbatch option, e.g. --sbatch=--partition=debug")
    lines = [f"{p.job_file} {p.ranks} {p.run_file}" for p in points]
    listing = "\n".join(lines) + "\n"
    (d / "logs").mkdir(parents=True, exist_ok=True)  # Slurm needs --output's directory at submission
    (d / "pending.txt").write_text(listing)
    base_name = str(sweep.base.get("run", {}).get("name", "hpcfl"))
    fields = {
        "JOB_NAME": _slug(job_name or f"{base_name}-sweep"),
        "ARRAY": _array_spec(len(points), max_parallel),
        "NTASKS": str(max(p.ranks for p in points)),
        "TIME": time_limit,
        "SWEEP_DIR": str(d),
        "LIST_SHA": hashlib.sha256(listing.encode()).hexdigest(),
        "PYTHON": python or sys.executable,
        "N_TASKS_LIST": str(len(points)),
        "EXTRA_SBATCH": "\n".join(f"#SBATCH {o}" for o in sbatch_options),
        "POINTS": ", ".join(f"{i}={p.name}" for i, p in enumerate(points[:20]))
        + (f", ... ({len(points)} in all; see pending.txt)" if len(points) > 20 else ""),
    }
    text = tpl.read_text()
    for k, v in fields.items():
        text = text.replace(f"@{k}@", v)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise UsageError(f"{tpl}: unknown template field {left[0]}")
    out = d / "sweep.sbatch"
    out.write_text(text)
    out.chmod(0o755)
    return out


def submit(script: Path, *, timeout: float = 60) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id and logs it to DIR/submissions.txt."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError("sbatch not found: run on a Slurm login node, or submit DIR/sweep.sbatch yourself")
    try:
        r = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"sbatch did not answer within {timeout:.0f} s") from None
    if r.returncode != 0:
        raise UsageError(f"sbatch failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    with open(script.parent / "submissions.txt", "a") as fh:
        n = len((script.parent / "pending.txt").read_text().splitlines())
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} job {job_id} tasks {n}\n")
    return job_id
