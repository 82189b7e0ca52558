"""How low-rank is the gradient space? LBGM's founding observation (Azam et al., ICLR 2022).

The paper's claim [ABS]: stacking a model's gradients across epochs, a few
principal components explain 95-99% of the variance. The authors' analysis
(FedOptim ``src/process_grads.py`` with ``common/nb_utils.py``) fits
``sklearn.decomposition.PCA`` to the *parameters x epochs* matrix of each
layer's gradients, i.e. every epoch's gradient is a feature and every
coordinate a sample, so PCA centres each gradient on its own mean coordinate;
the explained-variance ratios are then the squared singular values of the
stacked gradients after that centring. That is ``center = "vector"`` here (the
default). Two other readings are offered:

* ``"none"``: no centring; the shares are ``sigma_i^2 / sum sigma^2`` of the
  stacked updates, i.e. how much of the updates' total energy the top
  directions hold -- the quantity LBGM's recycling exploits;
* ``"rounds"``: classical PCA across the updates (subtract the mean update).

The input is the run file's ``/updates`` (``log.save_updates``: raw,
uncompressed updates of the first sampled clients of every round, optionally
on a seeded subset of ``log.save_update_dims`` coordinates). Groups: all
saved vectors together, each client's vectors over the rounds (the paper's
per-worker gradient space, which LBGM's per-client look-back gradient lives
in), and -- when the run's model can be rebuilt -- each parameter tensor's
coordinates (the authors' per-layer view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcfl.errors import UsageError

__all__ = ["Spectrum", "explained_variance", "components_for", "analyze", "format_report", "CENTERS",
           "FRACTIONS"]

CENTERS = ("vector", "none", "rounds")
FRACTIONS = (0.90, 0.95, 0.99)
TOP = 10


def explained_variance(m: np.ndarray, center: str = "vector") -> np.ndarray:
    """Explained-variance ratios (descending, summing to 1) of the rows of ``m`` (vectors x dims)."""
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, not {center!r}")
    a = np.asarray(m, dtype=np.float64)
    if center == "vector":
        a = a - a.mean(axis=1, keepdims=True)
    elif center == "rounds":
        a = a - a.mean(axis=0, keepdims=True)
    if a.size == 0:
        return np.zeros(0)
    s = np.linalg.svd(a, compute_uv=False)
    e = s * s
    total = e.sum()
    return e / total if total > 0 else np.zeros_like(e)


def components_for(ratios: np.ndarray, fraction: float) -> int:
    """Smallest k whose top-k components explain at least ``fraction`` (0 if nothing varies)."""
    if ratios.size == 0 or ratios.sum() <= 0:
        return 0
    c = np.cumsum(ratios)
    return int(min(ratios.size, np.searchsorted(c, fraction - 1e-12) + 1))


@dataclass
class Spectrum:
    """The spectrum of one group of update vectors."""

    group: str
    n_vectors: int
    n_dims: int
    ratios: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        top = np.cumsum(self.ratios[:TOP]).tolist()
        return {"group": self.group, "n_vectors": self.n_vectors, "n_dims": self.n_dims,
                "components": {f"{int(round(100 * f))}%": components_for(self.ratios, f) for f in FRACTIONS},
                "top_share": [float(x) for x in top],
                "ratios": [float(x) for x in self.ratios[:TOP]]}


def _param_table(job: dict) -> list[tuple[str, tuple[int, ...]]] | None:
    """The run's model parameter table (names, shapes) in model order, or None if it cannot be rebuilt."""
    try:
        from hpcfl.config.validate import INPUT_SHAPES
        from hpcfl.models import build_model, param_table

        d = job["data"]
        if d["dataset"] == "synthetic":
            shape, classes = (int(d["synthetic_dim"]),), int(d["synthetic_classes"])
        else:
            shape, classes = INPUT_SHAPES[d["dataset"]]
        return param_table(build_model(job["model"], shape, classes, int(job["run"]["seed"])))
    except Exception:  # noqa: BLE001 - an old or foreign run file: per-tensor groups are optional
        return None


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    from hpcfl.results import load_run
    from hpcfl.results.reader import load_updates

    run = load_run(path)  # UsageError for a missing or foreign file
    index, vectors, dims = load_updates(path)  # UsageError without /updates
    if len(vectors) == 0:
        raise UsageError(f"{path} has an /updates group but no saved vectors")
    return index, vectors, dims, run.job


