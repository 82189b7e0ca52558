"""End-to-end jobs under mpiexec: bytes, HDF5 contents, determinism, launch modes, failures.

Each launch costs a few seconds (torch import per rank), so scenarios are few
and jobs tiny (platform.md §4).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from hpcfl.codecs.wire import header_size
from hpcfl.results import load_run
from hpcfl.results.schema import ROOT_ATTRS
from hpcfl.run.launch import in_batch_job
from tests.conftest import MPIEXEC, hpcfl_env, needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]

LOGREG_DIGITS = [("fc.weight", (10, 64)), ("fc.bias", (10,))]
N_PARAMS = 650


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _identity_header() -> int:
    # one part per tensor; payload padding: 2560 and 40 bytes are multiples of 8
    return header_size([(len(s), 1) for _, s in LOGREG_DIGITS])


def _run(tmp_path, job, name, *extra, env=None, timeout=300):
    jp = write_job(tmp_path / f"{name}.toml", job)
    out = tmp_path / f"{name}.h5"
    r = run_hpcfl(["run", str(jp), "--out", str(out), "--progress", "plain", *extra], env=env, timeout=timeout)
    return r, out


def test_identity_bytes_and_file(tmp_path, tiny_job):
    tiny_job["run"]["calibrate"] = "on"  # batched here: the network calibration before round 0
    r, out = _run(tmp_path, tiny_job, "identity")
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    assert run.complete and run.n_rounds == 3
    part = run.clients["participated"].astype(bool)
    assert part.sum(axis=1).tolist() == [3, 3, 3]  # fraction 0.5 of 6
    assert (run.clients["payload_bytes"][part] == 4 * N_PARAMS).all()
    assert (run.clients["header_bytes"][part] == _identity_header()).all()
    assert (run.clients["payload_bytes"][~part] == 0).all()
    assert (run.clients["raw_bytes"][part] == 4 * N_PARAMS).all()
    assert (run.rounds["uplink_bytes"] == 3 * (4 * N_PARAMS + _identity_header())).all()
    assert (run.rounds["downlink_bytes"] == 3 * 4 * N_PARAMS).all()
    assert np.isfinite(run.rounds["accuracy"]).all() and (run.rounds["accuracy"] > 0.1).all()
    assert (np.diff(run.rounds["wall_time"]) > 0).all()
    for k in ("train_s", "encode_s", "decode_s"):
        assert (run.clients[k][part] > 0).all() and np.isnan(run.clients[k][~part]).all()
    a = run.attrs
    # every documented root attribute is there (resumes_json only appears after a resume), none undocumented
    assert set(ROOT_ATTRS) - {"resumes_json"} <= set(a), sorted(set(ROOT_ATTRS) - set(a))
    assert set(a) <= set(ROOT_ATTRS), sorted(set(a) - set(ROOT_ATTRS))
    assert a["world_size"] == 3 and a["launcher"] == "self" and "MPICH" in a["mpi_library"]
    assert 0.0 <= a["initial_accuracy"] < run.rounds["accuracy"][-1]  # Acc_0 of per-bit accuracy
    assert json.loads(a["job_json"])["run"]["rounds"] == 3
    assert json.loads(a["versions_json"])["torch"]
    assert run.meta["client_rank"].tolist() == [1, 2, 1, 2, 1, 2]
    assert "round 3/3" in r.stdout
    cal = run.calibration
    assert cal is not None and cal["mode"] == "on" and cal["rounds_done"] == 0 and cal["resumes"] == {}
    assert cal["world_size"] == 3 and cal["peers"] == 2 and cal["budget_s"] == 0.5
    for k in ("latency_s", "bw_1MiB_Bps", "bw_16MiB_Bps", "gather_s", "gather_Bps"):
        assert np.isfinite(cal[k]) and cal[k] > 0, k
    assert cal["elapsed_s"] < 3.0  # budget 0.5 s; generous for a loaded 2-core box
    t = cal["table"]
    assert [(x.decode(), int(p), int(s)) for x, p, s in zip(t["test"], t["peer"], t["size"])] == [
        ("pingpong", 1, 8), ("pingpong", 1, 1 << 20), ("pingpong", 1, 16 << 20),
        ("pingpong", 2, 8), ("pingpong", 2, 1 << 20), ("pingpong", 2, 16 << 20), ("gather", -1, 1 << 20)]
    assert (t["iters"] >= 3).all() and (t["MBps_median"] > 0).all()
    assert "network before round 0" in r.stdout
    rep = run_hpcfl(["report", str(out)])
    assert rep.returncode == 0 and "accuracy final" in rep.stdout
    assert "network before round 0" in rep.stdout and "latency" in rep.stdout


def test_fp16_bytes(tmp_path, tiny_job):
    tiny_job["codec"] = {"id": "fp16"}
    tiny_job["run"]["rounds"] = 2
    r, out = _run(tmp_path, tiny_job, "fp16")
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    assert (run.calibration is None) == (not in_batch_job(hpcfl_env()))  # run.calibrate = auto
    part = run.clients["participated"].astype(bool)
    # fp16 parts: 1280 and 20 bytes; the 20-byte part pads to 24 (padding counts as header)
    assert (run.clients["payload_bytes"][part] == 2 * N_PARAMS).all()
    assert (run.clients["header_bytes"][part] == _identity_header() + (_pad8(20) - 20)).all()


def test_same_seed_same_results_any_world_size(tmp_path, tiny_job):
    """Clients train from (seed, round, client) and the root sums in client order,
    so results are bit-identical across repeats *and* world sizes."""
    tiny_job["codec"] = {"id": "ef", "inner": {"id": "fp16"}}  # stateful, to cover state
    r1, o1 = _run(tmp_path, tiny_job, "a")
    r2, o2 = _run(tmp_path, tiny_job, "b")
    r3, o3 = _run(tmp_path, tiny_job, "c", "--set", "run.ranks=4")
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stderr
    a, b, c = load_run(o1), load_run(o2), load_run(o3)
    assert c.attrs["world_size"] == 4
    for x in (b, c):
        np.testing.assert_array_equal(a.rounds["accuracy"], x.rounds["accuracy"])
        np.testing.assert_array_equal(a.rounds["loss"], x.rounds["loss"])
        for k in ("payload_bytes", "header_bytes", "participated", "train_loss"):
            np.testing.assert_array_equal(a.clients[k], x.clients[k])


def test_under_external_mpiexec(tmp_path, tiny_job):
    tiny_job["run"]["rounds"] = 2
    jp = write_job(tmp_path / "ext.toml", tiny_job)
    out = tmp_path / "ext.h5"
    r = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, "-m", "mpi4py", "-m", "hpcfl", "run", str(jp),
                        "--out", str(out)], capture_output=True, text=True, timeout=300, env=hpcfl_env())
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    assert run.complete and run.attrs["launcher"] == "mpiexec" and run.n_rounds == 2


def test_failing_client_ends_job_and_keeps_rounds(tmp_path, tiny_job):
    tiny_job["run"]["rounds"] = 6
    t = time.monotonic()
    r, out = _run(tmp_path, tiny_job, "fail", env=hpcfl_env(HPCFL_FAULT="rank=2,round=2"), timeout=120)
    assert r.returncode != 0
    assert time.monotonic() - t < 60
    assert "injected fault" in r.stderr and "rank 2" in r.stderr
    # the launcher's last line repeats the file's reason, even if the rank's own lines were lost in the abort
    assert "rank 2: InjectedFault" in r.stderr.rstrip().splitlines()[-1]
    run = load_run(out)
    assert run.n_rounds == 2  # rounds 0 and 1 completed
    assert run.status.startswith("failed")
    with h5py.File(out, "r") as f:
        assert f.attrs["rounds_done"] == 2


def test_bad_job_fails_before_launch(tmp_path, tiny_job):
    tiny_job["train"]["lr"] = -1.0
    t = time.monotonic()
    r, out = _run(tmp_path, tiny_job, "bad")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.lr" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()
    assert time.monotonic() - t < 30


def test_link_model_and_pace(tmp_path, tiny_job):
    """model: link times computed from bytes; pace: workers really wait for them."""
    tiny_job["run"]["rounds"] = 2
    tiny_job["link"] = {"mode": "model", "uplink_mbps": 1.0, "downlink_mbps": 4.0, "latency_ms": 50.0}
    r, out = _run(tmp_path, tiny_job, "model")
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    part = run.clients["participated"].astype(bool)
    up = 0.05 + 8 * run.clients["message_bytes"][part] / 1e6
    down = 0.05 + 8 * run.clients["downlink_bytes"][part] / 4e6
    np.testing.assert_allclose(run.clients["link_up_s"][part], up, rtol=1e-12)
    np.testing.assert_allclose(run.clients["link_down_s"][part], down, rtol=1e-12)
    assert np.isnan(run.clients["link_up_s"][~part]).all()
    assert (run.rounds["modelled_round_s"] > up.max() + down.max()).all()
    assert (run.ranks["pace_s"] == 0).all()
    model_round_s = run.rounds["round_s"].copy()
    tiny_job["link"]["mode"] = "pace"
    r, out = _run(tmp_path, tiny_job, "pace")
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    busy = run.ranks["n_clients"][:, 1:] > 0
    assert (run.ranks["pace_s"][:, 1:][busy] > 0.1).all() and (run.ranks["pace_s"][:, 1:][~busy] == 0).all()
    assert (run.rounds["round_s"] > run.ranks["pace_s"].max(axis=1)).all()
    # only pace mode slows the run: its fastest round is slower than model mode's fastest (the median of
    # two rounds would include round 0's warm-up, 0.27 s once in CI, above pace mode's 0.14 s rounds)
    assert model_round_s.min() + 0.05 < run.rounds["round_s"].min()


def test_nonfinite_update_policies(tmp_path, tiny_job):
    tiny_job["run"]["rounds"] = 3
    r, out = _run(tmp_path, tiny_job, "nanstop", env=hpcfl_env(HPCFL_FAULT="rank=1,round=1,kind=nan"))
    assert r.returncode != 0 and "NaN/Inf in round 1" in r.stderr
    assert load_run(out).n_rounds == 1
    tiny_job["run"]["nonfinite"] = "drop"
    r, out = _run(tmp_path, tiny_job, "nandrop", env=hpcfl_env(HPCFL_FAULT="rank=1,round=1,kind=nan"))
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    assert run.rounds["n_dropped"].tolist()[0] == 0 and run.rounds["n_dropped"][1] >= 1
    hosted_by_1 = run.meta["client_rank"] == 1
    assert (run.clients["dropped"][1][hosted_by_1 & (run.clients["participated"][1] == 1)] == 1).all()
    assert np.isfinite(run.rounds["accuracy"]).all()
    dropped = np.flatnonzero(run.clients["dropped"][1])
    assert f"round 1: dropped client{'s' if dropped.size > 1 else ''} {', '.join(map(str, dropped))} (NaN/Inf" \
        in r.stderr, r.stderr
