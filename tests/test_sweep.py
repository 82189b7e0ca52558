"""hpcfl.sweep: grid expansion, labels, validation, skip/re-run rules, local runner, Slurm array script.

No MPI here: runs are fake run files written by RunLog, and the local runner is pointed at a fake
interpreter. The real sweep through mpiexec is tests/mpi/test_sweep_run.py, through Slurm
tests/slurm/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hpcfl.config import load_job
from hpcfl.errors import ConfigError, UsageError
from hpcfl.results.writer import RunLog
from hpcfl.sweep import (GridAxis, create_sweep, dumps_toml, expand, load_sweep, order_overrides, parse_grid,
                         pending, point_status, run_local, split_values, write_slurm_script)
from tests.conftest import write_job

TINY = {
    "run": {"name": "tiny", "ranks": 3, "rounds": 2, "seed": 7},
    "data": {"dataset": "digits", "n_clients": 6, "partition": "iid"},
    "model": {"name": "logreg"},
    "train": {"local_steps": 3, "batch_size": 16, "lr": 0.1, "client_fraction": 0.5},
    "codec": {"id": "identity"},
}


@pytest.fixture
def base(tmp_path) -> Path:
    return write_job(tmp_path / "base.toml", TINY)


def fake_run(path: Path, job_hash: str, status: str = "complete", rounds: int = 1) -> None:
    log = RunLog(path, attrs={"job_hash": job_hash, "job_json": "{}"}, n_clients=2, n_ranks=2, overwrite=True)
    for r in range(rounds):
        log.append_round({"round": r, "accuracy": 0.5}, {}, {})
    log.close(status)


# ------------------------------------------------------------------ grid

@pytest.mark.parametrize("text, want", [
    ("0.1,0.01", ["0.1", "0.01"]),
    ("topk, randomk", ["topk", "randomk"]),
    ("[32,64],[128]", ["[32,64]", "[128]"]),
    ('"a,b",c', ['"a,b"', "c"]),
    ("{id = 'topk', ratio = 0.1},{id='fp16'}", ["{id = 'topk', ratio = 0.1}", "{id='fp16'}"]),
    ("7", ["7"]),
])
def test_split_values(text, want):
    assert split_values(text) == want


def test_parse_grid():
    assert parse_grid("codec.ratio=0.1,0.01") == GridAxis("codec.ratio", ("0.1", "0.01"))
    for bad in ("codec.ratio", "ratio=0.1", "codec.ratio=0.1,,0.2", "codec.ratio=0.1,0.1"):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_expand_order_names_labels():
    pts = expand([parse_grid("codec.ratio=0.1,0.01"), parse_grid("codec.id=topk,randomk")])
    assert [p.name for p in pts] == ["0000-ratio=0.1_id=topk", "0001-ratio=0.1_id=randomk",
                                     "0002-ratio=0.01_id=topk", "0003-ratio=0.01_id=randomk"]
    assert pts[1].label == "ratio=0.1 id=randomk"
    assert pts[2].values == {"codec.ratio": 0.01, "codec.id": "topk"}
    assert pts[3].job_file == "jobs/0003-ratio=0.01_id=randomk.toml"
    assert pts[3].run_file == "runs/0003-ratio=0.01_id=randomk.h5"
    # axes sharing a last component keep their full key; odd characters are slugged in file names
    pts = expand([parse_grid("codec.id=topk"), parse_grid("routing.dense.id=identity,zstd"),
                  parse_grid("model.hidden=[32,64]")])
    assert pts[1].name == "0001-codec.id=topk_routing.dense.id=zstd_hidden=32-64"
    assert pts[1].label == "codec.id=topk routing.dense.id=zstd hidden=[32,64]"
    assert pts[1].values["model.hidden"] == [32, 64]
    with pytest.raises(ConfigError, match="twice"):
        expand([parse_grid("codec.id=topk"), parse_grid("codec.id=randomk")])


def test_order_overrides_ids_first():
    got = order_overrides(["codec.ratio=0.1", "train.lr=0.2", "codec.inner.id=topk", "codec.id=ef"])
    assert got == ["codec.id=ef", "codec.inner.id=topk", "codec.ratio=0.1", "train.lr=0.2"]


def test_dumps_toml_round_trips():
    job = {"run": {"name": 'a "quoted" \\ name', "rounds": 3, "poll_interval": 1e-05},
           "model": {"hidden": [32, 64]}, "routing": {"dense": {"id": "identity"}, "dense_patterns": []},
           "codec": {"id": "ef", "inner": {"id": "topk", "ratio": 0.01}, "beta": 1.0}}
    assert tomllib.loads(dumps_toml(job, "header\nline")) == job


# ------------------------------------------------------------------ create / load

def test_create_sweep_writes_valid_jobs(tmp_path, base):
    d = tmp_path / "sw"
    # ratio given before id: the id still replaces the codec table first, so the ratio survives
    sw = create_sweep(base, ["train.lr=0.2"], ["codec.ratio=0.1,0.01", "codec.id=topk,randomk"], d)
    assert len(sw.points) == 4
    meta = json.loads((d / "sweep.json").read_text())
    assert meta["base"] == TINY and meta["set"] == ["train.lr=0.2"]
    assert meta["grid"] == [{"key": "codec.ratio", "values": ["0.1", "0.01"]},
                            {"key": "codec.id", "values": ["topk", "randomk"]}]
    for p in sw.points:
        job = load_job(d / p.job_file)
        assert job.hash == p.job_hash  # what hpcfl run will record as job_hash
        assert job.codec == {"id": p.values["codec.id"], "ratio": p.values["codec.ratio"]}
        assert job.train.lr == 0.2 and job.run.ranks == p.ranks == 3
    assert (d / "runs").is_dir()
    again = load_sweep(d)
    assert [p.to_json() for p in again.points] == [p.to_json() for p in sw.points]
    assert again.axes == sw.axes
    # the same sweep again is fine (re-submission); a different one in the same DIR is not
    create_sweep(base, ["train.lr=0.2"], ["codec.ratio=0.1,0.01", "codec.id=topk,randomk"], d)
    with pytest.raises(UsageError, match="different sweep"):
        create_sweep(base, [], ["codec.id=topk"], d)
    sw2 = create_sweep(base, [], ["codec.id=topk"], d, replace=True)
    assert len(load_sweep(d).points) == len(sw2.points) == 1


def test_invalid_point_fails_whole_sweep(tmp_path, base):
    d = tmp_path / "sw"
    with pytest.raises(UsageError) as e:
        create_sweep(base, [], ["codec.id=topk,nope"], d)
    assert "sweep point 0001 (id=nope)" in str(e.value) and "codec.id" in str(e.value)
    assert not d.exists()  # nothing written
    with pytest.raises(UsageError, match=r"sweep point 0000 \(rounds=0\): run.rounds"):
        create_sweep(base, [], ["run.rounds=0,2"], d)
    with pytest.raises(UsageError, match=r"sweep point 0001 .*codec.ratio"):
        create_sweep(base, [], ["codec.ratio=0.5,2.0", "codec.id=topk"], d)


def test_relative_data_path_made_absolute(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sw = create_sweep(base, ["data.dataset=\"mnist\"", "data.path=\"data/mnist\""], ["train.lr=0.1,0.2"],
                      tmp_path / "sw", validate=lambda job: None)
    job = tomllib.loads((sw.dir / sw.points[0].job_file).read_text())
    assert job["data"]["path"] == str(tmp_path / "data" / "mnist")


def hpcfl_cli(capsys, *args: str):
    """``hpcfl ARGS`` in this process: (exit code, stdout, stderr)."""
    from hpcfl.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_invalid_point_exit_2(tmp_path, base, capsys):
    rc, out, err = hpcfl_cli(capsys, "sweep", base, "--grid", "codec.id=topk,nope", "--dir", tmp_path / "sw", "--run")
    assert rc == 2
    assert err.count("\n") == 1 and "sweep point 0001 (id=nope): codec.id: unknown codec id" in err


# ------------------------------------------------------------------ skip / re-run

def test_status_and_pending(tmp_path, base):
    sw = create_sweep(base, [], ["codec.id=identity,fp16,bf16,topk,randomk"], tmp_path / "sw")
    p = sw.points
    fake_run(sw.path(p[0].run_file), p[0].job_hash)                       # finished
    fake_run(sw.path(p[1].run_file), p[1].job_hash, "failed: boom")        # failed
    fake_run(sw.path(p[2].run_file), p[2].job_hash, "running")             # killed while running
    fake_run(sw.path(p[3].run_file), "0123456789abcdef")                   # another job's file
    # p[4]: never run
    assert [point_status(sw, x) for x in p] == ["complete", "failed: boom", "running", "stale", "missing"]
    assert [x.index for x in pending(sw)] == [1, 2, 3, 4]
    assert [x.index for x in pending(sw, [0, 4])] == [0, 4]  # --only re-runs even finished points
    with pytest.raises(UsageError, match="no point 9"):
        pending(sw, [9])
    sw.path(p[4].run_file).write_bytes(b"not hdf5")
    assert point_status(sw, p[4]) == "unreadable"


FAKE_PYTHON = """\
import sys
from hpcfl.config import load_job
from hpcfl.results.writer import RunLog
args = sys.argv[1:]
assert args[:3] == ["-m", "hpcfl", "run"], args
job, out = args[3], args[args.index("--out") + 1]
assert "--overwrite" in args
if "randomk" in job:
    sys.exit(7)
