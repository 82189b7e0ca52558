"""RunLog: the root's HDF5 writer. One row per round, flushed every round.

Three append-only tables of compound rows — ``/rounds`` (R,), ``/clients``
(R, C) and ``/ranks`` (R, W) — so a round costs three resize-and-write calls
instead of one per metric (4-14 ms measured with 45 columnar datasets on a busy
2-core node). Rows go through h5py's low-level write with the memory type built
once per dtype: ``Dataset.__setitem__`` rebuilds the compound type on every call
(about 80 of the 130 us a row took), and reading a row back costs as much, so the
last /rounds row is kept in memory for :meth:`RunLog.set_round_value`
(docs/mpi-performance.md). All objects are created before round 0 and
the file is then switched to SWMR mode: later writes only append rows, so a
job killed at any moment leaves a readable file with every completed round,
and a reader can follow a live run (``h5py.File(p, "r", swmr=True)``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
from h5py import h5s, h5t

from hpcfl.errors import ResultsWriteError, UsageError
from hpcfl.results.schema import (CALIBRATION_ATTRS, CALIBRATION_FIELDS, CLIENT_METRICS, CODEC_STAT_FIELDS,
                                  RANK_METRICS, ROUND_METRICS, SCHEMA_VERSION, Metric)

STAT_DTYPE = np.dtype([(m.name, m.dtype) for m in CODEC_STAT_FIELDS], align=True)  # 48 B, 8-aligned
UPDATE_INDEX_DTYPE = np.dtype([("round", "i4"), ("client", "i4")])

__all__ = ["RunLog", "table_dtype", "STAT_DTYPE", "write_calibration"]


def table_dtype(metrics: tuple[Metric, ...]) -> np.dtype:
    return np.dtype([(m.name, m.dtype) for m in metrics])


_MTYPES: dict[np.dtype, h5t.TypeID] = {}


def _write_rows(d: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` (shape (n,) + the table's row shape) at index ``start`` of axis 0."""
    rows = np.ascontiguousarray(rows)
    mt = _MTYPES.get(rows.dtype)
    if mt is None:
        mt = _MTYPES[rows.dtype] = h5t.py_create(rows.dtype)
    fs = d.id.get_space()
    fs.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
    d.id.write(h5s.create_simple(rows.shape), fs, rows, mt)


def write_calibration(f: h5py.File, cal: Mapping[str, Any], rounds_done: int = 0) -> h5py.Group:
    """Store a :func:`hpcfl.bench.mpi.calibrate` result: ``/calibration``, or ``/calibration/resume_<k>``
    when the file holds one already (a resumed run). Call before the file enters SWMR mode."""
    name = "calibration" if "calibration" not in f else f"calibration/resume_{rounds_done}"
    if name in f:
        del f[name]
    g = f.create_group(name)
    for k in CALIBRATION_ATTRS:
        if k == "created":
            g.attrs[k] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        elif k == "rounds_done":
            g.attrs[k] = int(rounds_done)
        elif k in cal:
            g.attrs[k] = cal[k]
    g.attrs["units_json"] = json.dumps({k: u for k, (u, _) in CALIBRATION_ATTRS.items()})
    t = g.create_dataset("table", data=np.asarray(cal.get("table", []), dtype=table_dtype(CALIBRATION_FIELDS)))
    t.attrs["units_json"] = json.dumps({m.name: m.unit for m in CALIBRATION_FIELDS})
    t.attrs["doc_json"] = json.dumps({m.name: m.doc for m in CALIBRATION_FIELDS})
    return g


def _fill_row(metrics: tuple[Metric, ...], shape: tuple[int, ...] = ()) -> np.ndarray:
    row = np.zeros(shape, dtype=table_dtype(metrics))
    for m in metrics:
        row[m.name] = m.fill
    return row


