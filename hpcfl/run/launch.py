"""How this process was started, and starting the MPI job ourselves when it was not.

Three ways to launch, one behaviour:

* ``hpcfl run JOB`` outside MPI: run ``<venv>/bin/mpiexec -n <run.ranks> python -m
  mpi4py -m hpcfl run JOB --no-launch ...`` (``-m mpi4py`` turns an exception on any
  rank into MPI_Abort, so no rank hangs);
* under ``mpiexec``/``mpirun`` (PMI/PMIx variables present): run in-process;
* under ``srun``: run in-process, and refuse a *silent singleton*: SLURM says the step
  has N > 1 tasks but MPI says the world has one rank (an MPI without the PMI that
  srun provides, open-mpi/ompi#13523).

The same singleton check covers any mpiexec (:func:`check_launcher_world`): when one MPI's
launcher starts another MPI's build (Open MPI's mpiexec and pip's MPICH wheel, or the
reverse), the launcher's own variables (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ...) say N > 1
while every process is a world of one. Each of those N processes is then MPI rank 0, so only
the one the launcher numbers 0 (:func:`launcher_rank`) prints the error; every one of them
exits with code 2.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from hpcfl.errors import UsageError, WorldSizeError

__all__ = ["detect_launcher", "mpiexec_path", "check_slurm_world", "check_launcher_world", "launcher_rank",
           "SINGLETON_HELP", "LAUNCHER_SINGLETON_HELP", "in_batch_job", "BATCH_VARS"]

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
    """Refuse a silent singleton (world of 1 where the launcher started N > 1 processes).

    First Slurm's view (an srun step of N tasks), then any mpiexec's (:func:`check_launcher_world`).
    ``run_job`` and ``hpcfl bench`` call this before anything else collective.
    """
    env = os.environ if env is None else env
    if _in_srun_step(env):
        ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        try:
            n = int(ntasks)
        except ValueError:
            n = 1  # unparsable: do not guess
        if n > 1 and world_size == 1:
            raise WorldSizeError(SINGLETON_HELP.format(ntasks=n))
    check_launcher_world(world_size, env)


# World-size variables launchers put in each process's environment, and whose launcher sets them.
# (PMIx itself exports no size variable: PMIX_RANK/PMIX_NAMESPACE only; Open MPI's mpiexec adds
# OMPI_COMM_WORLD_SIZE.) MPI_LOCALNRANKS, Hydra's count of ranks on this node, is a lower bound
# of the world size, so > 1 there also means the world cannot be 1.
_SIZE_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpiexec/mpirun"),
    ("PMI_SIZE", "an MPICH-family mpiexec (Hydra: MPICH, Intel MPI) or a PMI launcher"),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH's mpirun_rsh"),
    ("MPI_LOCALNRANKS", "an MPICH-family mpiexec (Hydra)"),
)
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")

LAUNCHER_SINGLETON_HELP = (
    "the launcher started {n} processes ({var}={n}, set by {who}) but MPI reports a world of size 1 "
    "in each: every process is a separate singleton, because the MPI library mpi4py loaded is not "
    "the one whose launcher started it (e.g. Open MPI's mpiexec starting pip's MPICH build, or the "
    "reverse). Fix: start the job with the mpiexec of the MPI that mpi4py uses ('python -m mpi4py "
    "--mpi-library' shows it; for pip's mpich wheel that is the mpiexec beside this python, "
    "{here}, or plain 'hpcfl run JOB', which starts it itself), or make mpi4py load the launcher's "
    "MPI (MPI4PY_LIBMPI, or pip install -e . without the [mpich] extra on a cluster). run.ranks "
    "is not the problem."
)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def check_launcher_world(world_size: int, env=None) -> None:
    """Refuse a launcher/MPI mismatch: a launcher's size variable says N > 1, MPI says 1."""
    env = os.environ if env is None else env
    if world_size != 1:
        return
    for var, who in _SIZE_VARS:
        n = _int(env.get(var))
        if n is not None and n > 1:
            here = Path(sys.executable).parent / "mpiexec"
            raise WorldSizeError(LAUNCHER_SINGLETON_HELP.format(n=n, var=var, who=who, here=here))


def launcher_rank(env=None) -> int:
    """This process's number as the launcher sees it (Slurm task id in an srun step, else the first of
    PMI_RANK, OMPI_COMM_WORLD_RANK, PMIX_RANK, MV2_COMM_WORLD_RANK), or 0. It differs from the MPI rank
    only in a silent singleton, where every process is MPI rank 0."""
    env = os.environ if env is None else env
    names = (("SLURM_PROCID",) if _in_srun_step(env) else ()) + _RANK_VARS
    for var in names:
        r = _int(env.get(var))
        if r is not None:
            return r
    return 0


def which_or_none(name: str) -> str | None:
    return shutil.which(name)
