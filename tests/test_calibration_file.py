"""run.calibrate: when it is on, and how /calibration is written, read and reported (no MPI)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpcfl.config import job_from_dict
from hpcfl.errors import ConfigError
from hpcfl.results import load_run
from hpcfl.results.report import format_calibration, format_summary, summarize
from hpcfl.results.schema import CALIBRATION_FIELDS
from hpcfl.results.writer import RunLog, table_dtype
from hpcfl.run.orchestrator import calibration_wanted


@pytest.mark.parametrize("mode,env,want", [
    ("on", {}, True), ("off", {"SLURM_JOB_ID": "7"}, False), ("auto", {}, False),
    ("auto", {"SLURM_JOB_ID": "7"}, True), ("auto", {"PBS_JOBID": "1.pbs"}, True),
    ("auto", {"LSB_JOBID": "3"}, True), ("auto", {"FLUX_JOB_ID": "f1"}, True),
    ("auto", {"SLURM_JOB_ID": ""}, False), ("auto", {"PMI_RANK": "0"}, False),  # mpiexec alone is no batch job
])
def test_calibration_wanted(mode, env, want):
    assert calibration_wanted(mode, env) is want


def test_job_keys():
    job = job_from_dict({})
    assert job.run.calibrate == "auto" and job.run.calibrate_s == 0.5
    for bad in ({"calibrate": "sometimes"}, {"calibrate_s": 2.0}, {"calibrate_s": 0.0}):
        with pytest.raises(ConfigError):
            job_from_dict({"run": bad})


def _cal(lat: float = 2e-6) -> dict:
    table = np.zeros(3, dtype=table_dtype(CALIBRATION_FIELDS))
    table["test"] = [b"pingpong", b"pingpong", b"gather"]
    table["peer"] = [1, 1, -1]
    table["size"] = [8, 1 << 20, 1 << 20]
    table["iters"] = 10
    table["t_median_s"] = [lat, 1e-4, 3e-4]
    return {"latency_s": lat, "bw_1MiB_Bps": 1e10, "bw_16MiB_Bps": 9e9, "gather_s": 3e-4, "gather_Bps": 7e9,
            "world_size": 3, "peers": 2, "budget_s": 0.5, "elapsed_s": 0.55, "mode": "on", "table": table}


def test_written_read_and_reported(tmp_path):
    p = tmp_path / "r.h5"
    with RunLog(p, attrs={"job_json": "{}"}, n_clients=2, n_ranks=3, calibration=_cal()) as log:
        log.append_round({"round": 0, "round_s": 0.1}, {}, {})
    run = load_run(p)
    cal = run.calibration
    assert cal["latency_s"] == 2e-6 and cal["peers"] == 2 and cal["mode"] == "on" and cal["rounds_done"] == 0
    assert cal["table"].dtype.names == tuple(m.name for m in CALIBRATION_FIELDS)
    assert cal["table"]["size"].tolist() == [8, 1 << 20, 1 << 20] and cal["resumes"] == {}
    s = summarize(run)
    assert s["calibration"]["gather_Bps"] == 7e9 and "table" not in s["calibration"]
    text = format_summary(s)
    assert "latency 2.00 us" in text and "1 MiB 10,000 MB/s" in text and "Gather 1 MiB/rank 7,000 MB/s" in text

    # a resume that calibrates again keeps the first and adds resume_<k>
    with RunLog.resume(p, 1, calibration=_cal(5e-6)):
        pass
    cal = load_run(p).calibration
    assert cal["latency_s"] == 2e-6 and list(cal["resumes"]) == [1]
    assert cal["resumes"][1]["latency_s"] == 5e-6 and cal["resumes"][1]["rounds_done"] == 1


def test_absent_and_nan(tmp_path):
    p = tmp_path / "r.h5"
    with RunLog(p, attrs={"job_json": "{}"}, n_clients=2, n_ranks=3):
        pass
    run = load_run(p)
    assert run.calibration is None and summarize(run)["calibration"] is None
    assert "network" not in format_summary(summarize(run))
    line = format_calibration({"latency_s": math.nan, "elapsed_s": 0.1, "peers": 0})
    assert "latency -" in line


def test_set_round_value_fresh_and_resumed(tmp_path):
    """The writer keeps the last /rounds row in memory for set_round_value (no read-back); after a
    resume it reads that row once."""
    p = tmp_path / "r.h5"
    with RunLog(p, attrs={"job_json": "{}"}, n_clients=2, n_ranks=3) as log:
        for r in range(2):
            log.append_round({"round": r, "round_s": 0.1 * (r + 1), "uplink_bytes": 10 + r},
                             {"participated": np.array([1, 0], np.uint8)}, {"compute_s": np.ones(3)})
            log.set_round_value("log_s", 0.01 * (r + 1))
            log.set_round_value("ckpt_s", 0.5)
        assert log.last_value("log_s") == 0.02
    with RunLog.resume(p, 1) as log:
        log.set_round_value("ckpt_s", 0.25)  # round 0's row, read back once
        log.append_round({"round": 1, "round_s": 0.3}, {}, {})
        log.set_round_value("log_s", 0.03)
    run = load_run(p)
    assert run.rounds["round"].tolist() == [0, 1] and run.rounds["uplink_bytes"].tolist() == [10, 0]
    np.testing.assert_array_equal(run.rounds["log_s"], [0.01, 0.03])
    np.testing.assert_array_equal(run.rounds["ckpt_s"], [0.25, np.nan])  # not set: the fill value
    np.testing.assert_array_equal(run.rounds["round_s"], [0.1, 0.3])
    assert run.clients["participated"].tolist() == [[1, 0], [0, 0]] and run.ranks["compute_s"][0].tolist() == [1] * 3
