"""hpcfl.run.launch (launcher detection, the singleton checks) and hpcfl.comm.frames."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hpcfl.comm.frames import pack_frames, unpack_frames
from hpcfl.errors import UsageError, WorldSizeError
from hpcfl.run.launch import check_launcher_world, check_slurm_world, detect_launcher, launcher_rank
from tests.conftest import hpcfl_env, run_hpcfl, write_job

LAUNCH_PREFIXES = ("PMI", "OMPI_", "SLURM_", "HYDI", "MPI_", "MV2_", "I_MPI", "HYDRA_")

SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"HOME": "/root", "PATH": "/bin"}, None),
    ({"PMI_RANK": "0"}, "mpiexec"),
    ({"PMI_SIZE": "2", "PMI_FD": "5"}, "mpiexec"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpiexec"),
    ({"PMIX_RANK": "1"}, "mpiexec"),
    ({"HYDI_CONTROL_FD": "7"}, "mpiexec"),
    (SRUN, "srun"),
    ({**SRUN, "PMI_RANK": "3"}, "srun"),            # srun --mpi=pmi2 sets PMI vars as well
    ({"SLURM_STEPID": "2", "SLURM_PROCID": "0"}, "srun"),  # older spelling
    ({"SLURM_STEP_ID": "0"}, None),                # no SLURM_PROCID: not a task of a step
    ({**SRUN, "SLURM_STEP_ID": "batch"}, None),    # the batch script itself
    ({**SRUN, "SLURM_STEP_ID": "extern"}, None),
    ({**SRUN, "SLURM_STEP_ID": "4294967294"}, None),  # SLURM_BATCH_SCRIPT as a number
    ({**SRUN, "SLURM_STEP_ID": "4294967295"}, None),
    ({**SRUN, "SLURM_STEP_ID": "batch", "PMI_RANK": "0"}, "mpiexec"),  # mpiexec inside a batch script
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"}, None),  # inside an allocation, not in a step
    ({**SRUN, "SLURM_STEP_ID": "4294967290"}, None),   # SLURM_INTERACTIVE_STEP (salloc's shell)
    # tuning variables that environment modules export in login shells are not a launcher
    ({"I_MPI_HYDRA_TOPOLIB": "ipl", "I_MPI_FABRICS": "shm:ofi", "MPICH_GPU_SUPPORT_ENABLED": "0"}, None),
])
def test_detect_launcher(env, want):
    assert detect_launcher(dict(env)) == want


def test_detect_launcher_reads_os_environ(monkeypatch):
    for k in list(os.environ):
        if k.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(k)
    assert detect_launcher() is None
    monkeypatch.setenv("PMI_RANK", "0")
    assert detect_launcher() == "mpiexec"


@pytest.mark.parametrize("key", ["SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"])
def test_slurm_singleton_is_refused(key):
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", key: "4"}
    with pytest.raises(WorldSizeError) as ei:
        check_slurm_world(1, env)
    msg = str(ei.value)
    assert "--mpi=pmi2" in msg and "--mpi=pmix" in msg and "4 tasks" in msg
    assert isinstance(ei.value, UsageError)


@pytest.mark.parametrize("world, env", [
    (4, {**SRUN}),                                               # a working srun step
    (1, {**SRUN, "SLURM_NTASKS": "1"}),                          # a single task is fine
    (1, {**SRUN, "SLURM_STEP_ID": "batch"}),                     # not in a step
    (1, {**SRUN, "SLURM_STEP_ID": "4294967294"}),
    (1, {"SLURM_NTASKS": "4"}),                                  # no step at all
    (1, {}),
    (1, {**SRUN, "SLURM_NTASKS": "4(x2)"}),                      # unparsable: do not guess
    (1, {**SRUN, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}),  # the step's own count wins
])
def test_slurm_world_ok(world, env):
    check_slurm_world(world, env)


def test_slurm_step_count_wins_over_job_count():
    with pytest.raises(WorldSizeError):
        check_slurm_world(1, {**SRUN, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "2"})


# ------------------------------------------------------------------ launcher/MPI mismatch outside Slurm

# What the launchers really set: Hydra (pip's mpich wheel: `mpiexec -n 2 env`) sets PMI_RANK, PMI_SIZE,
# PMI_FD, PMI_HOSTNAME, MPI_LOCALNRANKS, MPI_LOCALRANKID, HYDI_CONTROL_FD; Open MPI's mpiexec sets
# OMPI_COMM_WORLD_SIZE/RANK (and PMIX_RANK, PMIX_NAMESPACE); MVAPICH's mpirun_rsh MV2_COMM_WORLD_SIZE/RANK.
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "9", "PMI_HOSTNAME": "vm", "MPI_LOCALNRANKS": "2",
         "MPI_LOCALRANKID": "1", "HYDI_CONTROL_FD": "7"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "PMIX_RANK": "2", "PMIX_NAMESPACE": "prterun-vm-1234@1"}


@pytest.mark.parametrize("env, var, n", [
    (OMPI, "OMPI_COMM_WORLD_SIZE", 4),                        # Open MPI's mpiexec started the MPICH build
    (HYDRA, "PMI_SIZE", 2),                                   # Hydra started an Open MPI build
    ({"MPI_LOCALNRANKS": "3"}, "MPI_LOCALNRANKS", 3),
    ({"MV2_COMM_WORLD_SIZE": "8", "MV2_COMM_WORLD_RANK": "0"}, "MV2_COMM_WORLD_SIZE", 8),
    ({"PMI_SIZE": "1", "OMPI_COMM_WORLD_SIZE": "5"}, "OMPI_COMM_WORLD_SIZE", 5),  # the one that says > 1
])
def test_launcher_mismatch_is_refused(env, var, n):
    for check in (check_launcher_world, check_slurm_world):  # run_job and hpcfl bench call the latter
        with pytest.raises(WorldSizeError) as ei:
            check(1, dict(env))
        msg = str(ei.value)
        assert isinstance(ei.value, UsageError)
        assert f"{var}={n}" in msg and f"started {n} processes" in msg and "world of size 1" in msg
        assert "mpiexec of the MPI that mpi4py uses" in msg and "--mpi-library" in msg
        assert "run.ranks >= 2" not in msg


@pytest.mark.parametrize("world, env", [
    (2, HYDRA),                                    # a working mpiexec
    (4, OMPI),
    (1, {}),                                       # hpcfl run --no-launch by hand: the ">= 2 ranks" error
    (1, {"PMI_SIZE": "1", "PMI_RANK": "0", "MPI_LOCALNRANKS": "1"}),  # mpiexec -n 1
    (1, {"OMPI_COMM_WORLD_SIZE": "1"}),
    (1, {"PMI_SIZE": "", "OMPI_COMM_WORLD_SIZE": "x"}),  # unparsable: do not guess
    (1, {"PMIX_RANK": "0", "PMIX_NAMESPACE": "ns"}),     # PMIx exports no size: nothing to compare
    (1, {"I_MPI_FABRICS": "shm", "MPICH_GPU_SUPPORT_ENABLED": "0"}),  # tuning variables are no launcher
])
def test_launcher_world_ok(world, env):
    check_launcher_world(world, dict(env))
    check_slurm_world(world, dict(env))


def test_slurm_singleton_message_wins_in_a_step():
    """In an srun step the Slurm message (srun --mpi=...) comes first, even if PMI_SIZE is set too."""
    with pytest.raises(WorldSizeError, match="Slurm started 4 tasks"):
        check_slurm_world(1, {**SRUN, "PMI_SIZE": "4"})


@pytest.mark.parametrize("env, want", [
    ({}, 0),
    (HYDRA, 1),
    (OMPI, 2),
    ({"PMIX_RANK": "3"}, 3),
    ({"MV2_COMM_WORLD_RANK": "5"}, 5),
    (SRUN, 3),                                     # Slurm's task id in a step
    ({**SRUN, "PMI_RANK": "3"}, 3),
    ({**SRUN, "SLURM_STEP_ID": "batch", "PMI_RANK": "1"}, 1),  # not a step: SLURM_PROCID is not ours
    ({"PMI_RANK": "x", "OMPI_COMM_WORLD_RANK": "6"}, 6),
])
def test_launcher_rank(env, want):
    assert launcher_rank(dict(env)) == want


# ------------------------------------------------------------------ end to end: hpcfl run as a singleton

def _singleton_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in hpcfl_env().items() if not k.startswith(LAUNCH_PREFIXES)}
    env.update(extra)
    return env


# what srun -n 4 without --mpi=pmi2 gives each task (launch.py reads SLURM_STEP_ID, SLURM_PROCID,
# SLURM_STEP_NUM_TASKS, else SLURM_NTASKS)
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}


def _run_singleton(tmp_path, tiny_job, env):
    jp = write_job(tmp_path / "tiny.toml", tiny_job)
    r = run_hpcfl(["run", str(jp), "--out", str(tmp_path / "out.h5"), "--progress", "plain"], env=env,
                  timeout=120, cwd=tmp_path)
    return r, sorted(p.name for p in tmp_path.rglob("*.h5"))


@pytest.mark.parametrize("procid", ["0", "2"])
def test_slurm_silent_singleton_end_to_end(tmp_path, tiny_job, procid):
    """srun without the PMI the MPI needs: each task is a world of one. Every task leaves with code 2
    before writing anything; only Slurm task 0 prints the one-line fix (the others are silent, so
    the job log holds one copy, not N)."""
    r, h5 = _run_singleton(tmp_path, tiny_job, _singleton_env(**SLURM_STEP, SLURM_PROCID=procid))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and h5 == []
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if procid == "0":
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("hpcfl run: error: ") and "Slurm started 4 tasks" in lines[0]
        assert "--mpi=pmi2" in lines[0] and "--mpi=pmix" in lines[0]
    else:
        assert lines == [], r.stderr
    assert r.stdout.strip() == ""


def test_launcher_mismatch_end_to_end(tmp_path, tiny_job):
    """Open MPI's mpiexec starting the MPICH build (its variables, MPICH's singleton init): the process
    names the variable and the fix instead of "Use run.ranks >= 2"."""
    r, h5 = _run_singleton(tmp_path, tiny_job, _singleton_env(OMPI_COMM_WORLD_SIZE="3", OMPI_COMM_WORLD_RANK="0"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and h5 == []
    # mpi4py (>= 4) warns about the mismatch too, in every process, without saying what to do
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("hpcfl run:")]
    assert len(ours) == 1 and r.stderr.rstrip().endswith(ours[0]), r.stderr
    assert "OMPI_COMM_WORLD_SIZE=3" in ours[0] and "run.ranks >= 2" not in r.stderr


# ------------------------------------------------------------------ frames

def msgs(*sizes: int) -> list[bytes]:
    return [bytes((i * 7 + j) % 256 for j in range(n)) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [(), (8,), (0,), (16, 0, 40), (8,) * 10, (1024, 8)])
def test_frames_round_trip(sizes):
    m = msgs(*sizes)
    chunk = pack_frames(m)
    assert chunk.dtype == np.uint8 and chunk.ndim == 1
    assert chunk.size == 8 * (1 + len(m)) + sum(sizes) and chunk.size % 8 == 0
    assert chunk[:8].view(np.int64)[0] == len(m)
    assert chunk[8:8 * (len(m) + 1)].view(np.int64).tolist() == list(sizes)
    out = unpack_frames(chunk)
    assert [o.tobytes() for o in out] == m
    for o in out:
        assert o.dtype == np.uint8 and (o.size == 0 or np.shares_memory(o, chunk))
    # several workers' chunks concatenated: each one still splits
    two = np.concatenate([chunk, pack_frames(msgs(24))])
    assert [o.tobytes() for o in unpack_frames(two[:chunk.size])] == m


def test_pack_frames_rejects_unaligned():
    with pytest.raises(ValueError):
        pack_frames([b"12345678", b"123"])


def _chunk(n: int, lens: list[int], payload: int) -> np.ndarray:
    head = np.array([n] + lens, dtype=np.int64).view(np.uint8)
    return np.concatenate([head, np.zeros(payload, dtype=np.uint8)])


@pytest.mark.parametrize("chunk", [
    np.zeros(0, dtype=np.uint8),
    np.zeros(7, dtype=np.uint8),
    _chunk(-1, [], 0),
    _chunk(3, [8], 8),                              # count larger than the length table
    _chunk(2**62, [], 0),
    _chunk(1, [16], 8),                             # payload shorter than declared
    _chunk(1, [8], 16),                             # payload longer than declared
    _chunk(2, [-8, 16], 8),                         # negative length
    _chunk(5, [2**63 - 1] * 4 + [8 + 4], 8),        # lengths whose int64 sum wraps around to the size
    _chunk(2, [2**62, 2**62], 0),
])
def test_unpack_frames_rejects_bad_framing(chunk):
    with pytest.raises(ValueError):
        unpack_frames(chunk)


def test_pack_frames_into_reused_buffer():
    """A buffer that fits is filled and a view of it returned (same bytes as a fresh pack); one that
    does not fit is left alone and a fresh array returned."""
    msgs = [bytes(range(8)) * 3, b"\x07" * 16]
    fresh = pack_frames(msgs)
    buf = np.full(fresh.size + 40, 0xAB, dtype=np.uint8)
    got = pack_frames(msgs, buf)
    assert got.base is buf and np.array_equal(got, fresh) and (buf[fresh.size:] == 0xAB).all()
    small = np.zeros(fresh.size - 8, dtype=np.uint8)
    got = pack_frames(msgs, small)
    assert got.base is not small and np.array_equal(got, fresh) and not small.any()
