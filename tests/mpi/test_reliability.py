"""Rank failures end the job and keep completed rounds; --resume continues bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcfl.results import load_run
from tests.conftest import MPIEXEC, hpcfl_env, needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]


@pytest.fixture
def stateful_job(tiny_job):
    """Stateful on both sides of the optimizer: error feedback and server momentum."""
    tiny_job["run"].update(rounds=6, ranks=3)
    tiny_job["model"] = {"name": "mlp", "hidden": [16]}
    tiny_job["server"] = {"momentum": 0.9}
    tiny_job["codec"] = {"id": "topk_ef", "ratio": 0.1}
    return tiny_job


# Kill-and-resume cases: codec, job changes, (rank killed with SIGKILL, round), checkpoint_every.
# Together they cover state on both sides: error-feedback residuals (all but falcom), LBGM's look-back
# gradient on the client and at the root, PowerSGD's warm-start factors, FalCom's predictor history
# (last reconstruction and EMA memory of each conv kernel, on both sides: 4-D slots only, so a conv
# model), and server momentum (all). The killed rank varies, the root included, so that the self-
# launcher's naming of a SIGKILLed rank is checked where Hydra's own banner often names another.
RESUME_CASES = {
    "topk_ef": ({"codec": {"id": "topk_ef", "ratio": 0.1}}, (1, 4), 1),
    "lbgm_topk_ef": ({"codec": {"id": "lbgm_topk_ef", "ratio": 0.1, "delta": 0.2}}, (2, 5), 2),
    "powersgd_ef": ({"codec": {"id": "powersgd_ef", "rank": 2}}, (0, 3), 1),
    "falcom": ({"codec": {"id": "falcom"}, "model": {"name": "cnn2", "cnn_padding": "same"},
                "routing": {"min_ndim": 4}}, (2, 4), 1),
}
STATEFUL_ROOT = {"lbgm_topk_ef", "falcom"}  # codecs with decoder-side (root) state

# Runs several `hpcfl run` command lines one after another in ONE mpiexec world, exactly as
# `mpiexec -n 3 hpcfl run ...` would run each: torch is imported once per rank instead of once
# per job (about 3 s per rank here).
_BATCH = """\
import json, sys
from hpcfl.cli import main
sys.exit(max(main(argv) for argv in json.loads(sys.argv[1])))
"""


def _batch(tmp_path, argvs: list[list[str]]) -> None:
    script = tmp_path / "batch.py"
    script.write_text(_BATCH)
    r = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, "-m", "mpi4py", str(script), json.dumps(argvs)],
                       capture_output=True, text=True, timeout=900, env=hpcfl_env(MPIEXEC_TIMEOUT="840"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def _metric_names(metrics) -> list[str]:
    return [m.name for m in metrics if m.unit != "s" or m.name.startswith("modelled")]  # all but timings


def _same_metrics(a, b):
    from hpcfl.results.schema import CLIENT_METRICS, ROUND_METRICS

    for k in _metric_names(ROUND_METRICS):
        np.testing.assert_array_equal(a.rounds[k], b.rounds[k], err_msg=f"/rounds/{k}")
    for k in _metric_names(CLIENT_METRICS):
        np.testing.assert_array_equal(a.clients[k], b.clients[k], err_msg=f"/clients/{k}")
    assert (a.codec_stats is None) == (b.codec_stats is None)
    if a.codec_stats is not None:
        for k in a.codec_stats.dtype.names:
            np.testing.assert_array_equal(a.codec_stats[k], b.codec_stats[k], err_msg=f"/codec_stats/{k}")


def _h5_tree(path) -> dict:
    """Every dataset's bytes and every attribute of an HDF5 file, by path."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        out["/attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}

        def visit(name, obj):
            out[f"{name}/attrs"] = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                v = obj[()]
                out[name] = (str(v.dtype), np.shape(v), np.asarray(v).tobytes())

        f.visititems(visit)
    return out


