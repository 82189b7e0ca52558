"""How this process was started, and starting the MPI job ourselves when it was not.

Three ways to launch, one behaviour:

* ``hpcfl run JOB`` outside MPI: run ``<venv>/bin/mpiexec -n <run.ranks> python -m
  mpi4py -m hpcfl run JOB --no-launch ...`` (``-m mpi4py`` turns an exception on any
  rank into MPI_Abort, so no rank hangs);
* under ``mpiexec``/``mpirun`` (PMI/PMIx variables present): run in-process;
* under ``srun``: run in-process, and refuse a *silent singleton*: SLURM says the step
  has N > 1 tasks but MPI says the world has one rank (an MPI without the PMI that
  srun provides, open-mpi/ompi#13523).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from hpcfl.errors import UsageError, WorldSizeError

__all__ = ["detect_launcher", "mpiexec_path", "check_slurm_world", "SINGLETON_HELP", "in_batch_job", "BATCH_VARS"]

# Variables a launcher sets in its ranks' environment. Not user-set tuning variables
# (I_MPI_*, MPICH_*, ...): cluster modules export those in ordinary login shells.
_MPI_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "PMIX_NAMESPACE", "OMPI_COMM_WORLD_SIZE",
             "HYDI_CONTROL_FD", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


# Job ids a batch system puts in the environment of every process of a job (Slurm, PBS/Torque, LSF, Flux).
BATCH_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID")


def in_batch_job(env=None) -> bool:
    """True inside a batch-system job (also an interactive allocation: salloc, qsub -I)."""
    env = os.environ if env is None else env
    return any(env.get(v) for v in BATCH_VARS)


def _in_srun_step(env) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    # The batch script itself runs as step "batch" (or 4294967294); srun steps are numbered.
    return step is not None and step.isdigit() and int(step) < 0xFFFFFFF0 and "SLURM_PROCID" in env


def detect_launcher(env=None) -> str | None:
    """"mpiexec", "srun", or None (not under any MPI launcher: hpcfl must launch)."""
    env = os.environ if env is None else env
    if _in_srun_step(env):
        # mpiexec inside an allocation starts its proxies with srun (one task per node):
        # the MPI world is then larger than the step's task count.
        size = env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE")
        ntasks = env.get("SLURM_STEP_NUM_TASKS")
        if size and ntasks and size != ntasks:
            return "mpiexec"
        return "srun"
    if any(v in env for v in _MPI_VARS):
        return "mpiexec"
    return None


def mpiexec_path() -> Path:
    """The mpiexec beside the running interpreter (pip's mpich wheel puts it there)."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return here
    raise UsageError(f"no mpiexec beside {sys.executable}: install the MPI wheel "
                     "(pip install 'hpcfl[mpich]') or start the job under your MPI launcher "
                     "(mpiexec -n N hpcfl run JOB, or srun)")


SINGLETON_HELP = (
    "Slurm started {ntasks} tasks but MPI reports a world of size 1 in each: every task is a "
    "separate singleton (the MPI library did not get Slurm's process-management interface). "
    "Fix: with MPICH (e.g. pip's mpich wheel) use 'srun --mpi=pmi2'; with Open MPI use "
    "'srun --mpi=pmix' (Slurm built with PMIx); 'srun --mpi=list' shows what this cluster "
    "offers; or run 'mpiexec -n {ntasks} ...' inside the allocation instead of srun. Also check "
    "that mpi4py loads the MPI you launch with (MPI4PY_LIBMPI)."
)


def check_slurm_world(world_size: int, env=None) -> None:
    env = os.environ if env is None else env
    if not _in_srun_step(env):
        return
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    try:
        n = int(ntasks)
    except ValueError:
        return
    if n > 1 and world_size == 1:
        raise WorldSizeError(SINGLETON_HELP.format(ntasks=n))


def which_or_none(name: str) -> str | None:
    return shutil.which(name)
