"""hpcfl.results.compare / plots / merge and `hpcfl report` / `hpcfl merge` on synthetic run files.

Every number checked here is computed by hand from the rows written below.
"""

from __future__ import annotations

import csv
import io
import json
import math

import h5py
import numpy as np
import pytest

from hpcfl.results import load_run
from hpcfl.results.compare import (Entry, chance_accuracy, collect, compare, default_target, format_table,
                                   per_bit_accuracy, rounds_to_target, time_split, to_csv, to_json_lines,
                                   uplink_to_target, varying_params)
from hpcfl.results.writer import RunLog

NAN = math.nan
C, W = 4, 3
# per run: accuracy, uplink bytes, worker compute_s (ranks 1 and 2) per round
RUN_A = {"acc": [0.2, NAN, 0.5, 0.6], "up": [100, 100, 200, 200],
         "compute": [(0.03, 0.05), (0.04, 0.02), (0.06, 0.01), (0.02, 0.02)], "ratio": 0.1}
RUN_B = {"acc": [0.3, 0.4, 0.45], "up": [50, 50, 50], "compute": [(0.01, 0.02)] * 3, "ratio": 0.01}
PH = {"bcast_s": 0.001, "gather_s": 0.002, "records_s": 0.0005, "decode_s": 0.003, "aggregate_s": 0.0015,
      "eval_s": 0.004, "overhead_s": 0.001}


def write(path, spec, dataset="digits", name="cmp", status="complete"):
    R = len(spec["acc"])
    job = {"run": {"name": name, "rounds": R, "seed": 1}, "data": {"dataset": dataset, "n_clients": C,
           "synthetic_classes": 5}, "model": {"name": "logreg"}, "codec": {"id": "topk", "ratio": spec["ratio"]}}
    attrs = {"job_json": json.dumps(job), "codec_json": json.dumps({"codec": job["codec"]}), "world_size": W,
             "job_hash": "x"}
    log = RunLog(path, attrs=attrs, n_clients=C, n_ranks=W, overwrite=True)
    wall = 0.0
    for r in range(R):
        comp = max(spec["compute"][r])
        round_s = sum(PH.values()) + comp
        wall += round_s
        server = {"round": r, "accuracy": spec["acc"][r], "loss": 1.0, "uplink_bytes": spec["up"][r],
                  "payload_bytes": spec["up"][r] - 10, "header_bytes": 10, "raw_bytes": 400, "downlink_bytes": 80,
                  "compression_ratio": 400 / spec["up"][r], "round_s": round_s, "wait_s": comp + 0.0007,
                  "wall_time": wall, "critical_s": round_s - PH["overhead_s"], **PH}
        ranks = {"compute_s": np.array([0.0, *spec["compute"][r]])}
        log.append_round(server, {"participated": np.ones(C, np.uint8)}, ranks)
    log.close(status)
    return path


@pytest.fixture
def runs(tmp_path):
    a = write(tmp_path / "runs" / "a.h5", RUN_A)
    b = write(tmp_path / "runs" / "b.h5", RUN_B)
    return a, b


def test_metrics_by_hand(runs):
    a, b = (load_run(p) for p in runs)
    assert chance_accuracy(a) == 0.1
    assert per_bit_accuracy(a) == pytest.approx((0.6 - 0.1) / (8 * 600))
    assert per_bit_accuracy(b) == pytest.approx((0.45 - 0.1) / (8 * 150))
    assert default_target([a, b]) == 0.45
    assert rounds_to_target(a, 0.45) == 3 and uplink_to_target(a, 0.45) == 400  # round index 1 not evaluated
    assert rounds_to_target(a, 0.2) == 1 and uplink_to_target(a, 0.2) == 100
    assert rounds_to_target(b, 0.45) == 3 and uplink_to_target(b, 0.45) == 150
    assert rounds_to_target(b, 0.5) is None and uplink_to_target(b, 0.5) is None
    ts = time_split(a)
    assert ts["compute_s"] == pytest.approx(0.05 + 0.04 + 0.06 + 0.02)  # the slowest worker per round
    assert ts["decode_s"] == pytest.approx(4 * 0.003)
    assert sum(ts.values()) == pytest.approx(float(a.rounds["round_s"].sum()))  # a partition of the round
    assert varying_params([a, b]) == ["codec.ratio", "run.rounds"]


def test_per_bit_accuracy_synthetic_classes(tmp_path):
    r = load_run(write(tmp_path / "s.h5", RUN_B, dataset="synthetic"))
    assert chance_accuracy(r) == 0.2
    assert per_bit_accuracy(r) == pytest.approx((0.45 - 0.2) / 1200)


