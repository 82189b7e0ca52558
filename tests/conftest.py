"""Shared fixtures. MPI tests launch real jobs through subprocesses (platform.md §7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:  # pragma: no cover - depends on the environment
    import tomli_w  # noqa: F401
except ImportError:
    tomli_w = None

MPIEXEC = Path(sys.executable).with_name("mpiexec")


def write_job(path: Path, job: dict) -> Path:
    """Write a job dict as TOML (tiny writer: tables of scalars, lists and inline tables)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines = []
    for section, table in job.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def hpcfl_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPIEXEC_TIMEOUT="240", PYTHONUNBUFFERED="1")
    env.pop("HPCFL_FAULT", None)
    env.update(extra)
    return env


def run_hpcfl(args: list[str], *, timeout: float = 300, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m hpcfl ARGS`` in a subprocess (self-launches mpiexec for ``run``)."""
    return subprocess.run([sys.executable, "-m", "hpcfl", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or hpcfl_env(), cwd=cwd)


@pytest.fixture
def tiny_job() -> dict:
    """A job that runs in a few seconds: logistic regression on digits."""
    return {
        "run": {"name": "tiny", "ranks": 3, "rounds": 3, "seed": 7},
        "data": {"dataset": "digits", "n_clients": 6, "partition": "iid"},
        "model": {"name": "logreg"},
        "train": {"local_steps": 3, "batch_size": 16, "lr": 0.1, "client_fraction": 0.5},
        "codec": {"id": "identity"},
    }


needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
