"""``hpcfl run`` and ``hpcfl validate``."""

from __future__ import annotations

import argparse
import os
import subprocess  # noqa: F401 - tests trap run_cmd.subprocess; mpiexec starts in hpcfl.run.failure_report
import sys
import tempfile
import traceback
from pathlib import Path

from hpcfl.cli import register
from hpcfl.errors import HpcflError, UsageError

RUN_FLAGS = ("set", "out", "overwrite", "progress")
FAIL_NOTE_ENV = "HPCFL_FAIL_NOTE"  # file where a failing rank leaves its reason for the self-launcher


def _job_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("job", nargs="?" if optional else None, help="job file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job key (repeatable); VALUE is TOML, e.g. --set train.lr=0.1")


@register("validate", "check a job file (schema, codecs, data files, model) without starting MPI")
def add_validate(p: argparse.ArgumentParser) -> None:
    _job_args(p)
    p.add_argument("--json", action="store_true", help="print the validated job as canonical JSON")


@register("run", "run a job: launches mpiexec itself unless already under mpiexec or srun")
def add_run(p: argparse.ArgumentParser) -> None:
    _job_args(p, optional=True)
    p.add_argument("--resume", metavar="RUN.h5", help="continue a run from its last checkpoint (same file; "
                   "--set may only change run.rounds, run.ranks and log.progress)")
    p.add_argument("--out", help="HDF5 output path (overrides log.path; {name} {time} {job_id} allowed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--progress", choices=("auto", "tty", "plain", "off"), help="override log.progress")
    p.add_argument("--no-launch", action="store_true",
                   help="never start mpiexec; run in this process's MPI world")
    p.add_argument("--launcher", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.command == "validate":
        return _validate(args)
    return _run(args)


RESUME_KEYS = ("run.rounds", "run.ranks", "log.progress")


def _load(args):
    from hpcfl.config import load_job
    from hpcfl.config.validate import validate_job

    if getattr(args, "resume", None):
        job = _resume_job(args)
    else:
        if not args.job:
            raise UsageError("give a job file, or --resume RUN.h5")
        job = load_job(args.job, args.set)
    return job, validate_job(job)


def _resume_job(args):
    """The job a run file was made with, plus the few overrides a resume allows."""
    import json

    from hpcfl.config import job_from_dict
    from hpcfl.config.load import apply_overrides, parse_override
    from hpcfl.results import load_run

    if args.job:
        raise UsageError("--resume takes the job from the run file; do not give a job file too")
    for text in args.set:
        key, _ = parse_override(text)
        if key not in RESUME_KEYS:
            raise UsageError(f"--set {key}: a resumed run can only change {', '.join(RESUME_KEYS)}")
    run = load_run(args.resume)
    raw = json.loads(run.attrs["job_json"])
    raw["run"]["ranks"] = int(run.attrs.get("world_size", raw["run"]["ranks"]))
    job = job_from_dict(apply_overrides(raw, args.set), args.resume)
    _check_checkpoint_job(Path(args.resume), job, str(run.attrs.get("hpcfl_version", "?")))
    return job


def _check_checkpoint_job(out: Path, job, file_version: str) -> None:
    """Refuse, before any rank starts, a checkpoint whose job differs from the run file's job as this
    hpcfl reads it (a job key added or changed since the file was written changes the job)."""
    from hpcfl.run import checkpoint
    from hpcfl.run.provenance import versions

    k = checkpoint.latest(out)
    written = checkpoint.root_job_hash(out, k)
    if written != job.hash_without_rounds:
        raise UsageError(f"{out}: checkpoint after round {k} belongs to job {written}, but the run file's job "
                         f"reads as {job.hash_without_rounds} under hpcfl {versions()['hpcfl']} (the file was "
                         f"written by hpcfl {file_version}); resume with the hpcfl version that wrote it")


def _validate(args) -> int:
    job, v = _load(args)
    if args.json:
        print(job.to_json())
        return 0
    lossy = sum(1 for s in v.slots if s.route == "lossy")
    print(f"{args.job}: ok — {job.run.rounds} rounds, {job.data.n_clients} clients, {job.run.ranks} ranks, "
          f"model {job.model.name} ({v.n_params} parameters), codec {job.codec['id']} on {lossy} of "
          f"{len(v.slots)} tensors, job hash {job.hash}")
    if v.memory is not None:
        print(f"  estimated memory: {v.memory.describe()}")
    return 0


def _run(args) -> int:
    from hpcfl.run.launch import detect_launcher

    launcher = args.launcher or detect_launcher()
    if launcher is None and not args.no_launch:
        return _self_launch(args)
    return _run_in_mpi(args, launcher or "mpiexec")


def _self_launch(args) -> int:
    """Validate here, then start ``mpiexec -n ranks`` with abort-on-exception."""
    from hpcfl.run.launch import mpiexec_path
    from hpcfl.run.orchestrator import resolve_out_path
    from hpcfl.run.progress import resolve_mode

    job, _ = _load(args)
    progress = resolve_mode(args.progress or job.log.progress)
    if args.resume:
        from hpcfl.run.checkpoint import latest

        out = Path(args.resume)
        k = latest(out)  # fails here, before any rank starts, if nothing can be resumed
        if k >= job.run.rounds:
            raise UsageError(f"{out}: all {job.run.rounds} rounds are done; --set run.rounds=N to extend it")
        cmd = [str(mpiexec_path()), "-n", str(job.run.ranks), sys.executable, "-m", "mpi4py", "-m", "hpcfl",
               "run", "--resume", str(out), "--progress", progress, "--launcher", "self"]
        overwrite = False
    else:
        out = resolve_out_path(job, args.out)
        overwrite = args.overwrite or job.log.overwrite
        if out.exists() and not overwrite:
            raise UsageError(f"{out} exists; pass --overwrite or choose another --out")
        _check_writable(out)
        cmd = [str(mpiexec_path()), "-n", str(job.run.ranks), sys.executable, "-m", "mpi4py", "-m", "hpcfl",
               "run", args.job, "--out", str(out), "--progress", progress, "--launcher", "self"]
    for s in args.set:
        cmd += ["--set", s]
    if overwrite:
        cmd.append("--overwrite")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # see hpcfl.cli._environment
    fd, note = tempfile.mkstemp(prefix="hpcfl-fail-", suffix=".txt")
    os.close(fd)
    env[FAIL_NOTE_ENV] = note
    from hpcfl.run.failure_report import launch

    reason = None
    try:
        seen = launch(cmd, env, job.run.ranks)  # subprocess.call, watching which rank dies first
        rc = seen.rc
        if rc != 0:
            reason = _mark_failed(out, rc, Path(note), seen)
    finally:
        Path(note).unlink(missing_ok=True)
    if rc != 0:
        # the failing rank's own lines can be lost while MPI_Abort tears the job down: repeat the
        # reason recorded in the file, so this last line always says what happened
        status, done = _file_status(out)
        print(f"hpcfl run: {status or (f'failed: {reason}' if reason else f'the MPI job exited with code {rc}')}"
              + (f"; {done} completed rounds are in {out}" if done is not None else ""), file=sys.stderr)
    return rc


def _file_status(out: Path) -> tuple[str | None, int | None]:
    """(status, rounds done) of a run file, or (None, None) if there is none or it is unreadable."""
    if not out.exists():
        return None, None
    try:
        import h5py

        with h5py.File(out, "r") as f:
            return str(f.attrs.get("status", "")) or None, int(f.attrs.get("rounds_done", 0))
    except (OSError, KeyError, ValueError):
        return None, None


def _check_writable(out: Path) -> None:
    """Fail before launching if the output directory cannot be created or written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".hpcfl-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write the run file {out}: {e.strerror} ({out.parent})") from None


def _mark_failed(out, rc: int, note: Path | None = None, seen=None) -> str:
    """A job killed by MPI_Abort cannot close its file: record the failure from outside, with the
    first failing rank's own one-line reason when it left one (``FAIL_NOTE_ENV``), else the rank the
    self-launcher saw die first (``seen``, hpcfl.run.failure_report). Returns the reason."""
    from hpcfl.results.repair import mark_failed

    reason = f"MPI job exited with code {rc}"
    try:
        first = note.read_text(errors="replace").splitlines()[0].strip() if note else ""
    except (OSError, IndexError):
        first = ""
    if not first:
        # no rank left a reason: one was killed outright (SIGKILL, OOM killer, segfault). Hydra's
        # "BAD TERMINATION ... PID" names whichever process it reaped first, so the rank comes from
        # the self-launcher's own watch of the ranks (hpcfl/run/failure_report.py).
        from hpcfl.results.repair import clear_status_flags
        from hpcfl.run.failure_report import Launch, describe

        if Path(out).exists():
            clear_status_flags(out)  # the dead writer left HDF5's "open for writing" flag set
        _, done = _file_status(out)
        first = describe(seen if seen is not None else Launch(rc=rc), done) or ""
    reason = f"{reason}; {first}"[:900] if first else reason
    mark_failed(out, reason)
    return reason


def _leave_note(line: str) -> None:
    """Append a failing rank's one-line reason for the self-launcher (best effort, never raises)."""
    path = os.environ.get(FAIL_NOTE_ENV)
    if not path:
        return
    try:
        with open(path, "a") as f:
            f.write(line.replace("\n", " ") + "\n")
    except OSError:
        pass


def _run_in_mpi(args, launcher: str) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    from hpcfl.run.failure_report import record_rank

    record_rank(rank)  # pid and host, for the self-launcher to name a rank killed outright
    try:
        from hpcfl.config import load_job
        from hpcfl.run.orchestrator import resolve_out_path, run_job
        from hpcfl.run.progress import resolve_mode

        resume_k = None
        if args.resume:
            from hpcfl.run.checkpoint import latest

            # rank 0 reads the run file; everyone gets the same job and checkpoint round
            got = None
            if rank == 0:
                try:
                    got = (_resume_job(args).to_dict(), latest(Path(args.resume)))
                except UsageError as e:
                    got = e
            got = comm.bcast(got, root=0)
            if isinstance(got, UsageError):
                raise got
            from hpcfl.config import job_from_dict

            job = job_from_dict(got[0], args.resume)
            resume_k = got[1]
            out = Path(args.resume)
        else:
            job = load_job(args.job, args.set)
            if launcher != "self":  # the self-launcher validated already
                from hpcfl.config.validate import validate_job

                validate_job(job)
            if launcher == "self":  # the launcher already filled the placeholders
                out = Path(args.out)
            else:
                out = resolve_out_path(job, args.out) if rank == 0 else None
            out = comm.bcast(out, root=0)
        progress = resolve_mode(args.progress or job.log.progress)
        run_job(job, out, launcher=launcher, progress_mode=progress if rank == 0 else "off",
                overwrite=args.overwrite, resume_k=resume_k)
        return 0
    except UsageError as e:
        # every rank usually fails the same way: rank 0 speaks, all leave with code 2
        # (N silent singletons are all MPI rank 0: only the launcher's process 0 speaks, i.e.
        # Slurm task 0 under srun, PMI_RANK / OMPI_COMM_WORLD_RANK 0 under a mismatched mpiexec)
        from hpcfl.run.launch import launcher_rank

        if rank == 0 and (size > 1 or launcher_rank() == 0):
            print(f"hpcfl run: error: {e}", file=sys.stderr, flush=True)
        if size > 1:
            comm.Abort(2)
        return 2
    except HpcflError as e:  # a diagnosed failure (numerical fault, hung rank, disk full): one clear line
        print(f"hpcfl run: rank {rank}/{size}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        _leave_note(f"rank {rank}: {type(e).__name__}: {e}")
        if size > 1:
            comm.Abort(1)
        return 1
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        print(f"hpcfl run: rank {rank}/{size} failed:", file=sys.stderr, flush=True)
        _leave_note(f"rank {rank}: {type(e).__name__}: {e}")
        traceback.print_exc()
        sys.stderr.flush()
        if size > 1:
            comm.Abort(1)
        return 1
