"""RunLog.append_round: one round of /rounds, /clients (C = 100) and /ranks rows, flushed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from .common import Benchmark


class AppendRound(Benchmark):
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
