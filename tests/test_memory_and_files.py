"""Resource checks before a run starts, and run-file write failures that keep earlier rounds."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfl.config import job_from_dict
from hpcfl.config.memory import MemoryEstimate, check_memory
from hpcfl.config.validate import validate_job
from hpcfl.errors import ConfigError, ResultsWriteError
from hpcfl.results import load_run
from hpcfl.results.writer import RunLog


def _job(codec, clients=10, ranks=3):
    return job_from_dict({"run": {"ranks": ranks}, "data": {"n_clients": clients}, "model": {"name": "logreg"},
                          "codec": codec})


def test_estimate_measures_codec_state():
    v = validate_job(_job({"id": "identity"}))
    assert v.memory.client_state == 0 and v.memory.root_state == 0
    v = validate_job(_job({"id": "topk_ef", "ratio": 0.1}))
    assert v.memory.client_state == 4 * 650      # one float32 residual per parameter
    assert v.memory.root_state == 0              # error feedback lives on the client only
    a = validate_job(_job({"id": "topk_ef"}, clients=10)).memory
    b = validate_job(_job({"id": "topk_ef"}, clients=1000)).memory
    assert b.worker - a.worker == pytest.approx((500 - 5) * 4 * 650, rel=0.01)  # 2 workers share the clients


def test_refusal_names_the_estimate():
    est = MemoryEstimate(client_state=1 << 20, root_state=0, model=4, root=3 << 30, worker=1 << 30, ranks=3)
    with pytest.raises(ConfigError, match=r"run.memory_limit_gb.*root 3.00 GiB"):
        check_memory(est, limit_gb=2.0, available=0)
    with pytest.raises(ConfigError, match="only 4.00 GiB are available"):
        check_memory(est, limit_gb=0.0, available=4 << 30)
    check_memory(est, limit_gb=0.0, available=8 << 30)  # fits


def test_failed_write_keeps_earlier_rounds(tmp_path, monkeypatch):
    import h5py

    p = tmp_path / "run.h5"
    log = RunLog(p, attrs={"n_clients": 2}, n_clients=2, n_ranks=2)
    for r in range(3):
        log.append_round({"round": r, "accuracy": 0.5 + r / 10}, {}, {})

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "resize", full)
    with pytest.raises(ResultsWriteError, match=r"cannot write round 3 .*No space left.*rounds 0..2 are intact"):
        log.append_round({"round": 3}, {}, {})
    monkeypatch.undo()
    log.close("failed: disk full")
    run = load_run(p)
    assert run.n_rounds == 3 and np.allclose(run.rounds["accuracy"], [0.5, 0.6, 0.7])
    assert run.status == "failed: disk full"


def test_unwritable_output_is_refused_before_launch(tmp_path):
    import subprocess
    import sys

    from tests.conftest import write_job

    jp = write_job(tmp_path / "j.toml", {"run": {"ranks": 2, "rounds": 1}, "data": {"n_clients": 2},
                                         "model": {"name": "logreg"}})
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = ro / "x"
        try:  # root ignores directory permissions: nothing to test then
            probe.write_bytes(b"")
            probe.unlink()
            pytest.skip("running as a user who can write to a read-only directory (root)")
        except OSError:
            pass
        r = subprocess.run([sys.executable, "-m", "hpcfl", "run", str(jp), "--out", str(ro / "run.h5")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "cannot write the run file" in r.stderr
    finally:
        ro.chmod(0o700)


def test_unwritable_output_message(tmp_path, monkeypatch):
    """The same check, independent of the user: a path under a regular file cannot be created."""
    from hpcfl.cli.run_cmd import _check_writable
    from hpcfl.errors import UsageError

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot write the run file"):
        _check_writable(tmp_path / "file" / "run.h5")
