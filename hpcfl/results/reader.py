"""Read run files: numpy structured arrays always, pandas DataFrames if pandas is installed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcfl.errors import UsageError
from hpcfl.results.schema import CLIENT_METRICS

__all__ = ["Run", "load_run", "load_updates"]


@dataclass
class Run:
    """Everything in one run file, loaded into memory (run files are small).

    ``rounds`` is a structured array with one field per round metric;
    ``clients[metric]`` and ``ranks[metric]`` are (rounds x clients/ranks) arrays.
    """

    path: Path
    attrs: dict[str, Any]
    rounds: np.ndarray
    clients: dict[str, np.ndarray]
    ranks: dict[str, np.ndarray]
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    codec_stats: np.ndarray | None = None  # rows (round, client, slot, name, value)
    calibration: dict[str, Any] | None = None  # /calibration: attrs, "table", "resumes" {k: same}; None if absent

    @property
    def slot_names(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self.meta.get("slot_names", [])]

    def codec_stat(self, name: str) -> np.ndarray:
        """One codec statistic as a (rounds, clients, slots) array, NaN where not reported."""
        C = int(self.attrs.get("n_clients", 0))
        out = np.full((self.n_rounds, C, max(1, len(self.slot_names))), np.nan)
        if self.codec_stats is not None and len(self.codec_stats):
            rows = self.codec_stats[self.codec_stats["name"] == name.encode()]
            rows = rows[rows["round"] < self.n_rounds]
            out[rows["round"], rows["client"], rows["slot"]] = rows["value"]
        return out

    def codec_stat_names(self) -> list[str]:
        if self.codec_stats is None or not len(self.codec_stats):
            return []
        return sorted({n.decode() for n in np.unique(self.codec_stats["name"])})

    @property
    def job(self) -> dict:
        return json.loads(self.attrs.get("job_json", "{}"))

    @property
    def codec(self) -> dict:
        return json.loads(self.attrs.get("codec_json", "{}"))

    @property
    def status(self) -> str:
        return str(self.attrs.get("status", ""))

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def n_rounds(self) -> int:
        return int(self.rounds.shape[0])

    def rounds_frame(self):
        """One row per round (pandas DataFrame)."""
        pd = _pandas()
        return pd.DataFrame(self.rounds).set_index("round")

    def clients_frame(self, participated_only: bool = True):
        """Long format: one row per (round, client) with every client metric."""
        pd = _pandas()
        R = self.n_rounds
        C = next(iter(self.clients.values())).shape[1] if self.clients else 0
        cols = {"round": np.repeat(self.rounds["round"], C), "client": np.tile(np.arange(C), R)}
        for k, v in self.clients.items():
            cols[k] = v.reshape(-1)
        if "client_rank" in self.meta:
            cols["rank"] = np.tile(self.meta["client_rank"], R)
        df = pd.DataFrame(cols)
        if participated_only and "participated" in df:
            df = df[df["participated"] == 1]
        return df.reset_index(drop=True)

    def ranks_frame(self):
        pd = _pandas()
        R = self.n_rounds
        W = next(iter(self.ranks.values())).shape[1] if self.ranks else 0
        cols = {"round": np.repeat(self.rounds["round"], W), "rank": np.tile(np.arange(W), R)}
        for k, v in self.ranks.items():
            cols[k] = v.reshape(-1)
        return pd.DataFrame(cols)


def _pandas():
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - depends on the environment
        raise UsageError("DataFrames need pandas: pip install 'hpcfl[analysis]'; "
                         "Run.rounds / Run.clients are numpy arrays without it") from None
    return pd


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _calibration(g: h5py.Group) -> dict[str, Any]:
    out = {k: _attr(v) for k, v in g.attrs.items() if k != "units_json"}
    out["table"] = g["table"][:] if "table" in g else np.zeros(0)
    out["resumes"] = {int(k.split("_", 1)[1]): _calibration(g[k]) for k in g
                      if k.startswith("resume_") and isinstance(g[k], h5py.Group)}
    return out


def load_run(path: str | os.PathLike) -> Run:
    """Load a run file (also one still being written, or cut short by a failure)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no such run file: {p}")
    try:
        f = h5py.File(p, "r", libver="latest", swmr=True)
    except OSError as e:
        raise UsageError(f"{p} is not a readable HDF5 run file: {e}") from None
    with f:
        if "rounds" not in f or "schema_version" not in f.attrs:
            raise UsageError(f"{p} is an HDF5 file but not an hpcfl run file")
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        rounds = f["rounds"][:]
        n = rounds.shape[0]
        # a reader racing a live writer may see a table one row ahead of another
        tables = {k: f[k][:n] for k in ("clients", "ranks") if k in f}
        n = min([n] + [t.shape[0] for t in tables.values()])
        rounds = rounds[:n]
        clients = {k: tables["clients"][k][:n] for k in tables["clients"].dtype.names} if "clients" in tables else {}
        ranks = {k: tables["ranks"][k][:n] for k in tables["ranks"].dtype.names} if "ranks" in tables else {}
        meta = {k: f["meta"][k][()] for k in f["meta"]} if "meta" in f else {}
        stats = f["codec_stats"][:] if "codec_stats" in f else None
        cal = _calibration(f["calibration"]) if "calibration" in f else None
    return Run(p, attrs, rounds, clients, ranks, meta, stats, cal)


def load_updates(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw updates a run saved (log.save_updates): (index rows, vectors, dims)."""
    p = Path(path)
    with h5py.File(p, "r", libver="latest", swmr=True) as f:
        if "updates" not in f:
            raise UsageError(f"{p} holds no saved updates; run the job with log.save_updates > 0")
        g = f["updates"]
        n = g["index"].shape[0]
        return g["index"][:n], g["vectors"][:n], g["dims"][:]


assert {m.name for m in CLIENT_METRICS}.isdisjoint({"round", "client"})
