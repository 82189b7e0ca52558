"""A real local sweep through mpiexec: 2 points of a tiny job, skip on re-run, re-run of a failed point,
and the comparison report over the sweep directory."""

from __future__ import annotations

import csv
import io

import h5py
import pytest

from hpcfl.results import load_run
from hpcfl.sweep import load_sweep, point_status
from tests.conftest import needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]


def test_local_sweep(tmp_path, tiny_job):
    tiny_job["run"]["rounds"] = 2
    base = write_job(tmp_path / "base.toml", tiny_job)
    d = tmp_path / "sw"
    r = run_hpcfl(["sweep", str(base), "--grid", "codec.id=identity,fp16", "--dir", str(d), "--run"])
    assert r.returncode == 0, r.stdout + r.stderr
    sw = load_sweep(d)
    assert [p.name for p in sw.points] == ["0000-id=identity", "0001-id=fp16"]
    runs = [load_run(d / p.run_file) for p in sw.points]
    assert all(run.complete and run.n_rounds == 2 and run.attrs["world_size"] == 3 for run in runs)
    assert [run.attrs["job_hash"] for run in runs] == [p.job_hash for p in sw.points]
    assert [run.codec["codec"]["id"] for run in runs] == ["identity", "fp16"]
    assert runs[1].rounds["payload_bytes"].sum() * 2 == runs[0].rounds["payload_bytes"].sum()

    # finished points are skipped; a failed one is re-run alone
    r = run_hpcfl(["sweep", "--dir", str(d), "--run"])
    assert r.returncode == 0 and "nothing to do" in r.stdout
    with h5py.File(d / sw.points[1].run_file, "r+") as f:
        f.attrs["status"] = "failed: MPI job exited with code 1"
    assert point_status(sw, sw.points[1]).startswith("failed")
    mtime0 = (d / sw.points[0].run_file).stat().st_mtime_ns
    r = run_hpcfl(["sweep", "--dir", str(d), "--run"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 of 1 run(s) complete, 1 skipped as complete" in r.stdout
    assert (d / sw.points[0].run_file).stat().st_mtime_ns == mtime0
    assert point_status(sw, sw.points[1]) == "complete"

    r = run_hpcfl(["report", str(d), "--csv"])
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["codec.id"] for row in rows] == ["identity", "fp16"]
    assert [int(row["uplink_bytes"]) for row in rows] == [int(run.rounds["uplink_bytes"].sum()) for run in
                                                          (load_run(d / p.run_file) for p in sw.points)]