def _same_checkpoint(a, b, k: int) -> None:
    """The final checkpoints, bit for bit: model, momentum, previous model, last participation and
    every client's codec state on the root and on each worker."""
    names = sorted(p.name for p in (a.parent / f"{a.name}.ckpt").glob(f"*-k{k:06d}.h5"))
    assert names == sorted(p.name for p in (b.parent / f"{b.name}.ckpt").glob(f"*-k{k:06d}.h5"))
    assert names == [f"rank0001-k{k:06d}.h5", f"rank0002-k{k:06d}.h5", f"root-k{k:06d}.h5"], names
    for n in names:
        ta, tb = _h5_tree(a.parent / f"{a.name}.ckpt" / n), _h5_tree(b.parent / f"{b.name}.ckpt" / n)
        assert ta.keys() == tb.keys(), n
        for key in ta:
            assert ta[key] == tb[key], f"{n}:{key} differs"


def test_sigkill_names_rank_then_resume_equals_uninterrupted(tmp_path, stateful_job):
    """For each stateful codec: an uninterrupted run; the same job with one rank SIGKILLed at the top of
    a round (a real `hpcfl run`, self-launched); `--resume` of that file. The killed job ends at once,
    names the rank, its pid and host and the round on stderr and in the file, and keeps the completed
    rounds; the resumed run equals the uninterrupted one in every metric, byte count and codec statistic,
    and its final checkpoint (model, momentum, every codec state on both sides) bit for bit.
    References and resumes are batched into one mpiexec world each: 7 launches for 4 codecs."""
    jobs, full, cut = {}, {}, {}
    for name, (changes, _, every) in RESUME_CASES.items():
        job = {sec: dict(tab) for sec, tab in stateful_job.items()}
        for sec, tab in changes.items():
            job[sec] = dict(tab) if sec != "run" else {**job["run"], **tab}
        job["run"]["checkpoint_every"] = every
        jobs[name] = write_job(tmp_path / f"{name}.toml", job)
        full[name], cut[name] = tmp_path / f"{name}-full.h5", tmp_path / f"{name}-cut.h5"
    t = time.monotonic()
    _batch(tmp_path, [["run", str(jobs[n]), "--out", str(full[n]), "--launcher", "mpiexec", "--progress", "off"]
                      for n in RESUME_CASES])
    took = {"references": time.monotonic() - t}

    for name, (_, (rank, k), every) in RESUME_CASES.items():
        t = time.monotonic()
        r = run_hpcfl(["run", str(jobs[name]), "--out", str(cut[name]), "--progress", "off"],
                      env=hpcfl_env(HPCFL_FAULT=f"rank={rank},round={k},kind=kill"))
        took[f"kill {name}"] = time.monotonic() - t
        assert r.returncode == 9, r.stderr[-3000:]
        run = load_run(cut[name])
        assert run.n_rounds == k and not run.complete, (name, run.n_rounds, run.status)
        # the rank, its pid and host, the signal and the round: in the file and as the last stderr line
        pid, host = int(run.meta["pids"][rank]), run.meta["hostnames"][rank].decode()
        named = (f"failed: MPI job exited with code 9; rank {rank} (pid {pid} on {host}) was killed by signal 9 "
                 f"(SIGKILL) in round {k} (out of memory, scancel or a node failure?); the MPI launcher ended "
                 "the job ")
        assert run.status.startswith(named), (name, run.status)
        assert r.stderr.rstrip().splitlines()[-1].startswith(f"hpcfl run: {named}"), r.stderr[-2000:]
        # bounded: from the rank's death to the end of the whole job (start-up excluded: the VM is shared)
        ended = float(run.status.split("ended the job ")[1].split(" s later")[0])
        assert ended < 10, run.status

    t = time.monotonic()
    _batch(tmp_path, [["run", "--resume", str(cut[n]), "--launcher", "mpiexec", "--progress", "off"]
                      for n in RESUME_CASES])
    took["resumes"] = time.monotonic() - t
    for name, (_, (rank, k), every) in RESUME_CASES.items():
        a, b = load_run(full[name]), load_run(cut[name])
        assert a.complete and b.complete and b.n_rounds == a.n_rounds == 6, (name, b.status)
        resumed_at = json.loads(b.attrs["resumes_json"])[-1]["rounds_done"]
        newest = k // every * every  # the newest checkpoint before the kill...
        assert resumed_at in ((newest, newest - every) if rank == 0 else (newest,)), (name, resumed_at)
        # ...(a killed root may die before the workers wrote theirs)
        _same_metrics(a, b)
        _same_checkpoint(full[name], cut[name], 6)
        # not vacuous: the codec really carries state into the resumed rounds
        assert (b.clients["state_bytes"][-1] > 0).any(), name
        if name in STATEFUL_ROOT:
            assert b.rounds["root_state_bytes"][resumed_at:].min() > 0, name
    path = load_run(cut["falcom"]).codec_stat("path")[4:]  # FalCom's predictive path (it reads the history)
    assert (path == 2).any(), path  # is taken in the rounds after the resume point

    # the CLI's own resume, launched by itself: nothing left to do is refused before any rank starts...
    topk = cut["topk_ef"]
    r = run_hpcfl(["run", "--resume", str(topk)])
    assert r.returncode == 2 and "all 6 rounds are done" in r.stderr
    # ...unless the run is extended
    t = time.monotonic()
    r = run_hpcfl(["run", "--resume", str(topk), "--set", "run.rounds=7"])
    took["extend"] = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    assert load_run(topk).n_rounds == 7
    print("launch times (s):", {k: round(v, 1) for k, v in took.items()})