def test_rows_table_csv_json(runs):
    entries, skipped = collect(runs)
    assert not skipped
    assert [e.label for e in entries] == ["ratio=0.1 rounds=4", "ratio=0.01 rounds=3"]
    rows = compare(entries, 0.45)
    ra, rb = rows
    assert ra["final_accuracy"] == 0.6 and ra["best_accuracy"] == 0.6 and ra["best_round"] == 4
    assert ra["uplink_bytes"] == 600 and ra["downlink_bytes"] == 320 and rb["uplink_bytes"] == 150
    assert ra["rounds_to_target"] == 3 and ra["uplink_bytes_to_target"] == 400
    assert ra["bits_per_param"] == pytest.approx(32 * 600 / 1600) and rb["bits_per_param"] == pytest.approx(4.0)
    assert ra["params"] == {"codec.ratio": 0.1, "run.rounds": 4} and ra["world_size"] == W
    assert ra["wall_s_to_target"] == pytest.approx(load_run(runs[0]).rounds["wall_time"][2])

    table = format_table(rows, 0.45)
    assert table.splitlines()[0] == "2 runs; target accuracy 0.45"
    assert "ratio=0.1 rounds=4" in table and "rounds to 0.45" in table and "compute" in table

    text = to_csv(compare(entries, 0.5))
    got = list(csv.DictReader(io.StringIO(text)))
    assert [g["label"] for g in got] == ["ratio=0.1 rounds=4", "ratio=0.01 rounds=3"]
    assert got[0]["codec.ratio"] == "0.1" and got[1]["run.rounds"] == "3"
    assert got[0]["rounds_to_target"] == "3" and got[0]["uplink_bytes_to_target"] == "400"
    assert got[1]["rounds_to_target"] == "" and got[1]["uplink_bytes_to_target"] == ""  # not reached
    assert float(got[1]["per_bit_accuracy"]) == pytest.approx(0.35 / 1200)
    assert float(got[0]["time_compute_s"]) == pytest.approx(0.17)
    assert sum(float(got[0][f"share_{p}"]) for p in ("bcast", "compute", "gather", "records", "decode",
                                                      "aggregate", "eval", "overhead")) == pytest.approx(1.0)
    assert "not reached" in format_table(compare(entries, 0.5), 0.5)

    lines = to_json_lines(rows).splitlines()
    assert len(lines) == 2
    d = json.loads(lines[1], parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert d["label"] == "ratio=0.01 rounds=3" and d["rounds_to_target"] == 3 and d["phases_s"]["wait_s"] > 0


def test_collect_directories(tmp_path, runs):
    (tmp_path / "runs" / "junk.h5").write_bytes(b"no")
    with h5py.File(tmp_path / "runs" / "other.h5", "w") as f:
        f["x"] = 1
    entries, skipped = collect([tmp_path / "runs"])
    assert [e.run.path.name for e in entries] == ["a.h5", "b.h5"] and len(skipped) == 2
    # a sweep directory: points in order, labelled by their grid values, missing runs reported
    sw = tmp_path / "sw"
    (sw / "runs").mkdir(parents=True)
    write(sw / "runs" / "0001-ratio=0.01.h5", RUN_B)
    write(sw / "runs" / "0000-ratio=0.1.h5", RUN_A)
    points = [{"index": i, "name": n, "label": f"ratio={v}", "values": {"codec.ratio": v}, "run": f"runs/{n}.h5"}
              for i, (n, v) in enumerate([("0000-ratio=0.1", 0.1), ("0001-ratio=0.01", 0.01), ("0002-ratio=0.001",
                                                                                           0.001)])]
    (sw / "sweep.json").write_text(json.dumps({"version": 1, "points": points}))
    entries, skipped = collect([sw])
    assert [(e.label, e.name, e.params) for e in entries] == [("ratio=0.1", "0000-ratio=0.1", {"codec.ratio": 0.1}),
                                                              ("ratio=0.01", "0001-ratio=0.01",
                                                               {"codec.ratio": 0.01})]
    assert len(skipped) == 1 and "not run yet" in skipped[0]


def test_plots_are_pngs(tmp_path, runs):
    from hpcfl.results.plots import FIGURES, plot_all

    entries, _ = collect(runs)
    paths = plot_all(entries, tmp_path / "fig", target=0.45)
    assert [p.name for p in paths] == list(FIGURES)
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p
    # many runs: a legend sorted by final value instead of direct labels
    many = [Entry(load_run(runs[i % 2]), label=f"run {i}") for i in range(14)]
    for p in plot_all(many, tmp_path / "many"):
        assert p.stat().st_size > 10_000


def test_cli_report_and_merge(tmp_path, runs, capsys):
    from hpcfl.cli import main
    from hpcfl.results.merge import read_summary

    d = tmp_path / "runs"
    assert main(["report", str(d), "--csv", "--target", "0.45", "--plot", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out.out)))
    assert [r["rounds_to_target"] for r in rows] == ["3", "3"]
    assert "wrote" in out.err and len(list((tmp_path / "fig").glob("*.png"))) == 4
    assert main(["report", str(runs[0]), str(runs[1])]) == 0
    assert capsys.readouterr().out.startswith("2 runs; target accuracy 0.45")
    assert main(["report", str(runs[1]), "--target", "0.4"]) == 0
    assert "target accuracy 0.4: after 2 rounds, 100 uplink bytes" in capsys.readouterr().out
    assert main(["report", str(runs[1]), "--target", "2"]) == 2

    assert main(["merge", str(d), "-o", str(tmp_path / "s.h5")]) == 0
    t = read_summary(tmp_path / "s.h5")
    assert len(t) == 2 and t["uplink_bytes"].tolist() == [600.0, 150.0]
    assert t["codec.ratio"].tolist() == [0.1, 0.01] and t["label"][0].decode() == "ratio=0.1 rounds=4"
    assert t["rounds_to_target"].tolist() == [3.0, 3.0]  # default target: 0.45
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs["target_accuracy"] == 0.45
        assert f["runs/a/rounds"][:].tobytes() == load_run(runs[0]).rounds.tobytes()
        assert json.loads(f["runs/b"].attrs["job_json"])["codec"]["ratio"] == 0.01
    assert main(["merge", str(d), "-o", str(tmp_path / "s.csv"), "--target", "0.5"]) == 0
    got = list(csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text())))
    assert [g["rounds_to_target"] for g in got] == ["3", ""]
    assert main(["merge", str(d), "-o", str(tmp_path / "s.txt")]) == 2


