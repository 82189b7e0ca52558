"""MWQ in a real run: exact payload bytes per client, fit statistics logged, messages decodable
offline (the root re-derives every codebook from the sent fit), per-bit accuracy from the file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpcfl.codecs.bitpack import packed_size
from hpcfl.results import load_run
from hpcfl.results.perbit import per_bit_accuracy
from tests.conftest import needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]


def test_mwq_ef_in_a_run(tmp_path, tiny_job):
    R = 3
    tiny_job["codec"] = {"id": "mwq_ef", "bits": R, "m": 2.0}
    tiny_job["model"] = {"name": "mlp", "hidden": [32]}
    tiny_job["log"] = {"codec_error": True, "save_messages": "first"}
    jp = write_job(tmp_path / "job.toml", tiny_job)
    out = tmp_path / "run.h5"
    r = run_hpcfl(["run", str(jp), "--out", str(out)])
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    assert run.complete and run.codec["codec"] == {
        "id": "ef", "beta": 1.0, "gamma": 1.0,
        "inner": {"id": "mwq", "bits": R, "m": 2.0, "side": "fit", "entropy": False, "min_numel": 256,
                  "sample": 20000, "iters": 100, "weight_center": "mean"}}
    part = run.clients["participated"].astype(bool)
    # fc1.weight (32 x 64) and fc2.weight (10 x 32) quantised: 16 B fit + R bits each; the biases
    # (32 and 10 entries, under min_numel) dense
    want = 16 + packed_size(2048, R) + 16 + packed_size(320, R) + 4 * (32 + 10)
    assert (run.clients["payload_bytes"][part] == want).all()
    err = run.clients["recon_rel_l2"][part]
    assert np.isfinite(err).all() and (err > 0).all() and (err < 1.0).all()
    beta = run.codec_stat("beta")
    slots = run.slot_names
    lossy = [slots.index("fc1.weight"), slots.index("fc2.weight")]
    got = beta[:, :, lossy][part]
    assert np.isfinite(got).all() and ((got >= 0.2) & (got <= 5.0)).all()
    assert np.isnan(beta[:, :, slots.index("fc1.bias")]).all()  # dense: no fit
    saved = sorted((tmp_path / "run.h5.messages").glob("round00000-client*.hpfl"))
    assert len(saved) == part[0].sum()
    dec = run_hpcfl(["codec", "decode", "--run", str(out), str(saved[0]), str(tmp_path / "d.npz"), "--json"])
    assert dec.returncode == 0, dec.stderr
    with np.load(tmp_path / "d.npz") as z:
        w = z["fc1.weight"]
        assert w.shape == (32, 64) and np.unique(w).size <= 1 << R
    p = per_bit_accuracy(run)
    assert math.isfinite(p["total"]) and p["bits_total"] == 8 * run.rounds["uplink_bytes"].sum()
    assert per_bit_accuracy(run, bits="payload")["bits_per_entry"] == pytest.approx(32 * want / (4 * 2410))