def analyze(path: str | Path, *, center: str = "vector", per_client: bool = True, per_tensor: bool = True,
            rounds: Sequence[int] | None = None, min_dims: int = 2) -> dict[str, Any]:
    """Spectra of a run's saved updates: overall, per client and per tensor.

    ``rounds``: (first, last) round to include, inclusive (default: all).
    Tensors with fewer than ``min_dims`` saved coordinates are skipped.
    """
    path = Path(path)
    index, vectors, dims, job = _load(path)
    keep = np.ones(len(vectors), dtype=bool)
    if rounds is not None:
        lo, hi = rounds
        keep = (index["round"] >= lo) & (index["round"] <= hi)
        if not keep.any():
            raise UsageError(f"{path}: no saved updates in rounds {lo}..{hi}")
    idx, vec = index[keep], vectors[keep]
    finite = np.isfinite(vec).all(axis=1)
    idx, vec = idx[finite], vec[finite]
    out: dict[str, Any] = {"path": str(path), "center": center, "n_vectors": int(len(vec)),
                           "n_dims": int(vec.shape[1]), "n_nonfinite_dropped": int((~finite).sum()),
                           "rounds": [int(idx["round"].min()), int(idx["round"].max())] if len(idx) else [],
                           "clients": sorted({int(c) for c in idx["client"]})}
    out["overall"] = Spectrum("all", len(vec), vec.shape[1], explained_variance(vec, center)).to_dict()
    if per_client:
        out["per_client"] = [Spectrum(f"client {c}", int((idx["client"] == c).sum()), vec.shape[1],
                                      explained_variance(vec[idx["client"] == c], center)).to_dict()
                             for c in out["clients"]]
    table = _param_table(job) if per_tensor else None
    if table is not None:
        groups, off = [], 0
        for name, shape in table:
            n = math.prod(shape)
            cols = np.flatnonzero((dims >= off) & (dims < off + n))
            off += n
            if cols.size >= min_dims:
                groups.append(Spectrum(name, len(vec), int(cols.size),
                                       explained_variance(vec[:, cols], center)).to_dict())
        out["per_tensor"] = groups
    return out


def _row(d: dict) -> str:
    comp = d["components"]
    top = d["top_share"]
    share = " ".join(f"{100 * top[i]:5.1f}" if i < len(top) else "    -" for i in (0, 1, 2, 4, 9))
    return (f"{d['group'][:28]:28s} {d['n_vectors']:6d} {d['n_dims']:7d}  "
            f"{comp['90%']:4d} {comp['95%']:4d} {comp['99%']:4d}   {share}")


def format_report(res: dict, max_rows: int = 12) -> str:
    """A text table: components for 90/95/99% and the cumulative share of the top 1/2/3/5/10."""
    head = (f"{'group':28s} {'vecs':>6s} {'dims':>7s}  {'n90':>4s} {'n95':>4s} {'n99':>4s}   "
            f"{'top1':>5s} {'top2':>5s} {'top3':>5s} {'top5':>5s} {'top10':>5s}  (% explained)")
    lines = [f"gradient space of {res['path']}: {res['n_vectors']} saved updates x {res['n_dims']} coordinates, "
             f"rounds {res['rounds'][0]}..{res['rounds'][1]}, clients {len(res['clients'])}, "
             f"centring {res['center']!r}", head, _row(res["overall"])]
    for key in ("per_client", "per_tensor"):
        rows = res.get(key) or []
        if not rows:
            continue
        lines.append(f"-- {key.replace('_', ' ')} ({len(rows)})")
        lines += [_row(d) for d in rows[:max_rows]]
        if len(rows) > max_rows:
            lines.append(f"   ... {len(rows) - max_rows} more (--json for all)")
        n95 = np.array([d["components"]["95%"] for d in rows])
        n99 = np.array([d["components"]["99%"] for d in rows])
        lines.append(f"   mean over {len(rows)}: n95 {n95.mean():.1f} (min {n95.min()}, max {n95.max()}), "
                     f"n99 {n99.mean():.1f} (min {n99.min()}, max {n99.max()})")
    return "\n".join(lines)