class RunLog:
    """Context manager writing one run file.

    Parameters
    ----------
    path : output file; must not exist unless ``overwrite``.
    attrs : root attributes (str/int/float values).
    n_clients, n_ranks : widths of the /clients and /ranks tables.
    meta : static arrays for /meta.
    calibration : a :func:`hpcfl.bench.mpi.calibrate` result for /calibration, or None.
    """

    def __init__(self, path: str | os.PathLike, *, attrs: Mapping[str, Any], n_clients: int, n_ranks: int,
                 meta: Mapping[str, np.ndarray] | None = None, overwrite: bool = False,
                 update_dims: np.ndarray | None = None, calibration: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.f = h5py.File(self.path, "w" if overwrite else "w-", libver="latest")
        except FileExistsError:
            raise UsageError(f"{self.path} exists; pass --overwrite or choose another --out") from None
        self.rounds = 0
        self._last_row: np.ndarray | None = None  # the last /rounds row written, for set_round_value
        f = self.f
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["status"] = "running"
        f.attrs["rounds_done"] = 0
        for k, v in attrs.items():
            f.attrs[k] = v
        self._tables = {}
        for name, width, metrics in (("rounds", None, ROUND_METRICS), ("clients", n_clients, CLIENT_METRICS),
                                     ("ranks", n_ranks, RANK_METRICS)):
            shape = (0,) if width is None else (0, width)
            chunk = (256,) if width is None else (max(1, min(64, 8192 // max(width, 1))), width)
            d = f.create_dataset(name, shape=shape, maxshape=(None,) + shape[1:], dtype=table_dtype(metrics),
                                 chunks=chunk)
            d.attrs["units_json"] = json.dumps({m.name: m.unit for m in metrics})
            d.attrs["doc_json"] = json.dumps({m.name: m.doc for m in metrics})
            d.attrs["axes"] = "round" if width is None else f"round,{name[:-1]}"
            self._tables[name] = (d, metrics, shape[1:])
        mg = f.create_group("meta")
        for k, v in (meta or {}).items():
            mg.create_dataset(k, data=v)
        st = f.create_dataset("codec_stats", shape=(0,), maxshape=(None,), dtype=STAT_DTYPE, chunks=(4096,))
        st.attrs["doc_json"] = json.dumps({m.name: m.doc for m in CODEC_STAT_FIELDS})
        self._updates = None
        if update_dims is not None:
            ug = f.create_group("updates")
            ug.create_dataset("dims", data=np.asarray(update_dims, dtype=np.int64))
            n = int(len(update_dims))
            ug.create_dataset("index", shape=(0,), maxshape=(None,), dtype=UPDATE_INDEX_DTYPE, chunks=(1024,))
            ug.create_dataset("vectors", shape=(0, n), maxshape=(None, n), dtype="f4",
                              chunks=(max(1, min(64, (1 << 20) // max(4 * n, 1))), n))
            self._updates = ug
        if calibration is not None:
            write_calibration(f, calibration)
        f.flush()
        f.swmr_mode = True

    @classmethod
    def resume(cls, path: str | os.PathLike, rounds_done: int,
               calibration: Mapping[str, Any] | None = None,
               meta: Mapping[str, np.ndarray] | None = None) -> "RunLog":
        """Reopen a run file to continue after ``rounds_done`` rounds (hpcfl run --resume).

        Rows of later rounds (written after the checkpoint) are cut off: the resumed
        run recomputes them. The file's consistency flags, left set by a killed
        writer, are cleared first. A ``calibration`` is stored beside any earlier one.
        ``meta``: per-rank /meta arrays of this launch (host names, pids) that replace the
        earlier launch's; one of another length (another world size) is left alone.
        """
        from hpcfl.results.repair import clear_status_flags

        self = cls.__new__(cls)
        self.path = Path(path)
        clear_status_flags(self.path)
        try:
            self.f = h5py.File(self.path, "a", libver="latest")
        except OSError as e:
            raise UsageError(f"cannot reopen {self.path} to resume: {e}") from None
        f = self.f
        done = int(f.attrs.get("rounds_done", 0))
        if rounds_done > done:
            raise UsageError(f"{self.path} holds {done} rounds but the checkpoint is after {rounds_done}")
        self._tables = {}
        for name, metrics in (("rounds", ROUND_METRICS), ("clients", CLIENT_METRICS), ("ranks", RANK_METRICS)):
            d = f[name]
            d.resize((rounds_done,) + d.shape[1:])
            self._tables[name] = (d, metrics, d.shape[1:])
        st = f["codec_stats"]
        keep = int(np.searchsorted(st["round"][:], rounds_done)) if st.shape[0] else 0
        st.resize((keep,))
        self._updates = f["updates"] if "updates" in f else None
        if self._updates is not None:
            idx = self._updates["index"]
            keep = int(np.searchsorted(idx["round"][:], rounds_done)) if idx.shape[0] else 0
            idx.resize((keep,))
            self._updates["vectors"].resize((keep, self._updates["vectors"].shape[1]))
        self.rounds = rounds_done
        self._last_row = None
        history = json.loads(f.attrs.get("resumes_json", "[]"))
        history.append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds_done": rounds_done,
                        "previous_status": str(f.attrs.get("status", ""))})
        f.attrs["resumes_json"] = json.dumps(history)
        f.attrs["status"] = "running"
        f.attrs["rounds_done"] = rounds_done
        if calibration is not None:
            write_calibration(f, calibration, rounds_done)
        mg = f.require_group("meta")
        for k, v in (meta or {}).items():
            if k in mg and mg[k].shape != np.shape(v):
                continue  # another world size: run_job refuses the resume
            if k in mg:
                del mg[k]
            mg.create_dataset(k, data=v)
        f.flush()
        f.swmr_mode = True
        return self

    def last_value(self, metric: str) -> float:
        d = self._tables["rounds"][0]
        return float(d[self.rounds - 1][metric]) if self.rounds else 0.0

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("complete" if exc_type is None else f"failed: {exc_type.__name__}: {exc}"[:900])

    def append_round(self, server: Mapping[str, float], clients: Mapping[str, np.ndarray],
                     ranks: Mapping[str, np.ndarray], stats: np.ndarray | None = None,
                     updates: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Append one round; metrics not given keep their fill value (NaN or 0).

        ``stats``: rows of STAT_DTYPE (their round field is set here); ``updates``:
        (client ids, vectors) to append under /updates. A failed write (disk full,
        lost permissions) raises ResultsWriteError; earlier, flushed rounds stay
        readable (SWMR).
        """
        try:
            self._append(server, clients, ranks, stats, updates)
        except OSError as e:
            raise ResultsWriteError(f"cannot write round {self.rounds} to {self.path}: {e}; rounds 0.."
                                    f"{self.rounds - 1} are intact in the file") from None

    def _append(self, server, clients, ranks, stats, updates) -> None:
        r = self.rounds
        if stats is not None and len(stats):
            rows = np.asarray(stats, dtype=STAT_DTYPE).copy()
            rows["round"] = r
            d = self.f["codec_stats"]
            n0 = d.shape[0]
            d.resize((n0 + len(rows),))
            _write_rows(d, n0, rows)
        if updates is not None and self._updates is not None and len(updates[0]):
            ids, vec = updates
            idx, v = self._updates["index"], self._updates["vectors"]
            n0 = idx.shape[0]
            idx.resize((n0 + len(ids),))
            v.resize((n0 + len(ids), v.shape[1]))
            idx[n0:] = np.array([(r, int(c)) for c in ids], dtype=UPDATE_INDEX_DTYPE)
            v[n0:] = vec
        for name, values in (("rounds", server), ("clients", clients), ("ranks", ranks)):
            d, metrics, width = self._tables[name]
            row = _fill_row(metrics, width)
            for k, v in values.items():
                row[k] = v
            d.resize((r + 1,) + width)
            _write_rows(d, r, row.reshape((1,) + width))
            if name == "rounds":
                self._last_row = row
        self.rounds = r + 1
        self.f.attrs["rounds_done"] = self.rounds
        self.f.flush()

    def set_round_value(self, metric: str, value: float) -> None:
        """Fill one field of the last round (log_s is known only after writing)."""
        d = self._tables["rounds"][0]
        if self._last_row is None:  # resumed, nothing appended yet
            self._last_row = d[self.rounds - 1:self.rounds].reshape(())
        self._last_row[metric] = value
        _write_rows(d, self.rounds - 1, self._last_row.reshape(1))
        self.f.flush()

    def close(self, status: str = "complete") -> None:
        f = getattr(self, "f", None)
        if f is None or not f.id.valid:
            return
        f.attrs["status"] = status
        f.flush()
        f.close()
