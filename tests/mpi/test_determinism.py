"""Same job + seed give the same metrics, byte counts, wire bytes and final model, on any world size.

``tests/mpi/test_run.py::test_same_seed_same_results_any_world_size`` compares metrics and byte
counts; this test also compares every wire message byte for byte and the final global model, with a
codec that draws random numbers (QSGD's stochastic rounding) and keeps state (error feedback), and
server momentum. A run with another seed must differ, so the comparisons are not vacuous.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcfl.results import load_run
from tests.conftest import needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]

ROUND_FIELDS = ("accuracy", "loss", "train_loss", "n_participants", "uplink_bytes", "payload_bytes",
                "header_bytes", "raw_bytes", "downlink_bytes", "compression_ratio", "root_state_bytes", "n_dropped")
CLIENT_FIELDS = ("participated", "train_loss", "raw_bytes", "payload_bytes", "header_bytes", "message_bytes",
                 "downlink_bytes", "state_bytes", "dropped")


def _messages(out: Path) -> dict[str, bytes]:
    d = out.with_name(out.name + ".messages")
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.hpfl"))}


def _final_model(out: Path, rounds: int) -> np.ndarray:
    with h5py.File(out.with_name(out.name + ".ckpt") / f"root-k{rounds:06d}.h5", "r") as f:
        return f["theta"][()]


def test_same_seed_same_metrics_wire_bytes_and_model(tmp_path, tiny_job):
    tiny_job["run"].update(rounds=4, ranks=3)
    tiny_job["model"] = {"name": "mlp", "hidden": [16]}
    tiny_job["server"] = {"momentum": 0.9}
    tiny_job["codec"] = {"id": "ef", "inner": {"id": "qsgd", "levels": 4}}
    tiny_job["log"] = {"save_messages": "all"}
    R = tiny_job["run"]["rounds"]
    jp = write_job(tmp_path / "job.toml", tiny_job)
    variants = {"a": [], "b": [], "four": ["--set", "run.ranks=4"]}
    outs = {}
    for name, extra in variants.items():
        outs[name] = tmp_path / f"{name}.h5"
        r = run_hpcfl(["run", str(jp), "--out", str(outs[name]), *extra])
        assert r.returncode == 0, r.stderr
    tiny_job["run"]["seed"] += 1
    outs["seed"] = tmp_path / "seed.h5"
    r = run_hpcfl(["run", str(write_job(tmp_path / "seed.toml", tiny_job)), "--out", str(outs["seed"])])
    assert r.returncode == 0, r.stderr

    runs = {k: load_run(v) for k, v in outs.items()}
    msgs = {k: _messages(v) for k, v in outs.items()}
    models = {k: _final_model(v, R) for k, v in outs.items()}
    a = runs["a"]
    assert a.complete and len(msgs["a"]) == int(a.clients["participated"].sum()) > 0
    for k in ("b", "four"):
        x = runs[k]
        for f in ROUND_FIELDS:
            np.testing.assert_array_equal(a.rounds[f], x.rounds[f], err_msg=f"{k}: rounds.{f}")
        for f in CLIENT_FIELDS:
            np.testing.assert_array_equal(a.clients[f], x.clients[f], err_msg=f"{k}: clients.{f}")
        assert msgs[k].keys() == msgs["a"].keys()
        differ = [n for n in msgs["a"] if msgs[k][n] != msgs["a"][n]]
        assert not differ, f"{k}: wire bytes differ in {differ}"
        assert models[k].tobytes() == models["a"].tobytes(), f"{k}: final model differs"
    # what the world size does change: which rank hosts a client, and the per-rank table
    assert runs["four"].attrs["world_size"] == 4 and a.attrs["world_size"] == 3
    assert a.meta["client_rank"].tolist() != runs["four"].meta["client_rank"].tolist()
    assert a.ranks["rss_bytes"].shape[1] == 3 and runs["four"].ranks["rss_bytes"].shape[1] == 4
    # another seed: other samples, minibatches and stochastic rounding
    s = runs["seed"]
    assert not np.array_equal(a.clients["participated"], s.clients["participated"]) or any(
        msgs["seed"].get(n) != m for n, m in msgs["a"].items())
    assert models["seed"].tobytes() != models["a"].tobytes()
