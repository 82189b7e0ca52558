"""IGC in real runs: the identity check against uncompressed FedSGD, and the byte accounting."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfl.results import load_run
from tests.conftest import needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]

D = 64 * 10 + 10  # logreg on digits
D_PAD = 1024


def _job(tiny_job: dict, codec: dict) -> dict:
    job = dict(tiny_job)
    job["run"] = {**tiny_job["run"], "rounds": 8, "ranks": 2}  # fewer torch imports: the test stays fast
    job["train"] = {"algorithm": "fedsgd", "full_batch": True, "client_fraction": 0.5}
    job["server"] = {"lr": 0.5, "momentum": 0.9}
    job["routing"] = {"scope": "model"}
    job["codec"] = codec
    return job


def _run(tmp_path, name: str, job: dict):
    out = tmp_path / f"{name}.h5"
    r = run_hpcfl(["run", str(write_job(tmp_path / f"{name}.toml", job)), "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return load_run(out)


def test_full_dimension_igc_reproduces_fedsgd(tmp_path, tiny_job):
    """d = D' (the full orthogonal SRHT): the same test losses as uncompressed FedSGD (with server
    momentum) to float32 rounding; not bit for bit, since S^T S g rounds in every butterfly."""
    base = _run(tmp_path, "identity", _job(tiny_job, {"id": "identity"}))
    full = _run(tmp_path, "igc", _job(tiny_job, {"id": "igc", "dim": 4096}))  # capped at D' = 1024
    part = full.clients["participated"].astype(bool)
    assert (full.clients["payload_bytes"][part] == 4 * D_PAD).all()
    lb, lf = base.rounds["loss"], full.rounds["loss"]
    assert np.isfinite(lb).all() and lb[-1] < lb[0]
    assert np.allclose(lf, lb, rtol=2e-5, atol=0), np.abs(lf / lb - 1).max()
    assert np.array_equal(full.rounds["accuracy"], base.rounds["accuracy"])
    assert not np.array_equal(lf, lb)  # it is a real transform, not a copy
    share = full.codec_stat("zshare")[part]
    assert np.allclose(share, 1, atol=1e-5)


def test_timevarying_bytes_and_downlink_protocol(tmp_path, tiny_job):
    """Upload 4d per client; download 4d in period 0, 8d for clients that hold the previous period's
    base, the full model for staler ones; all logged per client."""
    d, period = 100, 2
    job = _job(tiny_job, {"id": "igc", "dim": d, "variant": "timevarying", "period": period})
    job["server"]["momentum"] = 0.0  # the 2d download is exact only under plain server SGD
    job["data"] = {**tiny_job["data"], "n_clients": 10}
    job["train"]["client_fraction"] = 0.2
    run = _run(tmp_path, "tv", job)
    part = run.clients["participated"].astype(bool)
    assert (run.clients["payload_bytes"][part] == 4 * d).all()
    assert (run.clients["payload_bytes"][~part] == 0).all()
    last = np.full(part.shape[1], -1)
    kinds = set()
    for r in range(run.n_rounds):
        for c in np.flatnonzero(part[r]):
            e = r // period
            held = last[c] // period if last[c] >= 0 else 0
            want = 4 * d if e == 0 else (8 * d if e - held <= 1 else 4 * D)
            kinds.add(want)
            assert run.clients["downlink_bytes"][r, c] == want, (r, c)
        last[part[r]] = r
    assert kinds == {4 * d, 8 * d, 4 * D}  # every branch of the protocol was exercised
    assert (run.rounds["downlink_bytes"] == run.clients["downlink_bytes"].sum(axis=1)).all()
    sub = run.codec_stat("subspace")[part][:, 0]
    rounds = np.nonzero(part)[0]
    assert np.array_equal(sub, rounds // period)
    share = run.codec_stat("zshare")[part]
    assert (share > 0).all() and (share < 0.5).all()  # d / D' ~ 0.1


@pytest.mark.parametrize("codec,per_client_down", [
    ({"id": "igc", "dim": 100, "variant": "static"}, lambda d, k: 4 * d),
    ({"id": "igc", "dim": 100, "variant": "ksubspace", "k": 3, "assign": "client"}, lambda d, k: 4 * k * d),
], ids=["static", "ksubspace"])
def test_static_and_ksubspace_bytes_in_a_run(tmp_path, tiny_job, codec, per_client_down):
    """Upload 4d payload (+ the 64-byte one-slot header) per participating client; download 4d (static)
    or 4Kd (K-subspace), logged per participating client and summed per round; nothing for the others.
    The subspace a client projected onto is the one both sides derive from (seed, round, client)."""
    from hpcfl.codecs.methods.igc import IGC

    d = codec["dim"]
    run = _run(tmp_path, codec["variant"], _job(tiny_job, codec))
    part = run.clients["participated"].astype(bool)
    assert part.any() and (~part).any()
    assert (run.clients["payload_bytes"][part] == 4 * d).all()
    assert (run.clients["message_bytes"][part] == 4 * d + 64).all()
    assert (run.clients["downlink_bytes"][part] == per_client_down(d, codec.get("k", 1))).all()
    assert (run.clients["downlink_bytes"][~part] == 0).all()
    assert (run.rounds["downlink_bytes"] == run.clients["downlink_bytes"].sum(axis=1)).all()
    assert (run.rounds["downlink_bytes"] == part.sum(axis=1) * per_client_down(d, codec.get("k", 1))).all()
    igc = IGC(**{k: v for k, v in codec.items() if k != "id"})
    rounds, clients = np.nonzero(part)
    want = [igc.subspace(int(r), int(c), tiny_job["run"]["seed"]) for r, c in zip(rounds, clients)]
    assert np.array_equal(run.codec_stat("subspace")[part][:, 0], want)
    if codec["variant"] == "ksubspace":
        assert len(set(want)) > 1  # the client assignment really varies
