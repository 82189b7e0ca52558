"""Rank failures end the job and keep completed rounds; --resume continues bit for bit."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hpcfl.results import load_run
from tests.conftest import hpcfl_env, needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]


@pytest.fixture
def stateful_job(tiny_job):
    """Stateful on both sides of the optimizer: error feedback and server momentum."""
    tiny_job["run"].update(rounds=6, ranks=3)
    tiny_job["model"] = {"name": "mlp", "hidden": [16]}
    tiny_job["server"] = {"momentum": 0.9}
    tiny_job["codec"] = {"id": "topk_ef", "ratio": 0.1}
    return tiny_job


def _same_metrics(a, b):
    for k in ("accuracy", "loss", "train_loss", "uplink_bytes", "payload_bytes", "n_participants"):
        np.testing.assert_array_equal(a.rounds[k], b.rounds[k], err_msg=k)
    for k in ("participated", "payload_bytes", "header_bytes", "train_loss", "state_bytes"):
        np.testing.assert_array_equal(a.clients[k], b.clients[k], err_msg=k)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, stateful_job):
    jp = write_job(tmp_path / "job.toml", stateful_job)
    full, cut = tmp_path / "full.h5", tmp_path / "cut.h5"
    assert run_hpcfl(["run", str(jp), "--out", str(full)]).returncode == 0
    t = time.monotonic()
    r = run_hpcfl(["run", str(jp), "--out", str(cut)], env=hpcfl_env(HPCFL_FAULT="rank=1,round=4,kind=kill"))
    assert r.returncode != 0 and time.monotonic() - t < 60
    run = load_run(cut)
    assert run.n_rounds == 4 and run.status.startswith("failed")
    assert "killed by SIGKILL during round 4" in run.status, run.status  # the round, even with no rank's word
    assert r.stderr.rstrip().splitlines()[-1].startswith("hpcfl run: failed: MPI job exited with code 9; a rank")
    r = run_hpcfl(["run", "--resume", str(cut)])
    assert r.returncode == 0, r.stderr
    resumed = load_run(cut)
    assert resumed.complete and resumed.n_rounds == 6
    _same_metrics(load_run(full), resumed)
    # nothing left to do: a second resume is refused before any rank starts
    r = run_hpcfl(["run", "--resume", str(cut)])
    assert r.returncode == 2 and "all 6 rounds are done" in r.stderr
    # ...unless the run is extended
    r = run_hpcfl(["run", "--resume", str(cut), "--set", "run.rounds=7"])
    assert r.returncode == 0, r.stderr
    assert load_run(cut).n_rounds == 7


def test_resume_refusals(tmp_path, stateful_job):
    stateful_job["run"]["checkpoint_every"] = 0
    stateful_job["run"]["rounds"] = 2
    jp = write_job(tmp_path / "job.toml", stateful_job)
    out = tmp_path / "nock.h5"
    stale = tmp_path / "nock.h5.ckpt"  # an earlier run's checkpoints at the same path: a fresh run drops them
    stale.mkdir()
    for name in ("root-k000099.h5", "rank0001-k000099.h5", "rank0002-k000099.h5"):
        (stale / name).write_bytes(b"stale")
    assert run_hpcfl(["run", str(jp), "--out", str(out)]).returncode == 0
    assert not stale.exists()
    r = run_hpcfl(["run", "--resume", str(out)])
    assert r.returncode == 2 and "no checkpoints" in r.stderr
    r = run_hpcfl(["run", "--resume", str(out), "--set", "train.lr=0.5"])
    assert r.returncode == 2 and "train.lr" in r.stderr
    r = run_hpcfl(["run", "--resume", str(tmp_path / "missing.h5")])
    assert r.returncode == 2
    # a checkpoint of another job (or of a job schema this hpcfl reads differently) is refused before launch
    import h5py

    stale.mkdir()
    with h5py.File(stale / "root-k000001.h5", "w") as f:
        f.attrs.update(job_hash="deadbeef", world_size=3, rounds_done=1)
    for w in (1, 2):
        (stale / f"rank{w:04d}-k000001.h5").write_bytes(b"")
    r = run_hpcfl(["run", "--resume", str(out)])
    assert r.returncode == 2 and "belongs to job deadbeef" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("who, expect", [
    (2, "rank 2 sent nothing to the root"),                 # a worker stops answering: the root names it
    (0, "for the root (rank 0) to start round 3"),          # the root stops answering: a worker names it
])
def test_hung_rank_ends_job_within_timeout(tmp_path, tiny_job, who, expect):
    """A rank that stops answering (sleeps outside MPI) ends the whole job within run.timeout plus
    start-up, with the rank and round named on stderr and in the file, and earlier rounds kept."""
    tiny_job["run"].update(rounds=6, ranks=3, timeout=4.0)
    jp = write_job(tmp_path / "job.toml", tiny_job)
    out = tmp_path / "hang.h5"
    t = time.monotonic()
    r = run_hpcfl(["run", str(jp), "--out", str(out)], env=hpcfl_env(HPCFL_FAULT=f"rank={who},round=2,kind=hang"),
                  timeout=180)
    took = time.monotonic() - t
    assert r.returncode != 0
    assert took < 90, took  # the hang itself lasts an hour
    assert "RankTimeout" in r.stderr and expect in r.stderr and "run.timeout = 4 s" in r.stderr, r.stderr[-2000:]
    run = load_run(out)
    assert run.status.startswith("failed") and "RankTimeout" in run.status and expect in run.status, run.status
    assert run.n_rounds == 2  # rounds 0 and 1; the hang starts at the top of round 2 on either side
