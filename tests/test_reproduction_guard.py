"""hpcfl analyze reproduction never replaces the report with a poorer one by accident.

On a clone without the run files the default command used to overwrite docs/reproduction.md with
an all-missing version and delete the figures. Now it refuses (exit 2, one line) when fewer runs
are usable than the existing report was built from, unless --force; figures are replaced or
removed only once a new report has been written. Tiny run files written here; no MPI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpcfl.analysis import reproduction as rp
from hpcfl.cli import main
from hpcfl.config import load_job
from hpcfl.errors import UsageError
from hpcfl.results.writer import RunLog
from tests.conftest import write_job

C = 2
RAW = 400

MANIFEST = """
title = "Guard report"
spec = "methods.md"

[[method]]
key = "alpha"
title = "Alpha: one method"
paper = "Someone, A paper"
differences = []

[[method.run]]
id = "one"
job = "job.toml"
out = "alpha/one.h5"

[[method.run]]
id = "two"
job = "job.toml"
set = ["codec.ratio=0.5"]
out = "alpha/two.h5"

[[method.run]]
id = "bad"
job = "job.toml"
set = ["server.lr=9.0"]
out = "alpha/bad.h5"

[[method.figure]]
kind = "accuracy_vs_rounds"
file = "alpha-acc"
title = "Alpha accuracy"
runs = ["*"]
"""


def write_run(path: Path, sets: list[str], acc: list[float], *, status: str = "complete") -> Path:
    j = load_job("job.toml", sets)
    attrs = {"job_json": j.to_json(), "codec_json": json.dumps({"codec": j.to_dict()["codec"]}),
             "world_size": 3, "job_hash": j.hash, "n_clients": C, "n_params": 650}
    log = RunLog(path, attrs=attrs, n_clients=C, n_ranks=3, overwrite=True, meta={"slot_names": np.array([b"w"])})
    for r, a in enumerate(acc):
        log.append_round({"round": r, "accuracy": a, "loss": 1.0, "uplink_bytes": 100, "payload_bytes": 84,
                          "header_bytes": 16, "raw_bytes": RAW, "downlink_bytes": 2 * RAW,
                          "compression_ratio": RAW / 100, "round_s": 0.5, "wall_time": 0.5 * (r + 1)},
                         {"participated": np.ones(C, np.uint8), "payload_bytes": np.full(C, 42.0),
                          "raw_bytes": np.full(C, RAW / C)}, {}, None)
    log.close(status)
    return path


@pytest.fixture
def built(tmp_path, monkeypatch):
    """A report built from 3 usable runs (2 complete, 1 diverged), with its figure and a stale PNG."""
    monkeypatch.chdir(tmp_path)
    write_job(tmp_path / "job.toml", {
        "run": {"name": "guard", "ranks": 3, "rounds": 3, "seed": 1},
        "data": {"dataset": "digits", "n_clients": C, "partition": "iid"},
        "model": {"name": "logreg"},
        "train": {"local_steps": 1, "batch_size": 8, "lr": 0.1, "client_fraction": 1.0},
        "codec": {"id": "topk", "ratio": 0.1}})
    (tmp_path / "rep.toml").write_text(MANIFEST)
    runs = tmp_path / "runs"
    write_run(runs / "alpha/one.h5", [], [0.2, 0.4, 0.6])
    write_run(runs / "alpha/two.h5", ["codec.ratio=0.5"], [0.3, 0.5, 0.7])
    write_run(runs / "alpha/bad.h5", ["server.lr=9.0"], [0.1, 0.1],
              status="failed: NumericalFault: client 0 sent NaN/Inf in round 2 (tensors w); stopping")
    out = tmp_path / "docs" / "reproduction.md"
    rp.generate("rep.toml", runs, out)
    img = out.parent / "img" / "reproduction"
    (img / "kept-by-hand.png").write_bytes(b"\x89PNG old")
    return tmp_path, runs, out, img


def cli(runs: Path, out: Path, *extra: str) -> int:
    return main(["analyze", "reproduction", "--manifest", "rep.toml", "--runs", str(runs), "--out", str(out),
                 *extra])


def snapshot(out: Path, img: Path) -> dict[str, bytes]:
    return {"report": out.read_bytes(), **{p.name: p.read_bytes() for p in sorted(img.iterdir())}}


def test_inventory_of_the_report_is_read_back(built):
    _, _, out, _ = built
    assert rp.report_inventory(out) == {"runs": 3, "complete": 2, "diverged": 1, "unusable": 0, "usable": 3}
    assert "| Alpha | 3 | 2 | 1 | 0 |" in out.read_text()
    assert "Wall time recorded in the 3 usable run files" in out.read_text()  # 1.5 + 1.5 + 1.0 s
    assert "4.0 s in total, median 1.5 s per run, longest 1.5 s (`two`)" in out.read_text()
    assert rp.report_inventory(out.parent / "absent.md") is None
    (out.parent / "other.md").write_text("# not a report\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert rp.report_inventory(out.parent / "other.md") is None


def test_fewer_usable_runs_refused_and_nothing_touched(built, capsys):
    tmp, runs, out, img = built
    before = snapshot(out, img)
    assert set(before) == {"report", "alpha-acc.png", "kept-by-hand.png"}

    # a clone without the run files: the default command's situation
    assert cli(tmp / "no-runs", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "only 0 of 3 manifest runs have a usable file" in err
    assert "the existing report was built from 3 (2 complete, 1 diverged)" in err
    assert "--force" in err and "--run-missing" in err
    assert snapshot(out, img) == before  # report and every figure, the stale one too, as they were
    assert sorted(p.name for p in img.parent.iterdir()) == ["reproduction"]  # no staging directory left

    # one run lost: still refused, also through --img; the library raises UsageError
    (runs / "alpha/two.h5").unlink()
    assert cli(runs, out, "--img", str(img)) == 2
    assert "only 2 of 3 manifest runs" in capsys.readouterr().err
    with pytest.raises(UsageError, match="only 2 of 3"):
        rp.generate("rep.toml", runs, out)
    assert snapshot(out, img) == before


def test_force_overrides_and_only_then_removes_figures(built, capsys):
    tmp, runs, out, img = built
    assert cli(tmp / "no-runs", out, "--force") == 0
    assert "wrote" in capsys.readouterr().err
    text = out.read_text()
    assert "| Alpha | 3 | 0 | 0 | 3 |" in text and "Wall time recorded" not in text
    assert "**Alpha accuracy**: not drawn, none of its runs has a usable file." in text
    assert list(img.iterdir()) == []  # the report was written: figures it no longer draws are gone
    assert rp.report_inventory(out)["usable"] == 0


def test_as_many_or_more_usable_runs_regenerate_without_force(built):
    _, runs, out, img = built
    old_png = (img / "alpha-acc.png").read_bytes()
    write_run(runs / "alpha/two.h5", ["codec.ratio=0.5"], [0.3, 0.5, 0.9])  # same count, new numbers
    rp.generate("rep.toml", runs, out)
    assert sorted(p.name for p in img.iterdir()) == ["alpha-acc.png"]  # redrawn; the stale PNG removed
    assert (img / "alpha-acc.png").read_bytes() != old_png
    (out.parent / "fresh.md").unlink(missing_ok=True)
    rp.generate("rep.toml", runs.parent / "no-runs", out.parent / "fresh.md", out.parent / "fresh-img")
    assert rp.report_inventory(out.parent / "fresh.md")["usable"] == 0  # no report at --out yet: no guard


def test_a_failed_generation_leaves_report_and_figures(built, monkeypatch):
    from hpcfl.analysis.reproduction_kinds import FIGURES

    _, runs, out, img = built
    before = snapshot(out, img)
    write_run(runs / "alpha/two.h5", ["codec.ratio=0.5"], [0.3, 0.5, 0.9])  # a different figure
    real = FIGURES["accuracy_vs_rounds"]

    def boom(ctx, f, png):
        real(ctx, f, png)  # drawn (into the staging directory), then the generation fails
        assert png.exists() and png.parent != img
        raise RuntimeError("drawing failed")

    monkeypatch.setitem(FIGURES, "accuracy_vs_rounds", boom)
    with pytest.raises(RuntimeError, match="drawing failed"):
        rp.generate("rep.toml", runs, out)
    assert snapshot(out, img) == before
    assert sorted(p.name for p in img.parent.iterdir()) == ["reproduction"]
