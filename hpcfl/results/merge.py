"""``hpcfl merge``: collect the runs of a sweep (or any run files) into one summary file.

- ``.csv``: one line per run, the columns of ``hpcfl report --csv`` (grid values as columns);
- ``.json`` / ``.jsonl``: one JSON object per line, as ``hpcfl report --json``;
- ``.h5`` / ``.hdf5``: ``/summary``, a compound table with one row per run and the same columns
  (text as UTF-8 strings, numbers as f8, undefined values NaN), and ``/runs/<point>/rounds``, a copy
  of each run's ``/rounds`` table with the run's ``job_json``, ``codec_json``, ``status``, ``label``
  and source ``path`` as attributes, so accuracy curves can be redrawn from the summary alone.
  Root attributes: ``sweep_json`` (the sweep's sweep.json, if one directory was merged),
  ``target_accuracy``, ``created``, ``sources_json``.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcfl.errors import UsageError
from hpcfl.results.compare import Entry, _param_keys, flat_row, to_csv, to_json_lines

__all__ = ["write_summary", "read_summary"]


def _column(values: list[Any]) -> tuple[np.dtype, list[Any]]:
    """f8 if every defined value is a number (bools included), else UTF-8 strings."""
    import h5py

    defined = [v for v in values if v is not None]
    if defined and all(isinstance(v, (int, float, np.integer, np.floating)) for v in defined):
        return np.dtype("f8"), [math.nan if v is None else float(v) for v in values]
    return h5py.string_dtype("utf-8"), ["" if v is None else (v if isinstance(v, str) else json.dumps(v))
                                       for v in values]


def write_summary(rows: Sequence[dict], entries: Sequence[Entry], out: str | os.PathLike, *,
                  target: float | None = None, sweep_json: str = "", overwrite: bool = True) -> Path:
    p = Path(out)
    if p.exists() and not overwrite:
        raise UsageError(f"{p} exists")
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        p.write_text(to_csv(rows))
        return p
    if suffix in (".json", ".jsonl"):
        p.write_text(to_json_lines(rows))
        return p
    if suffix not in (".h5", ".hdf5"):
        raise UsageError(f"{p}: unknown summary format {suffix or '(none)'}; use .csv, .json or .h5")
    import h5py

    flats = [flat_row(r, _param_keys(rows)) for r in rows]
    names = list(flats[0]) if flats else []
    cols = {k: _column([f[k] for f in flats]) for k in names}
    dt = np.dtype([(k, cols[k][0]) for k in names])
    table = np.empty(len(flats), dtype=dt)
    for k in names:
        table[k] = cols[k][1]
    tmp = p.with_name(p.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["target_accuracy"] = math.nan if target is None else float(target)
        f.attrs["sweep_json"] = sweep_json
        f.attrs["sources_json"] = json.dumps([str(e.run.path) for e in entries])
        d = f.create_dataset("summary", data=table)
        d.attrs["doc"] = ("One row per run: hpcfl report --csv columns. Rounds are completed rounds; "
                          "bytes in B, times in s; per_bit_accuracy in accuracy per uplink bit "
                          "(against the logged initial accuracy, chance 1/classes for files without it); NaN or '' = undefined.")
        g = f.create_group("runs")
        for e, r in zip(entries, rows):
            name, k = e.name or e.run.path.stem, 2
            while name in g:  # the same file name in two directories
                name, k = f"{e.name or e.run.path.stem}-{k}", k + 1
            sub = g.create_group(name)
            sub.create_dataset("rounds", data=e.run.rounds)
            for k in ("job_json", "codec_json", "status"):
                sub.attrs[k] = str(e.run.attrs.get(k, ""))
            sub.attrs["label"] = e.label
            sub.attrs["path"] = str(e.run.path)
            sub.attrs["params_json"] = json.dumps(r.get("params", {}))
    os.replace(tmp, p)
    return p


def read_summary(path: str | os.PathLike):
    """The /summary table of a merged .h5 file as a numpy structured array."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["summary"][:]