# ------------------------------------------------------------------ per-bit accuracy in the report

# three top-k runs that differ only in ratio (the rate), one with a logged initial accuracy
RATES = {"r1": {"acc": [0.3, NAN, 0.5], "up": [60, 60, 60], "compute": [(0.01, 0.01)] * 3, "ratio": 0.01},
         "r2": {"acc": [0.4, 0.5, 0.7], "up": [110, 110, 110], "compute": [(0.01, 0.01)] * 3, "ratio": 0.05},
         "r3": {"acc": [0.5, 0.6, 0.75], "up": [210, 210, 210], "compute": [(0.01, 0.01)] * 3, "ratio": 0.1}}


@pytest.fixture
def rate_runs(tmp_path):
    paths = [write(tmp_path / "rates" / f"{k}.h5", spec) for k, spec in RATES.items()]
    with h5py.File(paths[0], "a") as f:
        f.attrs["initial_accuracy"] = 0.12
    return paths


def _by_hand(path):
    """PBA_total and its per-round series straight from the HDF5 arrays (not through hpcfl.results)."""
    with h5py.File(path) as f:
        acc = f["rounds"]["accuracy"].astype(float)
        bits = f["rounds"]["uplink_bytes"].astype(float) * 8
        raw = f["rounds"]["raw_bytes"].astype(float)
        a0 = float(f.attrs["initial_accuracy"]) if "initial_accuracy" in f.attrs else 0.1  # digits: 10 classes
    ev = np.flatnonzero(~np.isnan(acc))
    cum = np.cumsum(bits)[ev]
    prev_acc = np.concatenate([[a0], acc[ev][:-1]])
    prev_bits = np.concatenate([[0.0], cum[:-1]])
    return {"acc0": a0, "total": (acc[ev][-1] - a0) / bits.sum(), "round": ev.tolist(),
            "per_round": ((acc[ev] - prev_acc) / (cum - prev_bits)).tolist(),
            "cumulative": ((acc[ev] - a0) / cum).tolist(),
            "bpe": 32 * bits.sum() / 8 / raw.sum(), "final": acc[ev][-1]}


