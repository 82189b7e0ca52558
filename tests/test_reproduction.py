"""hpcfl analyze reproduction: the report from a manifest and tiny run files written here.

Every measured number asserted below is computed by hand from the rows written by ``write_run``;
paper figures come only from the manifest. No MPI: ``--run-missing`` is checked with a stub
in place of the ``hpcfl run`` subprocess.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from hpcfl.analysis import reproduction as rp
from hpcfl.config import load_job
from hpcfl.errors import UsageError
from hpcfl.results.writer import STAT_DTYPE, RunLog
from tests.conftest import write_job

C = 4
RAW = 400  # raw float32 bytes per round (all clients)


def job_dict(lr: float = 0.1) -> dict:
    return {
        "run": {"name": "rep", "ranks": 3, "rounds": 4, "seed": 1},
        "data": {"dataset": "digits", "n_clients": C, "partition": "iid"},
        "model": {"name": "logreg"},
        "train": {"local_steps": 1, "batch_size": 8, "lr": 0.1, "client_fraction": 1.0},
        "server": {"lr": lr},
        "codec": {"id": "topk", "ratio": 0.1},
    }


def write_run(path: Path, job: Path, sets: list[str], acc: list[float], up: list[int], *,
              status: str = "complete", stats: list[tuple[int, str, float]] = (), job_json: str | None = None,
              slots: list | None = None, rounds_extra: dict | None = None, clients_extra: dict | None = None):
    """A run file with the given per-round accuracy and uplink bytes; ``stats``: (round, name, value) on slot 0;
    ``rounds_extra`` / ``clients_extra``: more /rounds values and (C,) /clients arrays, the same every round."""
    j = load_job(job, sets)
    codec = {"codec": j.to_dict()["codec"], **({"slots": slots} if slots else {})}
    attrs = {"job_json": job_json or j.to_json(), "codec_json": json.dumps(codec),
             "world_size": 3, "job_hash": j.hash, "n_clients": C, "n_params": 650}
    log = RunLog(path, attrs=attrs, n_clients=C, n_ranks=3, overwrite=True,
                 meta={"slot_names": np.array([b"w"])})
    for r, (a, u) in enumerate(zip(acc, up)):
        rows = [(r, c, 0, name.encode(), v) for rr, name, v in stats if rr == r for c in range(C)]
        st = np.array(rows, dtype=STAT_DTYPE) if rows else None
        log.append_round({"round": r, "accuracy": a, "loss": 1.0, "uplink_bytes": u, "payload_bytes": u - 8 * C,
                          "header_bytes": 8 * C, "raw_bytes": RAW, "downlink_bytes": 2 * RAW,
                          "compression_ratio": RAW / u, "round_s": 0.01, "wall_time": 0.01 * (r + 1),
                          **(rounds_extra or {})},
                         {"participated": np.ones(C, np.uint8), "payload_bytes": np.full(C, (u - 8 * C) / C),
                          "raw_bytes": np.full(C, RAW / C), **(clients_extra or {})}, {}, st)
    log.close(status)
    return path


MANIFEST = """
title = "Test report"
spec = "methods.md"

[[method]]
key = "alpha"
title = "Alpha: the first method"
paper = "Someone, A paper"
spec_section = "§9"
confidence = "HIGH"
key_metric = "energy"
differences = ["Structural difference one."]

[[method.claim]]
text = "Final accuracy of the base setting."
tag = "CODE"
paper = "0.950 (repo logs)"
ours = ["base:final", "gone:final", "@alpha.mean.both"]

[[method.claim]]
text = "Numbers not read."
tag = "TBD"
paper = "[TBD], not quoted"
ours = []

[[method.run]]
id = "base"
label = "base run"
job = "JOB"
out = "alpha/base.h5"

[[method.run]]
id = "fast"
label = "fast run"
job = "JOB"
set = ["codec.ratio=0.5"]
out = "alpha/fast.h5"

[[method.run]]
id = "gone"
label = "never run"
job = "JOB"
set = ["codec.ratio=0.25"]
out = "alpha/gone.h5"

[[method.run]]
id = "div"
label = "diverging run"
job = "JOB"
set = ["server.lr=9.0"]
out = "alpha/div.h5"

