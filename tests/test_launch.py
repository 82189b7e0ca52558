"""hpcfl.run.launch (launcher detection, the Slurm singleton check) and hpcfl.comm.frames."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfl.comm.frames import pack_frames, unpack_frames
from hpcfl.errors import UsageError, WorldSizeError
from hpcfl.run.launch import check_slurm_world, detect_launcher

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
    import os

    for k in list(os.environ):
        if k.startswith(("PMI", "OMPI_", "SLURM_", "HYDI", "MPI_", "MV2_", "I_MPI")):
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