def test_report_rows_carry_both_per_bit_definitions(rate_runs):
    entries, _ = collect(rate_runs)
    rows = compare(entries)
    hand = [_by_hand(p) for p in rate_runs]
    for r, h in zip(rows, hand):
        pb = r["per_bit"]
        assert r["acc0"] == pytest.approx(h["acc0"]) and pb["acc0"] == pytest.approx(h["acc0"])
        assert r["per_bit_accuracy"] == pytest.approx(h["total"]) and pb["total"] == pytest.approx(h["total"])
        assert pb["round"] == h["round"]
        np.testing.assert_allclose(pb["per_round"], h["per_round"])
        np.testing.assert_allclose(pb["cumulative"], h["cumulative"])
        assert pb["bits_per_entry"] == pytest.approx(h["bpe"]) == pytest.approx(r["bits_per_param"])
        assert "Acc_0" in pb["definition_total"] and "b(R')" in pb["definition_marginal"]
    assert [r["acc0_source"] for r in rows] == ["logged", "chance", "chance"]
    assert rows[0]["per_bit"]["acc0_source"].startswith("logged")
    # marginal: the runs differ only in ratio, so each is measured against the next lower rate
    assert [r["per_bit_marginal_vs"] for r in rows] == ["0 bits", rows[0]["label"], rows[1]["label"]]
    assert rows[0]["per_bit_marginal"] == pytest.approx((hand[0]["final"] - 0.12) / hand[0]["bpe"])
    for i in (1, 2):
        want = (hand[i]["final"] - hand[i - 1]["final"]) / (hand[i]["bpe"] - hand[i - 1]["bpe"])
        assert rows[i]["per_bit_marginal"] == pytest.approx(want)
        m = rows[i]["per_bit"]["marginal"]
        assert m["rate_param"] == "ratio" and m["d_acc"] == pytest.approx(hand[i]["final"] - hand[i - 1]["final"])
    # one run alone: against 0 bits at its Acc_0
    alone = compare([entries[1]])[0]
    assert alone["per_bit_marginal_vs"] == "0 bits"
    assert alone["per_bit_marginal"] == pytest.approx((hand[1]["final"] - 0.1) / hand[1]["bpe"])
    # runs that differ in more than the codec (run.rounds here) are not compared with each other
    a, b = compare(collect([rate_runs[0]])[0] + [Entry(load_run(write(rate_runs[0].parent / "long.h5", RUN_A)))])
    assert a["per_bit_marginal_vs"] == b["per_bit_marginal_vs"] == "0 bits"


def test_report_per_bit_table_csv_json(rate_runs):
    entries, _ = collect(rate_runs)
    rows = compare(entries)
    table = format_table(rows)
    i = table.index("per-bit accuracy")
    per_bit = table[i:].splitlines()
    assert per_bit[1].split()[:4] == ["run", "Acc0", "from", "acc/Mbit"]
    assert per_bit[3].split()[1:3] == ["0.1200", "logged"] and per_bit[4].split()[1:3] == ["0.1000", "chance"]
    assert f"{rows[2]['per_bit_marginal']:+.4g}" in per_bit[5] and rows[1]["label"] in per_bit[5]
    assert "chance 1/classes for an" in table and "1/classes) per Mbit" not in table

    got = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [g["acc0_source"] for g in got] == ["logged", "chance", "chance"]
    assert float(got[0]["acc0"]) == 0.12 and got[0]["per_bit_marginal_vs"] == "0 bits"
    assert float(got[2]["per_bit_marginal"]) == pytest.approx(rows[2]["per_bit_marginal"])
    assert float(got[2]["per_bit_marginal_d_acc"]) == pytest.approx(0.05)
    d = [json.loads(line) for line in to_json_lines(rows).splitlines()]
    assert d[0]["per_bit"]["round"] == [0, 2] and d[0]["per_bit"]["accuracy"] == [0.3, 0.5]
    assert d[0]["per_bit"]["bits_cum"] == [480.0, 1440.0]
    assert d[0]["per_bit"]["per_round"] == pytest.approx([(0.3 - 0.12) / 480, 0.2 / 960])


def test_cli_single_run_per_bit_block(rate_runs, capsys):
    from hpcfl.cli import main

    h = _by_hand(rate_runs[0])
    assert main(["report", str(rate_runs[0])]) == 0
    out = capsys.readouterr().out
    block = out[out.index("per-bit accuracy"):].splitlines()
    assert block[0].startswith("per-bit accuracy (methods.md §4.5): Acc0 0.1200 (logged")
    assert block[1].split()[:2] == ["total:", f"{h['total'] * 1e6:.4g}"]
    assert block[2].split()[:2] == ["marginal:", f"{(h['final'] - 0.12) / h['bpe']:+.4g}"] and "0 bits" in block[2]
    assert f"round 1 {h['per_round'][0] * 1e6:.4g}, round 3 {h['per_round'][1] * 1e6:.4g}" in block[3]
    assert main(["report", str(rate_runs[1])]) == 0
    assert "Acc0 0.1000 (chance 1/classes" in capsys.readouterr().out
    assert main(["report", str(rate_runs[0]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(d["per_bit"]["cumulative"], h["cumulative"])
    assert d["acc0_source"] == "logged" and d["per_bit_marginal_vs"] == "0 bits"
