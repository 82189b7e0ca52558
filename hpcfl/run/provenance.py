"""Facts about the environment a run executed in, for the HDF5 root attributes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["versions", "git_commit", "slurm_vars", "mpi_facts"]

_SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
               "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_CPUS_PER_TASK",
               "SLURM_JOB_PARTITION", "SLURM_CLUSTER_NAME", "SLURM_STEP_ID")


def versions() -> dict[str, str]:
    import h5py
    import mpi4py
    import numpy
    import torch

    import hpcfl

    return {"python": platform.python_version(), "hpcfl": hpcfl.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "mpi4py": mpi4py.__version__, "platform": platform.platform()}


def git_commit() -> str:
    """Commit of the source tree hpcfl was imported from ('' if not a git checkout)."""
    src = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    if out.returncode != 0:
        return ""
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5)
    return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def slurm_vars(env=None) -> dict[str, str]:
    env = os.environ if env is None else env
    return {k: env[k] for k in _SLURM_KEYS if k in env}


def mpi_facts(comm) -> dict[str, object]:
    from mpi4py import MPI

    major, minor = MPI.Get_version()
    return {"mpi_library": MPI.Get_library_version().strip(), "mpi_standard": f"{major}.{minor}",
            "world_size": comm.Get_size()}


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)


def as_json(d) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))
