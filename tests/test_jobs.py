"""Every job file shipped in jobs/ is valid (data files on disk are not required here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcfl.config import load_job
from hpcfl.config.validate import validate_job

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))


def test_there_are_jobs():
    assert any(p.name == "quickstart.toml" for p in JOBS)


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_validates(path):
    job = load_job(path)
    v = validate_job(job, check_files=False)
    assert v.n_params > 0
    assert job.run.name == path.stem or path.stem == "quickstart"