def test_resume_refusals(tmp_path, stateful_job):
    stateful_job["run"]["checkpoint_every"] = 0
    stateful_job["run"]["rounds"] = 2
    jp = write_job(tmp_path / "job.toml", stateful_job)
    out = tmp_path / "nock.h5"
    stale = tmp_path / "nock.h5.ckpt"  # an earlier run's checkpoints at the same path: a fresh run drops them
    stale.mkdir()
    for name in ("root-k000099.h5", "rank0001-k000099.h5", "rank0002-k000099.h5"):
        (stale / name).write_bytes(b"stale")
    assert run_hpcfl(["run", str(jp), "--out", str(out)]).returncode == 0
    assert not stale.exists()
    r = run_hpcfl(["run", "--resume", str(out)])
    assert r.returncode == 2 and "no checkpoints" in r.stderr
    r = run_hpcfl(["run", "--resume", str(out), "--set", "train.lr=0.5"])
    assert r.returncode == 2 and "train.lr" in r.stderr
    r = run_hpcfl(["run", "--resume", str(tmp_path / "missing.h5")])
    assert r.returncode == 2
    # a checkpoint of another job (or of a job schema this hpcfl reads differently) is refused before launch
    import h5py

    stale.mkdir()
    with h5py.File(stale / "root-k000001.h5", "w") as f:
        f.attrs.update(job_hash="deadbeef", world_size=3, rounds_done=1)
    for w in (1, 2):
        (stale / f"rank{w:04d}-k000001.h5").write_bytes(b"")
    r = run_hpcfl(["run", "--resume", str(out)])
    assert r.returncode == 2 and "belongs to job deadbeef" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("who, expect", [
    (2, "rank 2 sent nothing to the root"),                 # a worker stops answering: the root names it
    (0, "for the root (rank 0) to start round 3"),          # the root stops answering: a worker names it
])
def test_hung_rank_ends_job_within_timeout(tmp_path, tiny_job, who, expect):
    """A rank that stops answering (sleeps outside MPI) ends the whole job within run.timeout plus
    start-up, with the rank and round named on stderr and in the file, and earlier rounds kept."""
    tiny_job["run"].update(rounds=6, ranks=3, timeout=4.0)
    jp = write_job(tmp_path / "job.toml", tiny_job)
    out = tmp_path / "hang.h5"
    t = time.monotonic()
    r = run_hpcfl(["run", str(jp), "--out", str(out)], env=hpcfl_env(HPCFL_FAULT=f"rank={who},round=2,kind=hang"),
                  timeout=180)
    took = time.monotonic() - t
    assert r.returncode != 0
    assert took < 90, took  # the hang itself lasts an hour
    assert "RankTimeout" in r.stderr and expect in r.stderr and "run.timeout = 4 s" in r.stderr, r.stderr[-2000:]
    run = load_run(out)
    assert run.status.startswith("failed") and "RankTimeout" in run.status and expect in run.status, run.status
    assert run.n_rounds == 2  # rounds 0 and 1; the hang starts at the top of round 2 on either side


