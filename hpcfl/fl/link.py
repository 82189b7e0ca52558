"""Emulated client links: bandwidth and latency per client, and the time a transfer takes.

Every client gets a link, fixed for the whole run and derived only from the job
(seed, client id), so every rank computes the same links without communication:
from a CSV trace (``link.trace``), or from the ``[link]`` medians with an optional
lognormal per-client spread. Units are SI: 1 Mbit/s = 10^6 bit/s (FedScale's
1024-vs-1000 ambiguity, SymbioticLab/FedScale#9, is why this is spelled out).

A transfer of ``b`` bytes takes ``latency + 8 b / bandwidth`` seconds.

Trace format (a sample ships in ``jobs/traces/``)::

    client,uplink_mbps,downlink_mbps,latency_ms
    0,8.5,42.0,35
    1,1.2,7.9,80
    ...

``client`` is informative; client ``c`` uses data row ``c mod rows``. Lines
starting with ``#`` are comments.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from hpcfl.errors import ConfigError
from hpcfl.seeding import numpy_rng

__all__ = ["Links", "load_trace", "links_for_job"]

_COLUMNS = ("uplink_mbps", "downlink_mbps", "latency_ms")


@dataclass(frozen=True)
class Links:
    """Per-client link parameters (arrays of length n_clients)."""

    uplink_bps: np.ndarray
    downlink_bps: np.ndarray
    latency_s: np.ndarray

    def uplink_s(self, clients: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        return self.latency_s[clients] + 8.0 * np.asarray(nbytes, dtype=np.float64) / self.uplink_bps[clients]

    def downlink_s(self, clients: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        return self.latency_s[clients] + 8.0 * np.asarray(nbytes, dtype=np.float64) / self.downlink_bps[clients]


def load_trace(path: str | Path) -> np.ndarray:
    """Rows of (uplink_mbps, downlink_mbps, latency_ms).

    Bad input raises ConfigError naming the file, the line (counted in the file as it is,
    comments and blank lines included) and, for a bad value, the column.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not part of the header
    except OSError as e:
        raise ConfigError("link.trace", f"cannot read {p}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("link.trace", f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    expected = f"client,{','.join(_COLUMNS)}"
    header: list[str] | None = None
    idx: list[int] = []
    rows = []
    for lineno, ln in enumerate(text.splitlines(), start=1):
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        where = f"{p} line {lineno}"
        try:
            fields = [f.strip() for f in next(csv.reader([ln]))]
        except csv.Error as e:
            raise ConfigError("link.trace", f"{where}: not CSV ({e})") from None
        if header is None:
            missing = [c for c in _COLUMNS if c not in fields]
            if missing:
                raise ConfigError("link.trace", f"{where}: missing column(s) {', '.join(missing)}; expected a "
                                  f"header {expected}")
            header, idx = fields, [fields.index(c) for c in _COLUMNS]
            continue
        if len(fields) != len(header):
            raise ConfigError("link.trace", f"{where}: {len(fields)} field(s), the header has {len(header)}")
        vals = []
        for c, j in zip(_COLUMNS, idx):
            try:
                v = float(fields[j])
            except ValueError:
                raise ConfigError("link.trace", f"{where}, column {c}: not a number: {fields[j]!r}") from None
            if not np.isfinite(v) or (v < 0 if c == "latency_ms" else v <= 0):
                rule = "a finite number >= 0" if c == "latency_ms" else "a finite number > 0"
                raise ConfigError("link.trace", f"{where}, column {c}: {fields[j]!r} must be {rule}")
            vals.append(v)
        rows.append(tuple(vals))
    if header is None:
        raise ConfigError("link.trace", f"{p}: no header line; expected {expected}")
    if not rows:
        raise ConfigError("link.trace", f"{p} holds no data rows")
    return np.array(rows, dtype=np.float64)


def links_for_job(link: Mapping, n_clients: int, seed: int) -> Links:
    """The links of all clients of a job (the ``[link]`` section)."""
    c = np.arange(n_clients)
    if link.get("trace"):
        rows = load_trace(link["trace"])
        rows = rows[c % len(rows)]
        up, down, lat = rows[:, 0], rows[:, 1], rows[:, 2]
    else:
        up = np.full(n_clients, float(link["uplink_mbps"]))
        down = np.full(n_clients, float(link["downlink_mbps"]))
        lat = np.full(n_clients, float(link["latency_ms"]))
        sigma = float(link.get("spread", 0.0))
        if sigma > 0:
            # one row per client, so client c always takes draws 2c and 2c+1 of the stream: its link
            # depends on (seed, c) only, not on how many clients the job has
            rng = numpy_rng(seed, "client-links")
            f = rng.lognormal(0.0, sigma, size=(n_clients, 2))
            up, down = up * f[:, 0], down * f[:, 1]
    return Links(up * 1e6, down * 1e6, lat / 1e3)
