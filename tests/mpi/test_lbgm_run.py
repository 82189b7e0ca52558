"""LBGM in real MPI runs: delta = 0 is vanilla FL, logged recycling figures, state bytes, analyses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hpcfl.results import load_run
from hpcfl.run import checkpoint
from tests.conftest import needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]

N_PARAMS = 650  # logreg on digits: fc.weight 10x64 + fc.bias 10


def lbgm_job(codec: dict, routing: dict | None = None, rounds: int = 8, **log) -> dict:
    """Digits logreg, 6 clients with 3 classes each (LBGM's split), half sampled per round, the authors'
    update type (one full-batch gradient per round), server momentum 0.9."""
    return {
        "run": {"name": "lbgm", "ranks": 3, "rounds": rounds, "seed": 7},
        "data": {"dataset": "digits", "n_clients": 6, "partition": "shards", "classes_per_client": 3},
        "model": {"name": "logreg"},
        "train": {"algorithm": "fedsgd", "full_batch": True, "client_fraction": 0.5},
        "server": {"lr": 0.1, "momentum": 0.9},
        "codec": codec,
        "routing": dict(routing or {}),
        "log": dict(log),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three runs, made once: identity and lbgm{delta = 0} in whole-model mode, per-tensor lbgm{0.6}
    (30 rounds: many full and recycled rounds per client, with rounds sat out in between)."""
    tmp = tmp_path_factory.mktemp("lbgm")
    jobs = {"vanilla": lbgm_job({"id": "identity"}, {"scope": "model"}),
            "lbgm0": lbgm_job({"id": "lbgm", "delta": 0.0}, {"scope": "model"}),
            "lbgm": lbgm_job({"id": "lbgm", "delta": 0.6}, rounds=30, save_updates=3)}
    out = {}
    for name, job in jobs.items():
        path = tmp / f"{name}.h5"
        r = run_hpcfl(["run", str(write_job(tmp / f"{name}.toml", job)), "--out", str(path)])
        assert r.returncode == 0, r.stderr
        out[name] = (path, load_run(path))
    return out


def test_delta_zero_is_vanilla_fl_whole_model(runs):
    """Same job, identity vs lbgm{delta = 0} in whole-model mode: identical accuracy, losses and bytes."""
    a, b = runs["vanilla"][1], runs["lbgm0"][1]
    assert np.isfinite(a.rounds["accuracy"]).all()
    assert np.array_equal(a.rounds["accuracy"], b.rounds["accuracy"])
    assert np.array_equal(a.rounds["loss"], b.rounds["loss"])
    assert np.array_equal(a.clients["message_bytes"], b.clients["message_bytes"])
    assert b.slot_names == ["@model"]
    rec = b.codec_stat("recycled")
    part = b.clients["participated"].astype(bool)
    assert (rec[part] == 0).all() and np.isnan(rec[~part]).all()
    # the root holds one look-back gradient per client that has taken part so far
    seen = np.maximum.accumulate(part, axis=0).sum(axis=1)
    assert np.array_equal(b.rounds["root_state_bytes"], 4 * N_PARAMS * seen)
    assert (a.rounds["root_state_bytes"] == 0).all()


def test_recycling_logged_and_analysed(runs):
    """Per-tensor LBGM with a loose threshold: recycled tensors cost 4 bytes, stats add up to the payload,
    state bytes follow the look-back memory, and both analyses read the run."""
    out, run = runs["lbgm"]
    part = run.clients["participated"].astype(bool)
    assert run.slot_names == ["fc.weight", "fc.bias"]
    rec, floats = run.codec_stat("recycled"), run.codec_stat("floats")
    assert set(np.unique(rec[part])) <= {0.0, 1.0} and rec[part].sum() > 0 and (rec[part] == 0).any()
    assert (rec[0][part[0]] == 0).all()  # nobody has a look-back gradient in round 0
    numel = np.array([640, 10])
    want = np.where(rec == 1, 4, 4 * numel[None, None, :]).sum(axis=2)
    assert np.array_equal(run.clients["payload_bytes"][part], want[part])
    assert np.array_equal(4 * np.nansum(floats, axis=2)[part], run.clients["payload_bytes"][part])
    assert (run.clients["state_bytes"][part] == 4 * N_PARAMS).all()  # the client's own look-back gradients
    seen = np.maximum.accumulate(part, axis=0).sum(axis=1)
    assert np.array_equal(run.rounds["root_state_bytes"], 4 * N_PARAMS * seen)

    g = run_hpcfl(["analyze", "gradient-space", str(out), "--json"])
    assert g.returncode == 0, g.stderr
    res = json.loads(g.stdout)
    assert res["n_vectors"] == 3 * run.n_rounds and res["n_dims"] == N_PARAMS
    for grp in [res["overall"], *res["per_client"], *res["per_tensor"]]:
        c = grp["components"]
        assert 1 <= c["90%"] <= c["95%"] <= c["99%"] <= grp["n_vectors"]
        assert all(0 < x <= 1 + 1e-9 for x in grp["top_share"]) and grp["top_share"] == sorted(grp["top_share"])
    assert [t["group"] for t in res["per_tensor"]] == ["fc.weight", "fc.bias"]
    text = run_hpcfl(["analyze", "gradient-space", str(out)])
    assert text.returncode == 0 and "n95" in text.stdout and "per client" in text.stdout

    r = run_hpcfl(["analyze", "recycling", str(out), "--json"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    total = run.clients["payload_bytes"].sum() / 4 / run.clients["payload_bytes"].shape[1]
    assert s["cum_floats_per_client"] == pytest.approx(total)
    assert 0 < s["mean_recycled_fraction"] < 1 and 0 < s["floats_saved"] < 1


def test_client_and_root_lookback_state_identical_after_many_rounds(runs):
    """After the last round, every client's look-back gradients on its worker rank and the root's copy
    for that client are bit-identical (state digests from the final checkpoint, written by different
    processes), although both paths ran many times and clients sat rounds out."""
    out, run = runs["lbgm"]
    part = run.clients["participated"].astype(bool)
    rec = run.codec_stat("recycled")
    assert run.n_rounds == 30 and (part.sum(axis=0) >= 5).all()
    k = checkpoint.latest(out)
    assert k == run.n_rounds
    root = checkpoint.read_root(out, k)["states"]
    clients = checkpoint.read_clients(out, k, set(root))
    assert sorted(root) == sorted(clients) == list(range(6))
    for c in range(6):
        assert (rec[part[:, c], c] == 1).any() and (rec[part[:, c], c] == 0).sum() > 1, c  # both paths, repeatedly
        assert root[c].nbytes("shared") == clients[c].nbytes("shared") == 4 * N_PARAMS
        assert root[c].digest("shared") == clients[c].digest("shared"), c
    # the digests really depend on the look-back gradients: two clients with different data differ
    assert len({root[c].digest("shared") for c in range(6)}) == 6


def test_analyze_without_updates_exits_2(runs, tmp_path):
    out = runs["vanilla"][0]
    r = run_hpcfl(["analyze", "gradient-space", str(out)])
    assert r.returncode == 2 and "save_updates" in r.stderr and "Traceback" not in r.stderr
    r = run_hpcfl(["analyze", "gradient-space", str(tmp_path / "missing.h5")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
