"""RunLog.append_round: one round of /rounds, /clients (C = 100) and /ranks rows, flushed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from .common import Benchmark


class AppendRound(Benchmark):
    """asv re-runs ``setup`` before every timed call (asv_runner, asv#966), so this times the first
    append to a freshly created file. ``LogRound`` below times the steady state."""

    params = [[100]]
    param_names = ["n_clients"]

    def setup(self, n_clients: int) -> None:
        from hpcfl.results.writer import RunLog

        self.dir = tempfile.mkdtemp(prefix="hpcfl-asv-")
        self.log = RunLog(Path(self.dir) / "run.h5", attrs={"bench": "append_round"}, n_clients=n_clients,
                          n_ranks=4)
        rng = np.random.default_rng(0)
        self.server = {"round": 0, "wall_time": 1.0, "accuracy": 0.5, "round_s": 0.1, "uplink_bytes": 10**6}
        self.clients = {"participated": np.ones(n_clients, np.uint8),
                        "train_s": rng.random(n_clients), "encode_s": rng.random(n_clients),
                        "decode_s": rng.random(n_clients), "message_bytes": np.full(n_clients, 10**4)}
        self.ranks = {"compute_s": rng.random(4), "n_clients": np.full(4, n_clients // 3)}

    def teardown(self, n_clients: int) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def time_append_round(self, n_clients: int) -> None:
        self.log.append_round(self.server, self.clients, self.ranks)


class LogRound(Benchmark):
    """What the root does per round, in steady state: ``append_round`` then ``set_round_value("log_s")``
    on a file that already holds rounds (the first appends allocate chunks; they happen in setup)."""

    params = [[20, 100]]
    param_names = ["n_clients"]
    WARM_ROUNDS = 8

    def setup(self, n_clients: int) -> None:
        from hpcfl.results.writer import RunLog

        self.dir = tempfile.mkdtemp(prefix="hpcfl-asv-")
        self.log = RunLog(Path(self.dir) / "run.h5", attrs={"bench": "log_round"}, n_clients=n_clients,
                          n_ranks=4)
        rng = np.random.default_rng(0)
        self.server = {"round": 0, "wall_time": 1.0, "accuracy": 0.5, "round_s": 0.1, "uplink_bytes": 10**6}
        self.clients = {"participated": np.ones(n_clients, np.uint8),
                        "train_s": rng.random(n_clients), "encode_s": rng.random(n_clients),
                        "decode_s": rng.random(n_clients), "message_bytes": np.full(n_clients, 10**4)}
        self.ranks = {"compute_s": rng.random(4), "n_clients": np.full(4, n_clients // 3)}
        for _ in range(self.WARM_ROUNDS):
            self.time_log_round(n_clients)

    def teardown(self, n_clients: int) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def time_log_round(self, n_clients: int) -> None:
        self.log.append_round(self.server, self.clients, self.ranks)
        self.log.set_round_value("log_s", 1e-3)
