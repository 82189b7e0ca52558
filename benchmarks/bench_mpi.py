"""MPI figures tracked over commits: ``hpcfl bench mpi`` and ``hpcfl bench round`` on a small grid.

Each class launches its command *once* (``setup_cache``: ``python -m hpcfl bench
... --json``, which starts mpiexec itself) and its ``track_`` benchmarks read
figures from that launch. Every figure is a median over many iterations taken
inside that one launch: a single-shot MPI timing per asv sample varies by
+-40% between identical runs on this box (platform.md §6). The launch has a
subprocess timeout and ``MPIEXEC_TIMEOUT``; without an mpiexec beside the
interpreter the benchmarks are skipped (``NotImplementedError`` in setup).

Units: GB/s = 10^9 bytes/s, s = seconds, ratio = 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import Benchmark

MPIEXEC = Path(sys.executable).with_name("mpiexec")
LAUNCH_TIMEOUT = 150  # seconds, subprocess; mpiexec itself gets MPIEXEC_TIMEOUT a little below


def _launch(args: list[str]) -> dict | None:
    """Records of ``python -m hpcfl bench ARGS --json --quiet`` keyed by row, or None if there is no mpiexec."""
    if not MPIEXEC.exists():
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPIEXEC_TIMEOUT=str(LAUNCH_TIMEOUT - 10))
    r = subprocess.run([sys.executable, "-m", "hpcfl", "bench", *args, "--json", "--quiet"], capture_output=True,
                       text=True, timeout=LAUNCH_TIMEOUT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"hpcfl bench {args[0]} exited with {r.returncode}: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def _need(cache) -> None:
    if cache is None:
        raise NotImplementedError(f"no mpiexec beside {sys.executable}")


MPI_SIZES = [8, 1048576]


class MpiPointToPoint(Benchmark):
    """2 ranks: one-way ping-pong time of 8 B and bandwidth of 1 MiB, buffer and pickle APIs."""

    params = (["buffer", "pickle"],)
    param_names = ["api"]

    def setup_cache(self):
        return _launch(["mpi", "--ranks", "2", "--tests", "pingpong", "--apis", "buffer,pickle", "--sizes",
                        ",".join(map(str, MPI_SIZES)), "--budget", "0.3"])

    setup_cache.timeout = LAUNCH_TIMEOUT + 10

    def setup(self, cache, api: str) -> None:
        _need(cache)
        self.rows = {r["size"]: r for r in cache["records"] if r["api"] == api}

    def track_latency_8B(self, cache, api: str) -> float:
        return self.rows[8]["t_median_s"]

    track_latency_8B.unit = "s"

    def track_bandwidth_1MiB(self, cache, api: str) -> float:
        return self.rows[1048576]["MBps_median"] / 1e3

    track_bandwidth_1MiB.unit = "GB/s"


ROUND_CODECS = ["identity", "topk_ef"]
ROUND_SIZE = 1048576


class RoundGather(Benchmark):
    """3 ranks (root + 2 workers, 1 client each), 1 MiB raw per client: hpcfl's gather vs bare Gatherv."""

    params = (ROUND_CODECS,)
    param_names = ["codec"]

    def setup_cache(self):
        return _launch(["round", "--ranks", "3", "--sizes", str(ROUND_SIZE), "--codecs", ",".join(ROUND_CODECS),
                        "--repeat", "3", "--budget", "0.3", "--max-gathers", "20"])

    setup_cache.timeout = LAUNCH_TIMEOUT + 10

    def setup(self, cache, codec: str) -> None:
        _need(cache)
        (self.row,) = [r for r in cache["records"] if r["codec"] == codec]

    def track_gather_vs_bare(self, cache, codec: str) -> float:
        """hpcfl gather bandwidth / bare Gatherv bandwidth (aim >= 0.9)."""
        return self.row["gather_vs_bare"]

    track_gather_vs_bare.unit = "ratio"

    def track_gather_bandwidth(self, cache, codec: str) -> float:
        return self.row["gather_MBps"] / 1e3

    track_gather_bandwidth.unit = "GB/s"

    def track_bare_gatherv_bandwidth(self, cache, codec: str) -> float:
        return self.row["bare_MBps"] / 1e3

    track_bare_gatherv_bandwidth.unit = "GB/s"

    def track_effective_bandwidth(self, cache, codec: str) -> float:
        """Raw bytes delivered / (encode + gather + decode)."""
        return self.row["effective_MBps"] / 1e3

    track_effective_bandwidth.unit = "GB/s"

    def track_gather_time(self, cache, codec: str) -> float:
        return self.row["gather_median_s"]

    track_gather_time.unit = "s"