[[method.table]]
kind = "runs"
title = "All alpha runs"
runs = ["*"]
columns = ["param:codec.ratio", "status", "final", "best", "last5", "to_target", "uplink", "ratio", "energy"]
target = 0.5

[[method.table]]
kind = "mean_over"
name = "alpha.mean"
title = "Mean"
metric = "final"
groups = [["both", ["base", "fast"]], ["none", ["gone"]]]

[[method.figure]]
kind = "accuracy_vs_rounds"
file = "alpha-acc"
title = "Alpha accuracy"
runs = ["*"]

[[method.figure]]
kind = "xy"
file = "alpha-xy"
title = "Alpha final against ratio"
x = "param:codec.ratio"
y = "final"
series = [["alpha", ["*"]]]

[[method]]
key = "beta"
title = "Beta: nothing ran"
paper = "Other, B paper"
differences = []

[[method.run]]
id = "b-r{ratio}"
label = "beta ratio {ratio}"
job = "JOB"
grid = [["codec.ratio", ["0.1", "0.2"]]]
out = "beta/runs/{i}-ratio={ratio}.h5"

[[method.figure]]
kind = "accuracy_vs_rounds"
file = "beta-acc"
title = "Beta accuracy"
runs = ["b-*"]
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "job.toml", job_dict())
    man = tmp_path / "rep.toml"
    man.write_text(MANIFEST.replace("JOB", "job.toml"))
    runs = tmp_path / "runs"
    write_run(runs / "alpha/base.h5", job, [], [0.2, math.nan, 0.5, 0.6], [100, 100, 200, 200],
              stats=[(1, "energy_topk_orig", 0.2), (1, "energy_topk_mapped", 0.6),
                     (2, "energy_topk_orig", 0.4), (2, "energy_topk_mapped", 0.8)])
    write_run(runs / "alpha/fast.h5", job, ["codec.ratio=0.5"], [0.3, 0.4, 0.45, 0.5], [50, 50, 50, 50])
    write_run(runs / "alpha/div.h5", job, ["server.lr=9.0"], [0.1, 0.1], [100, 100],
              status="failed: NumericalFault: client 0 sent NaN/Inf in round 2 (tensors w); stopping")
    return tmp_path, man, runs


def test_report_holds_measured_numbers_and_lists_missing_runs(setup):
    tmp, man, runs = setup
    out = tmp / "docs" / "reproduction.md"
    res = rp.generate(man, runs, out)
    text = out.read_text()

    assert sorted(res["present"]) == ["base", "div", "fast"]
    assert ("alpha", "gone", "missing") in res["missing"]
    assert {m[1] for m in res["missing"] if m[0] == "beta"} == {"b-r0.1", "b-r0.2"}

    # the paper's figure comes from the manifest, with its tag, in the paper column only
    row = next(ln for ln in text.splitlines() if ln.startswith("| Final accuracy of the base setting."))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "[CODE]" and cells[2] == "0.950 (repo logs)"
    # ours: measured from the run file (last evaluated accuracy 0.6), the missing run marked, the mean published
    assert "base run, final acc: 0.6000" in cells[3]
    assert "never run: — (missing)" in cells[3]
    assert "both: 0.5500 (mean of 2)" in cells[3]  # (0.6 + 0.5) / 2
    assert "0.950" not in cells[3]
    assert "| Numbers not read. | [TBD] | [TBD], not quoted | not measured here |" in text

    table = text[text.index("#### All alpha runs"):text.index("#### Mean")]
    base = next(ln for ln in table.splitlines() if ln.startswith("| base run |"))
    cells = [c.strip() for c in base.strip("|").split("|")]
    # ratio, status, final, best, last 5, rounds to 0.5, uplink, vs uncompressed, energy
    assert cells[1:] == ["0.1", "complete", "0.6000", "0.6000", f"{(0.2 + 0.5 + 0.6) / 3:.4f}", "3", "600 B",
                         f"{4 * RAW / 600:.2f}×", f"{0.3:.3f} → {0.7:.3f}"]  # energy: rounds >= 1 only
    fast = next(ln for ln in table.splitlines() if ln.startswith("| fast run |"))
    assert "| 0.5 | complete | 0.5000 | 0.5000 |" in fast and "| 4 | 200 B | 8.00× |" in fast
    assert "| never run (missing) | 0.25 | missing |" in table
    div = next(ln for ln in table.splitlines() if ln.startswith("| diverging run (diverged) |"))
    assert "diverged (2 of 4 rounds: non-finite update in round 2)" in div and "ended at chance" not in div

    # the missing runs: in the inventory with the command that makes them, and in the differences
    inv = text[text.index("## Run inventory"):text.index("## Contents")]
    assert "| Alpha | 4 | 2 | 1 | 1 |" in inv and "| Beta | 2 | 0 | 0 | 2 |" in inv
    assert f"`hpcfl run job.toml --set codec.ratio=0.25 --out {runs}/alpha/gone.h5`" in inv
    assert f"--out {runs}/beta/runs/0001-ratio=0.2.h5" in inv
    assert "had no usable file: `gone` (missing)" in text
    assert "Stopped on non-finite updates (kept as results: they diverged): `div`" in text
    assert "- Structural difference one." in text

    # figures: drawn from the usable runs into img/reproduction beside the report; none for beta
    png = tmp / "docs" / "img" / "reproduction" / "alpha-acc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Alpha accuracy](img/reproduction/alpha-acc.png)" in text
    assert "Not in the figure (no usable file): gone." in text
    assert "Left out (diverged or ended at chance): div." in text  # xy leaves it out
    assert (tmp / "docs" / "img" / "reproduction" / "alpha-xy.png").exists()
    assert "**Beta accuracy**: not drawn, none of its runs has a usable file." in text
    assert not (tmp / "docs" / "img" / "reproduction" / "beta-acc.png").exists()

    # setup from the jobs; the run list gives every file and command
    assert "| `job.toml` | 4 | digits, iid | logreg (650 parameters) | 4 (4 per round) |" in text
    assert f"| fast | complete | `{runs}/alpha/fast.h5` | `hpcfl run job.toml --set codec.ratio=0.5 --out " in text


