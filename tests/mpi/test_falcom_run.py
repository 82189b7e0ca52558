"""FalCom in a real run: the bound checked on every message (verify mode), statistics logged
(a ratio for every slot), decoder state on the root, and the modelled link time, logged by the run
(link.mode = "model") and recomputed from the run file."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfl.codecs.methods._falcom_eval import (lossy_slots, modelled_comm_time, modelled_round_times,
                                              slot_bytes, slot_ratios)
from hpcfl.results import load_run
from tests.conftest import needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]


def test_falcom_run(tmp_path, tiny_job):
    tiny_job["run"]["rounds"] = 3
    tiny_job["data"] = {"dataset": "digits", "n_clients": 4, "partition": "dirichlet", "alpha": 1.0}
    tiny_job["model"] = {"name": "resnet", "resnet_width": 16, "resnet_stages": 2}
    tiny_job["train"] = {"local_steps": 3, "batch_size": 32, "lr": 0.05, "client_fraction": 0.75}
    tiny_job["codec"] = {"id": "falcom", "eps": 1e-3, "verify": True}
    tiny_job["routing"] = {"lossy_patterns": ["*weight*"], "min_numel": 1025, "dense": {"id": "zstd", "level": 10}}
    tiny_job["log"] = {"codec_error": True}
    # as the FalCom jobs: modelled client links logged beside the measured times
    tiny_job["link"] = {"mode": "model", "uplink_mbps": 10.0, "downlink_mbps": 50.0, "latency_ms": 20.0,
                        "spread": 0.0}
    out = tmp_path / "run.h5"
    r = run_hpcfl(["run", str(write_job(tmp_path / "job.toml", tiny_job)), "--out", str(out)])
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    part = run.clients["participated"].astype(bool)
    convs = lossy_slots(run)
    assert len(convs) == 4 and lossy_slots(run, None) == convs
    err = run.codec_stat("max_err_over_eb")[:, :, convs]
    assert np.isfinite(err[part]).all() and (err[part] <= 1.0).all() and (err[part] > 0.5).all()
    assert np.isnan(err[~part]).all()
    # plain SZ3 on a client's first message of a slot, predictive (path 2) on every later one
    path = run.codec_stat("path")[:, :, convs]
    seen = np.cumsum(part, axis=0) > 1
    assert (path[part & ~seen] == 0).all() and (path[part & seen] == 2).all() and (part & seen).any()
    assert (run.rounds["root_state_bytes"][-1] > 0)
    assert (run.clients["recon_max_abs"][part] > 0).all()
    assert (run.clients["encode_s"][part] > 0).all() and (run.clients["decode_s"][part] > 0).all()
    assert (run.rounds["compression_ratio"] > 2).all()
    assert (slot_ratios(run, convs) > run.rounds["compression_ratio"]).all()  # dense zstd parts dilute it
    t10, t100 = modelled_comm_time(run, 10e6), modelled_comm_time(run, 100e6)
    assert t10 == pytest.approx(10 * t100) and t10 > 0
    worst = run.clients["message_bytes"].max(axis=1)
    assert modelled_comm_time(run, 8.0, latency_s=1.0) == pytest.approx(float(worst.sum()) + run.n_rounds)
    # the run file's own modelled link time (link.mode = "model"), beside the measured transfer
    up = run.clients["link_up_s"]
    assert np.allclose(up[part], 0.020 + run.clients["message_bytes"][part] * 8 / 10e6, rtol=1e-12)
    assert np.isnan(up[~part]).all()
    assert np.allclose(run.rounds["modelled_uplink_s"], modelled_round_times(
        run.clients["message_bytes"], part, 10e6, latency_s=0.020), rtol=1e-12)
    assert modelled_comm_time(run, 10e6, latency_s=0.020) == pytest.approx(run.rounds["modelled_uplink_s"].sum())
    assert np.isfinite(run.rounds["gather_s"]).all()
    # a compression ratio for every slot of every message in /codec_stats, zstd'd small tensors
    # included: the slots' payloads (4n / ratio) add up to each message's payload bytes
    ratio = run.codec_stat("ratio")
    assert np.isfinite(ratio[part]).all() and np.isnan(ratio[~part]).all()
    numel = np.array([int(np.prod(sh)) for _, sh, _ in run.codec["slots"]], dtype=np.float64)
    assert len(numel) == ratio.shape[2] > len(convs)
    pay = (4 * numel / ratio).sum(axis=2)
    assert np.allclose(pay[part], run.clients["payload_bytes"][part], rtol=1e-9)
    raw, payload = slot_bytes(run, range(len(numel)))
    assert np.allclose(raw / payload, run.rounds["raw_bytes"] / run.rounds["payload_bytes"], rtol=1e-9)
