"""A real one-node Slurm cluster: the sbatch template and a sweep's job array, end to end.

The module starts a *private* cluster with ``slurm/local-cluster.sh`` (HPCFL_SLURM_DIR: its own
slurm.conf, state, logs and pid files in a temporary directory, on free ports), so it never touches
a cluster that already runs on the machine. The script installs Debian's slurm-wlm and munge when
they are missing (root and apt needed). Where that or the daemons' start fails, every test here is
SKIPPED with the reason; nothing waits without a timeout. At the end the jobs are cancelled and the
daemons this module started are stopped through their pid files.

Timeouts: pytest-timeout's per-test limit (600 s in pyproject.toml) covers fixture setup too, so
this module sets its own, MODULE_TIMEOUT, above the sum of every bounded step: a slow
installation then ends in a skip at START_TIMEOUT, never in a pytest-timeout failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcfl.results import load_run
from tests.conftest import write_job

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "slurm" / "local-cluster.sh"
SBATCH = REPO / "slurm" / "hpcfl.sbatch"
APT_TIMEOUT = 240     # each apt-get call of local-cluster.sh (install, and on failure update + install)
START_TIMEOUT = 900   # local-cluster.sh start: 3 apt-get calls (720 s at most) + munge and the daemons
# Submission to completion of every job, and each job's --time. The whole test takes 36 s on an idle
# 2-core VM, but at load 20 (other test runs) each tiny job needed 3.5-4.5 min before its first round.
JOB_TIMEOUT = 600
JOB_TIME = "00:10:00"
# Every other step is bounded too: stop after a failed start 60; sbatch 60; two sweep commands 2 x 120;
# the last squeue poll, scancel and two scontrol calls 4 x 15; teardown squeue/scancel/wait 65 + stop 60.
OTHER_STEPS = 60 + 60 + 2 * 120 + 4 * 15 + 65 + 60
MODULE_TIMEOUT = START_TIMEOUT + JOB_TIMEOUT + OTHER_STEPS + 60  # pytest-timeout for the test, setup included

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(MODULE_TIMEOUT)]


def _run(cmd: list[str], *, env: dict, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """subprocess.run in a new session; on timeout the whole process group is killed."""
    p = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        try:  # a daemon started meanwhile may hold the pipes open: do not wait for their end
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            out, err = "", ""
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", p))
                b.bind(("0.0.0.0", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@dataclass
class Cluster:
    env: dict
    state: Path

    def run(self, cmd, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
        return _run(cmd, env=self.env, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("the local Slurm cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmctld/slurmd/munged as root: run the tests as root "
                    "(CI does) to include this test")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    state = Path(tempfile.mkdtemp(prefix="hpcfl-slurm-"))  # short: slurmd puts unix sockets in here
    env = dict(os.environ, HPCFL_SLURM_DIR=str(state), HPCFL_SLURM_PORT=str(_free_port_pair()),
               HPCFL_APT_TIMEOUT=str(APT_TIMEOUT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HPCFL_VENV=sys.prefix, HPCFL_PYTHON=sys.executable, SLURM_CONF=str(state / "slurm.conf"))
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(k)  # pytest itself may run inside a Slurm job
    c = Cluster(env, state)

    def stop():
        try:
            c.run(["bash", CLUSTER_SH, "stop"], timeout=60)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(state, ignore_errors=True)

    try:
        r = c.run(["bash", CLUSTER_SH, "start"], timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        stop()
        said = [ln for ln in (e.stderr or "").splitlines() if ln.strip()]
        pytest.skip(f"Slurm did not start within {START_TIMEOUT} s (slurm/local-cluster.sh start killed; "
                    f"apt-get calls capped at {APT_TIMEOUT} s each): last output: "
                    f"{' | '.join(said[-3:]) or 'none'}")
    if r.returncode != 0:
        logs = ""
        for name in ("slurmctld.log", "slurmd.log"):
            p = state / "log" / name
            if p.exists():
                logs += f"\n{name}: " + " | ".join(p.read_text(errors="replace").splitlines()[-3:])
        stop()
        pytest.skip(f"Slurm could not start here (slurm/local-cluster.sh start: exit {r.returncode}): "
                    f"{(r.stderr.strip().splitlines() or ['?'])[-1]}{logs}")
    try:
        yield c
    finally:
        try:
            ids = c.run(["squeue", "-h", "-o", "%A"], timeout=15).stdout.split()
            if ids:
                c.run(["scancel", *sorted(set(ids))], timeout=15)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and c.run(["squeue", "-h"], timeout=15).stdout.strip():
                    time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass
        stop()


def _wait(c: Cluster, job_ids: list[str], logs: Path) -> dict[str, list[str]]:
    """Poll squeue until the jobs left the queue; return scontrol's records per job id."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        q = c.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(job_ids)], timeout=15)
        if q.returncode == 0 and not q.stdout.strip():
            break
        if time.monotonic() > deadline:
            c.run(["scancel", *job_ids], timeout=15)
            pytest.fail(f"jobs {job_ids} still queued after {JOB_TIMEOUT} s:\n{q.stdout}\n{_logs(logs)}")
        time.sleep(1.0)
    out = {}
    for j in job_ids:
        r = c.run(["scontrol", "-o", "show", "job", j], timeout=15)
        out[j] = r.stdout.strip().splitlines()
    return out