def test_generation_is_repeatable_and_picks_up_new_runs(setup):
    tmp, man, runs = setup
    out = tmp / "r.md"
    (tmp / "img").mkdir()
    (tmp / "img" / "old-figure.png").write_bytes(b"stale")
    first = rp.generate(man, runs, out, tmp / "img")
    assert sorted(p.name for p in (tmp / "img").iterdir()) == ["alpha-acc.png", "alpha-xy.png"]  # stale one gone
    write_run(runs / "alpha/gone.h5", tmp / "job.toml", ["codec.ratio=0.25"], [0.7, 0.8], [10, 10])
    second = rp.generate(man, runs, out, tmp / "img")
    assert len(second["missing"]) == len(first["missing"]) - 1
    assert "never run, final acc: 0.8000" in out.read_text()
    assert "![Alpha accuracy](img/alpha-acc.png)" in out.read_text()


def test_states_and_run_missing(setup, monkeypatch):
    tmp, man, runs = setup
    job = tmp / "job.toml"
    write_run(runs / "alpha/fast.h5", job, ["codec.ratio=0.5"], [0.3], [50], status="running")  # fresh
    m = rp.load_manifest(man)
    states = rp.resolve_runs(m, runs)
    assert states[("alpha", "fast")].state == "in progress"
    assert states[("alpha", "div")].state == "diverged" and states[("alpha", "div")].usable
    old = time.time() - rp.STALE_S - 60
    os.utime(runs / "alpha/fast.h5", (old, old))
    write_run(runs / "alpha/base.h5", job, [], [0.3], [50], status="failed: RuntimeError: boom")
    states = rp.resolve_runs(m, runs)
    assert states[("alpha", "fast")].state == "interrupted"
    base = states[("alpha", "base")]
    assert base.state == "failed" and base.detail.endswith("RuntimeError: boom")
    assert not states[("alpha", "base")].usable

    calls = []
    monkeypatch.setattr(rp.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    done = rp.run_missing(m, runs, echo=lambda s: None)
    got = {c[c.index("--out") + 1] for c in calls}
    # missing, interrupted and failed runs are made; the diverged one is a result and is not re-run
    assert got == {str(runs / p) for p in ("alpha/base.h5", "alpha/fast.h5", "alpha/gone.h5",
                                           "beta/runs/0000-ratio=0.1.h5", "beta/runs/0001-ratio=0.2.h5")}
    gone = next(c for c in calls if c[c.index("--out") + 1].endswith("gone.h5"))
    assert gone[3:] == ["run", "job.toml", "--set", "codec.ratio=0.25", "--out", str(runs / "alpha/gone.h5"),
                        "--overwrite", "--progress", "off"]
    assert len(done) == 5 and all(rc == 0 for _, rc in done)

    write_run(runs / "alpha/fast.h5", job, ["codec.ratio=0.5"], [0.3], [50], status="running")  # fresh again
    calls.clear()
    rp.run_missing(m, runs, echo=lambda s: None)
    assert not any(c[c.index("--out") + 1].endswith("fast.h5") for c in calls)  # being written: left alone


def test_run_file_that_differs_from_its_manifest_entry_is_flagged(setup):
    tmp, man, runs = setup
    other = json.loads(load_job(tmp / "job.toml", []).to_json())
    other["server"]["lr"] = 0.7
    other["log"]["progress"] = "off"  # log.* never counts
    write_run(runs / "alpha/base.h5", tmp / "job.toml", [], [0.5], [10], job_json=json.dumps(other))
    st = rp.resolve_runs(rp.load_manifest(man), runs)[("alpha", "base")]
    assert st.differs == ["server.lr = 0.7 (manifest: 0.1)"]
    text_path = tmp / "r.md"
    rp.generate(man, runs, text_path)
    assert "- `base`: the run file's job differs from the manifest's: server.lr = 0.7 (manifest: 0.1)." \
        in text_path.read_text()


def test_grid_expansion_matches_sweep_names():
    specs = rp._expand_run({"id": "{model}-R{bits}-M{m}", "label": "{model} R={bits}", "job": "jobs/{model}.toml",
                            "grid": [["model", ["mlp", "cnn"]], ["codec.bits", ["1", "2"]],
                                     ["codec.m", ["0.0", "1.0"]]],
                            "set": ["server.lr=0.4"], "out": "{model}/runs/{i}-bits={bits}_m={m}.h5"}, "t")
    assert len(specs) == 8
    s = specs[5]  # model cnn, bits 1, m 1.0: the point's index counts only the dotted (override) axes
    assert (s.id, s.label, s.job, s.out) == ("cnn-R1-M1.0", "cnn R=1", "jobs/cnn.toml", "cnn/runs/0001-bits=1_m=1.0.h5")
    assert s.sets == ("codec.bits=1", "codec.m=1.0", "server.lr=0.4")
    with pytest.raises(UsageError, match=r"\{x\} is not a grid axis"):
        rp._expand_run({"id": "a{x}", "job": "j", "out": "o"}, "t")


@pytest.mark.parametrize("edit, message", [
    (('tag = "CODE"', 'tag = "PAPER"'), "tag 'PAPER' is not one of"),
    (('ours = ["base:final"', 'ours = ["nope:final"'), "no run 'nope'"),
    (('ours = ["base:final"', 'ours = ["base:accuracy"'), "unknown metric 'accuracy'"),
    (('runs = ["b-*"]', 'runs = ["c-*"]'), "pattern 'c-\\*' matches no run"),
    (('kind = "mean_over"', 'kind = "median_over"'), "table kind 'median_over' unknown"),
    (('id = "fast"', 'id = "base"'), "run ids not unique: base"),
])
def test_manifest_errors_name_the_problem(tmp_path, edit, message):
    p = tmp_path / "m.toml"
    p.write_text(MANIFEST.replace(*edit).replace("JOB", "job.toml"))
    with pytest.raises(UsageError, match=message):
        rp.load_manifest(p)


def test_cli_list_and_generate(setup, capsys):
    from hpcfl.cli import main

    tmp, man, runs = setup
    assert main(["analyze", "reproduction", "--manifest", str(man), "--runs", str(runs), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.match(r"alpha\s+gone\s+missing$", ln) for ln in lines)
    assert any(re.match(r"alpha\s+div\s+diverged \(2 of 4 rounds", ln) for ln in lines)
    out = tmp / "out" / "rep.md"
    assert main(["analyze", "reproduction", "--manifest", str(man), "--runs", str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}: 3 runs used, 3 without a usable file" in err and "alpha/gone: missing" in err
    assert out.exists() and (tmp / "out" / "img" / "reproduction" / "alpha-acc.png").exists()
    assert main(["analyze", "reproduction", "--manifest", str(tmp / "none.toml"), "--runs", str(runs)]) == 2


KINDS = """
title = "Kinds"
spec = "methods.md"

[[method]]
key = "k"
title = "K: method-specific tables"

[[method.run]]
id = "q-R{bits}-M{m}"
job = "job.toml"
grid = [["codec.bits", ["1", "2"]], ["codec.m", ["0.0", "1.0"]]]
out = "q/{i}.h5"

[[method.run]]
id = "ref"
job = "job.toml"
out = "d/ref.h5"

[[method.run]]
id = "d{dim}"
job = "job.toml"
grid = [["codec.dim", ["250", "500", "1000"]]]
out = "d/{dim}.h5"

[[method.run]]
id = "{c}-b"
job = "job.toml"
grid = [["c", ["falcom", "sz3"]]]
out = "f/{c}.h5"

[[method.table]]
kind = "mwq_best_m"
name = "best"
runs = ["q-*"]

[[method.table]]
kind = "d_for_fraction"
name = "dd"
reference = "ref"
fraction = 0.9
groups = [["g", ["d*"]]]

[[method.table]]
kind = "falcom_vs_sz3"
name = "fs"
rows = [["b", "falcom-b", "sz3-b", ""]]
from_round = 2
"""


def test_method_kinds_by_hand(tmp_path, monkeypatch):
    from hpcfl.analysis.reproduction_kinds import TABLES

    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "job.toml", job_dict())
    man = tmp_path / "k.toml"
    man.write_text(KINDS)
    runs = tmp_path / "runs"
    for i, (bits, m, acc, status) in enumerate([("1", "0.0", 0.5, "complete"), ("1", "1.0", 0.7, "complete"),
                                                ("2", "0.0", 0.6, "complete"),
                                                ("2", "1.0", 0.1, "failed: NumericalFault: in round 1")]):
        write_run(runs / f"q/{i:04d}.h5", job, [f"codec.bits={bits}", f"codec.m={m}"], [0.3, acc], [10, 10],
                  status=status)
    write_run(runs / "d/ref.h5", job, [], [0.8], [10])
    for d, acc in (("250", 0.6), ("500", 0.75), ("1000", 0.9)):
        write_run(runs / f"d/{d}.h5", job, [f"codec.dim={d}"], [acc], [10])
    slots = [["conv", [2, 1, 3, 3], "lossy"], ["b", [2], "dense"]]  # 18 conv weights: 72 raw bytes per client
    for c, ratios in (("falcom", [2, 2, 4, 4]), ("sz3", [2, 2, 2, 2])):
        write_run(runs / f"f/{c}.h5", job, [], [0.5] * 4, [100] * 4, slots=slots,
                  stats=[(r, "ratio", float(v)) for r, v in enumerate(ratios)])
    m = rp.load_manifest(man).methods[0]
    states = rp.resolve_runs(rp.load_manifest(man), runs)
    ctx = rp.Context(m, {r.id: states[("k", r.id)] for r in m.runs}, tmp_path, "img", {})
    tables = {t["kind"]: TABLES[t["kind"]](ctx, t) for t in m.tables}

    assert "| 1 | 1 | 0.7000 / 0.5000 | 0.5000 / 0.4000 | — |" in tables["mwq_best_m"]  # last 5 = mean of both evals
    assert "| 2 | 0 | 0.6000 / 0.4500 | 0.6000 / 0.4500 | M=1 (diverged) |" in tables["mwq_best_m"]
    assert ctx.values["best"] == "R=1: M=1 (0.7000 vs M=0 0.5000); R=2: M=0 (0.6000 vs M=0 0.6000)"

    assert "| g | 0.7200 | 500 (0.7500) | d=250: 0.6000, d=500: 0.7500, d=1000: 0.9000 |" in tables["d_for_fraction"]
    assert ctx.values["dd.g"] == "g: d = 500 (0.7500 ≥ 0.9 × 0.8000)"

    # conv ratio over rounds >= 2: FalCom 4, SZ3 2; the last quarter (round 3): the same
    assert "| b | 4.000 | 2.000 | **2.000** | 3–3 | **2.000** | — | 0.5000 / 0.5000 |" in tables["falcom_vs_sz3"]
    assert ctx.values["fs.all"] == "up to 2.000× SZ3 (b, rounds ≥ 2)"


COMM = """
title = "Comm"
spec = "methods.md"

[[method]]
key = "f"
title = "F: FalCom's communication table"

[[method.run]]
id = "identity"
job = "job.toml"
out = "f/identity.h5"

[[method.run]]
id = "falcom-1e-2"
job = "job.toml"
out = "f/falcom-1e-2.h5"

[[method.run]]
id = "falcom-1e-2-r80"
job = "job.toml"
out = "f/falcom-1e-2-r80.h5"

[[method.table]]
kind = "falcom_comm"
name = "fc"
reference = "identity"
runs = ["identity", "falcom-1e-*"]
bandwidths = [8e3, 80e3]
latency_ms = 500.0
"""


def test_falcom_comm_compares_per_round_means_across_run_lengths(tmp_path, monkeypatch):
    """A 4-round run against a 2-round reference: the reduction must come from per-round means. With
    totals (the old table) the longer run looked no better than uncompressed: 1 - 4 * 0.75 / (2 * 1.5) = 0."""
    from hpcfl.analysis.reproduction_kinds import TABLES

    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "job.toml", job_dict())
    (tmp_path / "c.toml").write_text(COMM)
    runs = tmp_path / "runs"

    def run(name, n, msg, logged=None):
        # every client sends `msg` bytes: at 8 kbit/s + 0.5 s latency a round's uplink is 0.5 + msg / 1000 s
        write_run(runs / f"f/{name}.h5", job, [], [0.5] * n, [C * msg] * n, slots=[["w", [10], "lossy"]],
                  clients_extra={"message_bytes": np.full(C, msg), "encode_s": np.full(C, 0.01)},
                  rounds_extra={"decode_s": 0.0, "gather_s": 0.002,
                                **({"modelled_uplink_s": logged} if logged is not None else {})})

    run("identity", 2, 1000)
    run("falcom-1e-2", 2, 250)
    run("falcom-1e-2-r80", 4, 250, logged=0.75)
    man = rp.load_manifest(tmp_path / "c.toml")
    m = man.methods[0]
    states = rp.resolve_runs(man, runs)
    ctx = rp.Context(m, {r.id: states[("f", r.id)] for r in m.runs}, tmp_path, "img", {})
    table = TABLES["falcom_comm"](ctx, m.tables[0])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert set(rows) == {"identity", "falcom-1e-2", "falcom-1e-2-r80"}
    assert [rows[k][1] for k in ("identity", "falcom-1e-2", "falcom-1e-2-r80")] == ["2", "2", "4"]
    # modelled uplink per round at 8 kbit/s and 80 kbit/s, in ms, then the reduction
    assert rows["identity"][3:6] == ["1.5e+03", "600", "0.0%"]
    assert rows["falcom-1e-2"][3:6] == rows["falcom-1e-2-r80"][3:6] == ["750", "525", "50.0%"]
    # the run file's own modelled_uplink_s where it was logged, and the measured gather_s, per round
    assert rows["falcom-1e-2-r80"][8:10] == ["750", "2"] and rows["identity"][8:10] == ["—", "2"]
    assert ctx.values["fc.reduction"].startswith("50.0%–50.0% modelled link time per round at 0.008 Mbit/s, "
                                                 "latency 500 ms (2 FalCom runs")
    assert ctx.values["fc.reduction_codec"].startswith("+49.")  # +codec: 10 ms encode on 1.51 s and 0.76 s


def test_falcom_manifest_compares_per_round():
    """docs/reproduction.toml: the communication table takes runs of 40 and 80 rounds (the glob
    falcom-1e-* matches falcom-1e-2-r80), so it must be a per-round kind, at the jobs' link latency."""
    import tomllib

    man = rp.load_manifest(Path(__file__).resolve().parents[1] / "docs" / "reproduction.toml")
    fal = next(m for m in man.methods if m.key == "falcom")
    comm = next(t for t in fal.tables if t["kind"] == "falcom_comm")
    ids = [r.id for r in fal.runs]
    assert "falcom-1e-2-r80" in ids and any(p == "falcom-1e-*" for p in comm["runs"])
    job = tomllib.loads((Path(__file__).resolve().parents[1] / "jobs" / "digits-resnet-falcom-c10.toml").read_text())
    assert job["link"]["mode"] == "model" and comm["latency_ms"] == job["link"]["latency_ms"]
    assert comm["bandwidths"][0] == job["link"]["uplink_mbps"] * 1e6