log = RunLog(out, attrs={"job_hash": load_job(job).hash}, n_clients=1, n_ranks=2, overwrite=True)
log.close("complete")
"""


def _fake_python(tmp_path: Path) -> str:
    script = tmp_path / "fake_hpcfl.py"
    script.write_text(FAKE_PYTHON)
    exe = tmp_path / "python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    return str(exe)


def test_run_local_continues_after_failure(tmp_path, base):
    sw = create_sweep(base, [], ["codec.id=topk,randomk,fp16"], tmp_path / "sw")
    fake_run(sw.path(sw.points[2].run_file), sw.points[2].job_hash)
    todo = pending(sw)
    assert [p.index for p in todo] == [0, 1]
    lines = []
    res = run_local(sw, todo, python=_fake_python(tmp_path), echo=lines.append)
    assert [(p.index, rc, st) for p, rc, st in res] == [(0, 0, "complete"), (1, 7, "missing")]
    assert any("exit 7" in ln for ln in lines)
    assert [p.index for p in pending(sw)] == [1]  # only the failed point is left


# ------------------------------------------------------------------ Slurm script

def test_slurm_script(tmp_path, base):
    sw = create_sweep(base, [], ["codec.id=topk,randomk,fp16", "run.ranks=3,4"], tmp_path / "sw")
    fake_run(sw.path(sw.points[0].run_file), sw.points[0].job_hash)
    todo = pending(sw)
    assert len(todo) == 5
    script = write_slurm_script(sw, todo, time_limit="00:10:00", max_parallel=2,
                                sbatch_options=["--partition=debug", "--overcommit"], python="/opt/py/bin/python")
    text = script.read_text()
    d = sw.dir.resolve()
    for line in ("#SBATCH --array=0-4%2", "#SBATCH --ntasks=4", "#SBATCH --time=00:10:00",
                 f"#SBATCH --chdir={d}", f"#SBATCH --output={d}/logs/%x-%A_%a.out", "#SBATCH --partition=debug",
                 "#SBATCH --overcommit", "HPCFL_PYTHON=${HPCFL_PYTHON:-/opt/py/bin/python}",
                 "#SBATCH --job-name=tiny-sweep"):
        assert line in text.splitlines(), line
    assert "@" not in "".join(ln for ln in text.splitlines() if not ln.startswith("#"))  # every field filled
    assert (d / "logs").is_dir()  # --output's directory exists before submission
    listing = (d / "pending.txt").read_text().splitlines()
    assert listing == [f"{p.job_file} {p.ranks} {p.run_file}" for p in todo]
    assert listing[0] == "jobs/0001-id=topk_ranks=4.toml 4 runs/0001-id=topk_ranks=4.h5"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # run array task 2 with a stand-in srun: it must run line 3 with that point's ranks
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text('#!/bin/sh\necho "$@" > "$SRUN_LOG"\n')
    (bindir / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="2",
               SRUN_LOG=str(tmp_path / "srun.txt"))
    r = subprocess.run(["bash", str(script)], cwd=d, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "srun.txt").read_text().split()
    p = todo[2]
    assert args[:4] == ["--mpi=pmi2", "-n", str(p.ranks), "/opt/py/bin/python"]
    assert args[4:] == ["-m", "mpi4py", "-m", "hpcfl", "run", p.job_file, "--out", p.run_file, "--overwrite",
                        "--progress", "plain"]
    # a pending.txt rewritten by a later --slurm is refused
    (d / "pending.txt").write_text(listing[0] + "\n")
    r = subprocess.run(["bash", str(script)], cwd=d, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "changed since" in r.stderr


def test_cli_skip_finished_and_slurm(tmp_path, base, capsys):
    d = tmp_path / "sw"
    rc, out, err = hpcfl_cli(capsys, "sweep", base, "--grid", "codec.id=topk,fp16", "--dir", d)
    assert rc == 0, err
    assert "2 points, 0 complete, 2 to run" in out and "0001-id=fp16" in out
    sw = load_sweep(d)
    for p in sw.points:
        fake_run(sw.path(p.run_file), p.job_hash)
    rc, out, err = hpcfl_cli(capsys, "sweep", "--dir", d, "--slurm")
    assert rc == 0, err
    assert "nothing to do" in out and not (d / "sweep.sbatch").exists()
    rc, out, err = hpcfl_cli(capsys, "sweep", "--dir", d, "--run")
    assert rc == 0 and "nothing to do" in out
    rc, out, err = hpcfl_cli(capsys, "sweep", "--dir", d, "--slurm", "--only", "1")
    assert rc == 0, err
    assert (d / "pending.txt").read_text() == "jobs/0001-id=fp16.toml 3 runs/0001-id=fp16.h5\n"
    assert "#SBATCH --array=0" in (d / "sweep.sbatch").read_text().splitlines()
    rc, out, err = hpcfl_cli(capsys, "sweep", "--dir", d, "--submit")
    assert rc == 2 and "--submit needs --slurm" in err
    rc, out, err = hpcfl_cli(capsys, "sweep", "--dir", tmp_path / "nothing")
    assert rc == 2 and "not a sweep directory" in err