def _logs(d: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(d.glob("**/*.out")))


def test_sbatch_template_and_sweep_array(cluster, tmp_path, tiny_job):
    c = cluster
    tiny_job["run"]["rounds"] = 2
    job = write_job(tmp_path / "tiny.toml", tiny_job)
    (tmp_path / "logs").mkdir()  # --output's directory must exist at submission

    # 1. the sbatch template with one job: world size = --ntasks
    r = c.run(["sbatch", "--parsable", "--ntasks=3", f"--time={JOB_TIME}", f"--chdir={tmp_path}",
               f"--output={tmp_path}/logs/%x-%j.out", SBATCH, job, "--progress", "plain"], timeout=60)
    assert r.returncode == 0, r.stderr
    single = r.stdout.strip().split(";")[0]

    # 2. a 2-point sweep as a job array
    sweep = tmp_path / "sweep"
    r = c.run([sys.executable, "-m", "hpcfl", "sweep", job, "--grid", "codec.id=identity,fp16", "--dir", sweep,
               "--slurm", "--submit", "--time", JOB_TIME], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    array = r.stdout.split("submitted job array ")[1].split(";")[0].split()[0]

    records = _wait(c, [single, array], tmp_path)
    for j, recs in records.items():
        assert recs, f"scontrol knows nothing of job {j}"
    bad = [rec for recs in records.values() for rec in recs
           if "JobState=COMPLETED" not in rec or "ExitCode=0:0" not in rec]
    assert not bad, "\n".join(bad) + "\n" + _logs(tmp_path)
    assert len(records[array]) == 2  # one record per array task

    run = load_run(tmp_path / "runs" / f"tiny-{single}.h5")
    slurm = json.loads(run.attrs["slurm_json"])
    assert run.complete and run.n_rounds == 2
    assert run.attrs["world_size"] == 3 and run.attrs["launcher"] == "srun"
    assert slurm["SLURM_JOB_ID"] == single and slurm["SLURM_NTASKS"] == "3"

    tasks = {}
    for p in sorted((sweep / "runs").glob("*.h5")):
        run = load_run(p)
        slurm = json.loads(run.attrs["slurm_json"])
        assert run.complete and run.attrs["world_size"] == 3 and run.attrs["launcher"] == "srun", p
        assert slurm["SLURM_ARRAY_JOB_ID"] == array
        tasks[slurm["SLURM_ARRAY_TASK_ID"]] = (p.name, run.codec["codec"]["id"])
    assert tasks == {"0": ("0000-id=identity.h5", "identity"), "1": ("0001-id=fp16.h5", "fp16")}
    assert sorted(p.name for p in (sweep / "logs").iterdir()) == [f"tiny-sweep-{array}_0.out",
                                                                  f"tiny-sweep-{array}_1.out"]

    # 3. re-submission skips the finished points
    r = c.run([sys.executable, "-m", "hpcfl", "sweep", "--dir", sweep, "--slurm", "--submit"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout and "submitted" not in r.stdout