# ------------------------------------------------------------ naming a killed rank, without MPI

# A stand-in for mpiexec: three "ranks" record themselves like hpcfl's ranks do; rank 2 kills itself
# with SIGKILL, then the "launcher" kills the others, prints Hydra's banner naming rank 0's pid (as
# Hydra did in 3 of 5 trials) and exits 9.
_FAKE_MPIEXEC = r"""
import os, signal, subprocess, sys, time
child = ("import os, signal, sys, time\n"
         "from hpcfl.run.failure_report import record_rank\n"
         "r = int(sys.argv[1]); record_rank(r); time.sleep(1.0 if r == 2 else 60)\n"
         "os.kill(os.getpid(), signal.SIGKILL)\n")
kids = [subprocess.Popen([sys.executable, "-c", child, str(r)]) for r in range(3)]
while all(k.poll() is None for k in kids):
    time.sleep(0.005)
time.sleep(0.05)  # Hydra's clean-up comes a round trip later
for k in kids:
    if k.poll() is None:
        k.kill()
    k.wait()
print("=   PID %d RUNNING AT %s\n=   EXIT CODE: 9\n"
      "YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)" % (kids[0].pid, "fakehost"))
sys.exit(9)
"""


def test_watcher_names_the_rank_that_died_first(capfd):
    from hpcfl.run.failure_report import describe, launch, parse_banner

    seen = launch([sys.executable, "-c", _FAKE_MPIEXEC], hpcfl_env(), 3)
    assert seen.rc == 9 and sorted(seen.ranks) == [0, 1, 2]
    assert seen.first == [2], seen.exits
    assert b"EXIT CODE: 9" in seen.tail and "EXIT CODE: 9" in capfd.readouterr().out  # relayed unchanged
    assert parse_banner(seen.tail)["pid"] == seen.ranks[0][0]  # the banner names another rank
    text = describe(seen, 4)
    pid, host = seen.ranks[2]
    assert text.startswith(f"rank 2 (pid {pid} on {host}) was killed by signal 9 (SIGKILL) in round 4 (out of "
                           "memory, scancel or a node failure?); the MPI launcher ended the job "), text


def test_describe_without_a_watch():
    from hpcfl.run.failure_report import Launch, describe

    ranks = {0: (100, "a"), 1: (101, "a"), 2: (102, "b")}
    banner = b"=   PID 101 RUNNING AT a\n=   EXIT CODE: 11\nEXIT STRING: Segmentation fault (signal 11)\n"
    # rank 2 is on another host: only the banner speaks, for what it is worth
    text = describe(Launch(rc=11, ranks=ranks, tail=banner, host="a"), 3)
    assert text == ("a rank (the MPI launcher names rank 1 (pid 101 on a), the first process it reaped, which may be "
                    "one it ended itself) was killed by signal 11 (SIGSEGV) in round 3; ranks on other hosts are not "
                    "watched")
    # every rank ended at once: nobody is named from the watch
    local = {r: (p, "a") for r, (p, _) in ranks.items()}
    assert describe(Launch(rc=9, ranks=local, exits=[(1.0, [0, 1, 2])], ended=1.5, host="a"), 2) == (
        "a rank was killed by signal 9 (SIGKILL) in round 2 (out of memory, scancel or a node failure?); the MPI "
        "launcher ended the job 0.50 s later; the MPI launcher does not say which rank")
    assert describe(Launch(rc=9, ranks=local, exits=[(1.0, [1, 2])], ended=1.5, host="a"), None).startswith(
        "rank 1 (pid 101 on a) or rank 2 (pid 102 on a) was killed by signal 9 (SIGKILL) during start-up")
    assert describe(Launch(rc=255, tail=b"[mpiexec@vm] APPLICATION TIMED OUT, TIMEOUT = 240s\n"), 5) == (
        "the MPI launcher's time limit (MPIEXEC_TIMEOUT = 240s) ran out in round 5; it ended every rank")
    assert describe(Launch(rc=-9), 1) == "mpiexec itself was killed by signal 9 (SIGKILL) in round 1"
    assert describe(Launch(rc=1), 1) is None  # nothing better than the exit code
