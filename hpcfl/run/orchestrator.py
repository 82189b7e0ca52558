"""Run one job on the MPI world: the single place where all parts are wired together.

Every rank loads the job, builds the same data partition, model and codec
(``setup``), then rank 0 runs :func:`run_root` and the others
:func:`run_worker`. Rank 0 alone writes the HDF5 file.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np

from hpcfl.config import Job, canonical_json
from hpcfl.errors import ConfigError, WorldSizeError
from hpcfl.run import provenance
from hpcfl.run.progress import Progress

__all__ = ["run_job", "resolve_out_path", "calibration_wanted"]


def resolve_out_path(job: Job, out: str | None) -> Path:
    """Fill {name}, {time} and {job_id} in the output path template."""
    template = out or job.log.path
    env = os.environ
    job_id = env.get("SLURM_JOB_ID", "local")
    if env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env.get('SLURM_ARRAY_JOB_ID', job_id)}_{env['SLURM_ARRAY_TASK_ID']}"
    try:
        return Path(template.format(name=job.run.name, time=time.strftime("%Y%m%d-%H%M%S", time.gmtime()),
                                    job_id=job_id))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError("log.path", f"bad placeholder in {template!r} ({e}); use {{name}}, {{time}}, "
                          "{job_id}") from None


def calibration_wanted(mode: str, env=None) -> bool:
    """run.calibrate: on, off, or auto = on in a batch job (docs/jobs.md)."""
    from hpcfl.run.launch import in_batch_job

    return mode == "on" or (mode == "auto" and in_batch_job(env))


def _calibrate(job: Job, comm) -> dict | None:
    """Collective: rank 0 decides (so every rank agrees), then all ranks measure the network."""
    want = comm.bcast(calibration_wanted(job.run.calibrate) if comm.Get_rank() == 0 else None, 0)
    if not want:
        return None
    from hpcfl.bench.mpi import calibrate

    cal = calibrate(comm, job.run.calibrate_s)
    cal["mode"] = job.run.calibrate
    return cal


def release_free_heap() -> None:
    """Hand the heap that setup freed (data generation, model build, imports) back to the OS (glibc's
    malloc_trim; a no-op elsewhere). Left resident, that memory is reused silently, so a leak would
    not show in /ranks/rss_bytes until it had filled it: about 20 MiB per worker in the reduced soak
    (tests/mpi/test_soak.py, docs/reliability.md "Soak")."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_job(job: Job, out: Path, *, launcher: str, progress_mode: str, overwrite: bool = False,
            comm=None, resume_k: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    from mpi4py import MPI

    from hpcfl.comm.transport import Transport
    from hpcfl.run.launch import check_slurm_world

    tr = Transport(comm if comm is not None else MPI.COMM_WORLD, job.run.poll_interval, timeout=job.run.timeout)
    check_slurm_world(tr.size)
    if tr.size < 2:
        raise WorldSizeError("hpcfl needs at least 2 ranks (rank 0 aggregates, ranks 1.. host clients); "
                             f"the MPI world has {tr.size}. Use run.ranks >= 2 or mpiexec -n 2 or more")
    if job.data.n_clients < tr.n_workers:
        raise ConfigError("data.n_clients", f"{job.data.n_clients} clients for {tr.n_workers} worker ranks: "
                          "every worker rank needs at least one client")
    procs = tr.gather_strings(f"{os.getpid()} {socket.gethostname()}")  # /meta: pid and host per rank
    calibration = _calibrate(job, tr.comm)  # before any training, while the network is quiet

    from hpcfl.run.setup import build_setup

    s = build_setup(job)
    release_free_heap()
    if not tr.is_root:
        from hpcfl.run.worker import run_worker

        run_worker(s, tr, out, resume_k)
        return

    from hpcfl.fl.sampling import host_rank
    from hpcfl.results.writer import RunLog
    from hpcfl.run.root import run_root

    attrs = {
        "hpcfl_version": provenance.versions()["hpcfl"],
        "job_json": job.to_json(), "job_hash": job.hash,
        "codec_json": canonical_json(s.codec.config), "codec_hash": f"{s.codec.hash:016x}",
        "seed": job.run.seed, "n_clients": job.data.n_clients, "n_params": s.n_params,
        "param_table_json": canonical_json([[n, list(sh)] for n, sh in s.params]),
        "launcher": launcher, "slurm_json": provenance.as_json(provenance.slurm_vars()),
        "versions_json": provenance.as_json(provenance.versions()), "git_commit": provenance.git_commit(),
        "command": provenance.command_line(), "dataset": job.data.dataset,
        **provenance.mpi_facts(tr.comm),
    }
    pids = np.array([int(p.split(" ", 1)[0]) for p in procs], dtype=np.int64)
    hosts = np.array([p.split(" ", 1)[1].encode() for p in procs])
    meta = {
        "client_rank": np.array([host_rank(c, tr.n_workers) for c in range(job.data.n_clients)], dtype=np.int32),
        "client_train_samples": s.n_samples,
        "hostnames": hosts, "pids": pids,
        "slot_names": np.array([sl.name.encode() for sl in s.codec.slots]),
    }
    if resume_k is None:  # Acc_0 for per-bit accuracy: the initial global model on the test set
        import torch

        from hpcfl.fl.evaluate import evaluate

        loss0, acc0 = evaluate(s.model, torch.from_numpy(s.data.x_test), torch.from_numpy(s.data.y_test))
        attrs.update(initial_accuracy=acc0, initial_loss=loss0)
    progress = Progress(progress_mode, job.run.rounds, job.run.name)
    if resume_k is not None:
        log = RunLog.resume(out, resume_k, calibration=calibration, meta={"hostnames": hosts, "pids": pids})
        if log.f["ranks"].shape[1] != tr.size:  # the rank table's width is fixed at creation
            log.close("failed: resumed on a different world size")
            raise WorldSizeError(f"{out} was written by {log.f['ranks'].shape[1]} ranks; resume with the same "
                                 f"number (--set run.ranks=...) so its per-rank table stays aligned")
    else:
        log = RunLog(out, attrs=attrs, n_clients=job.data.n_clients, n_ranks=tr.size, meta=meta,
                     overwrite=overwrite or job.log.overwrite, update_dims=s.update_dims(),
                     calibration=calibration)
        from hpcfl.run import checkpoint

        checkpoint.clear(out)  # before round 0's token: no worker writes a checkpoint until after it
    with log:
        what = f"resuming after round {resume_k}: " if resume_k is not None else ""
        progress.start(f"{what}{job.run.rounds} rounds, {job.data.n_clients} clients on {tr.n_workers} worker "
                       f"ranks, {s.n_params} parameters, codec {s.codec.codec.codec_id} -> {out}")
        if calibration is not None:
            from hpcfl.results.report import format_calibration

            progress.start(format_calibration(calibration).strip())
        run_root(s, tr, log, progress, resume_k)
    progress.start(f"done: {out}")
