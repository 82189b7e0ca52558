"""hpcfl.results.perbit: both per-bit accuracy definitions, by hand, on synthetic run files."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from hpcfl.results import load_run
from hpcfl.results.perbit import (acc0_kind, bits_per_entry, initial_accuracy, marginal_per_bit, markdown_table,
                                  nominal_rate, per_bit_accuracy, rate_params)
from hpcfl.results.writer import RunLog

NAN = math.nan
C = 2


def write(path, acc, up, *, codec=None, dataset="digits", header=10, raw=400, seed=1):
    """A run file with the given accuracies and uplink bytes per round (payload = uplink - header)."""
    codec = codec or {"id": "mwq", "bits": 2, "m": 0.0}
    job = {"run": {"name": "pb", "rounds": len(acc), "seed": seed}, "data": {"dataset": dataset, "n_clients": C,
           "synthetic_classes": 5}, "model": {"name": "logreg"}, "codec": codec}
    attrs = {"job_json": json.dumps(job), "codec_json": json.dumps({"codec": codec}), "world_size": 2,
             "job_hash": "x"}
    log = RunLog(path, attrs=attrs, n_clients=C, n_ranks=2, overwrite=True)
    for r, (a, u) in enumerate(zip(acc, up)):
        log.append_round({"round": r, "accuracy": a, "uplink_bytes": u, "payload_bytes": u - header,
                          "header_bytes": header, "raw_bytes": raw}, {"participated": np.ones(C, np.uint8)},
                         {"compute_s": np.zeros(2)})
    log.close("complete")
    return load_run(path)


def test_total_and_per_round_by_hand(tmp_path):
    run = write(tmp_path / "a.h5", [0.3, NAN, 0.5, 0.55], [100, 100, 200, 300])
    p = per_bit_accuracy(run)
    assert p["acc0"] == 0.1 and p["acc0_source"].startswith("chance") and acc0_kind(p["acc0_source"]) == "chance"
    assert p["total"] == pytest.approx((0.55 - 0.1) / (8 * 700))
    assert p["bits_total"] == 8 * 700 and p["acc_final"] == 0.55
    assert list(p["rounds"]) == [0, 2, 3]  # round 1 was not evaluated: its bits count toward round 2
    np.testing.assert_allclose(p["per_round"], [0.2 / 800, 0.2 / (8 * 300), 0.05 / (8 * 300)])
    np.testing.assert_allclose(p["cumulative"], [0.2 / 800, 0.4 / (8 * 400), 0.45 / (8 * 700)])
    np.testing.assert_allclose(p["accuracy"], [0.3, 0.5, 0.55])
    np.testing.assert_allclose(p["bits_cum"], [800, 8 * 400, 8 * 700])
    # the per-round values, weighted by their bits, add up to the total
    steps = np.diff(np.concatenate([[0], np.cumsum(np.array([100, 100, 200, 300]) * 8)[p["rounds"]]]))
    assert float((p["per_round"] * steps).sum() / steps.sum()) == pytest.approx(p["total"])
    q = per_bit_accuracy(run, bits="payload", acc0=0.0)
    assert q["total"] == pytest.approx(0.55 / (8 * 660)) and q["acc0_source"] == "given"
    assert "Acc_0" in p["definition"]
    with pytest.raises(ValueError):
        per_bit_accuracy(run, bits="header")


def test_bits_per_entry_and_acc0_sources(tmp_path):
    run = write(tmp_path / "a.h5", [0.3, 0.4], [60, 40], raw=800, dataset="synthetic")
    assert bits_per_entry(run, "uplink") == pytest.approx(32 * 100 / 1600)
    assert bits_per_entry(run, "payload") == pytest.approx(32 * 80 / 1600)
    assert initial_accuracy(run)[0] == 0.2  # synthetic_classes = 5
    with h5py.File(run.path, "a") as f:
        f.attrs["initial_accuracy"] = 0.25
    run2 = load_run(run.path)
    a0, src = initial_accuracy(run2)
    assert a0 == 0.25 and src.startswith("logged")
    assert per_bit_accuracy(run2)["total"] == pytest.approx((0.4 - 0.25) / 800)


def test_nothing_evaluated_or_sent_is_nan(tmp_path):
    p = per_bit_accuracy(write(tmp_path / "a.h5", [NAN, NAN], [10, 10]))
    assert math.isnan(p["total"]) and p["rounds"].size == 0
    p = per_bit_accuracy(write(tmp_path / "b.h5", [0.5], [0], header=0))
    assert math.isnan(p["total"]) and math.isnan(p["per_round"][0])


def test_marginal_across_rates_and_groups(tmp_path):
    runs = []
    # mwq at M = 0 and M = 2, rates 1..3 (uplink = 100 R + 16 bytes; raw 400, one round)
    for m, accs in ((0.0, (0.5, 0.7, 0.75)), (2.0, (0.6, 0.72, 0.74))):
        for R, a in zip((1, 2, 3), accs):
            runs.append(write(tmp_path / f"m{m}-r{R}.h5", [a], [100 * R + 16],
                              codec={"id": "mwq", "bits": R, "m": m}))
    runs.append(write(tmp_path / "qsgd.h5", [0.65], [210], codec={"id": "qsgd", "levels": 3}))
    rows = marginal_per_bit(runs[::-1])  # order of the input does not matter
    assert [(w["label"], w["rate"]) for w in rows[:3]] == [("mwq m=0.0", 1), ("mwq m=0.0", 2), ("mwq m=0.0", 3)]
    r0 = rows[:3]
    bpe = [32 * (100 * R + 16) / 400 for R in (1, 2, 3)]  # uplink: headers and side info included
    assert [w["bits_per_entry"] for w in r0] == pytest.approx(bpe)
    assert r0[0]["d_acc"] == pytest.approx(0.5 - 0.1) and r0[0]["d_rate"] == 1
    assert r0[0]["marginal"] == pytest.approx(0.4 / bpe[0])  # the first bit: from Acc_0 at 0 bits
    assert r0[1]["d_acc"] == pytest.approx(0.2) and r0[1]["marginal"] == pytest.approx(0.2 / (bpe[1] - bpe[0]))
    assert r0[2]["marginal"] == pytest.approx(0.05 / (bpe[2] - bpe[1]))
    m2 = [w for w in rows if w["label"] == "mwq m=2.0"]
    assert [w["d_acc"] for w in m2] == pytest.approx([0.5, 0.12, 0.02])
    q = next(w for w in rows if w["label"].startswith("qsgd"))
    assert q["rate"] == round(32 * 200 / 400, 2) and nominal_rate(runs[-1]) == (16.0, None)
    assert len({w["group"] for w in rows}) == 3
    assert all(w["pba_total"] == pytest.approx((w["acc_final"] - 0.1) / (8 * (100 * w["rate"] + 16)))
               for w in rows if w["label"].startswith("mwq"))
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| mwq m=2.0 | 2 | 0.7200 |" in table


def test_marginal_groups_by_setup_and_custom_keys(tmp_path):
    a = write(tmp_path / "a.h5", [0.5], [100], seed=1)
    b = write(tmp_path / "b.h5", [0.6], [200], seed=2, codec={"id": "mwq", "bits": 3, "m": 0.0})
    rows = marginal_per_bit([a, b])
    assert len({w["group"] for w in rows}) == 2  # another seed is another experiment
    rows = marginal_per_bit([a, b], group=lambda r: "all", rate=lambda r: r.codec["codec"]["bits"])
    assert [w["rate"] for w in rows] == [2, 3] and rows[1]["d_acc"] == pytest.approx(0.1)


def test_marginal_rows_name_what_they_are_measured_against(tmp_path):
    runs = [write(tmp_path / f"r{R}.h5", [a], [100 * R + 16], codec={"id": "mwq", "bits": R, "m": 0.0})
            for R, a in ((3, 0.75), (1, 0.5), (2, 0.7))]
    with h5py.File(runs[1].path, "a") as f:  # the lowest rate has a logged Acc_0
        f.attrs["initial_accuracy"] = 0.08
    runs[1] = load_run(runs[1].path)
    rows = marginal_per_bit(runs)
    assert [w["index"] for w in rows] == [1, 2, 0]  # sorted by rate; index = position in the input
    assert [w["vs_index"] for w in rows] == [None, 1, 2]
    assert acc0_kind(rows[0]["acc0_source"]) == "logged" and rows[0]["d_acc"] == pytest.approx(0.5 - 0.08)
    bpe = 32 * 116 / 400
    assert rows[0]["marginal"] == pytest.approx(0.42 / bpe)


def test_auto_rate_groups_codecs_without_bits(tmp_path):
    topk = [write(tmp_path / f"t{r}.h5", [a], [u], codec={"id": "topk", "ratio": r})
            for r, a, u in ((0.1, 0.6, 300), (0.01, 0.4, 60), (0.05, 0.55, 160))]
    two = [write(tmp_path / f"q{i}.h5", [a], [u], codec={"id": "qsgd", "levels": lv, "norm": nm})
           for i, (lv, nm, a, u) in enumerate(((1, "l2", 0.5, 100), (3, "linf", 0.6, 200)))]
    mwq = [write(tmp_path / f"m{R}.h5", [a], [100 * R + 16], codec={"id": "mwq", "bits": R, "m": 1.0})
           for R, a in ((1, 0.5), (2, 0.7))]
    runs = topk + two + mwq
    assert rate_params(runs) == ["ratio"] * 3 + [None, None] + ["bits", "bits"]
    # default: a codec without bits is grouped with identical configs only
    assert all(w["vs_index"] is None for w in marginal_per_bit(topk))
    rows = {w["index"]: w for w in marginal_per_bit(runs, auto_rate=True)}
    bpe = {i: 32 * (u - 10) / 400 for i, u in enumerate((300, 60, 160))}  # measured payload bits per entry
    assert [rows[i]["rate"] for i in range(3)] == [round(bpe[0], 2), round(bpe[1], 2), round(bpe[2], 2)]
    assert [rows[i]["vs_index"] for i in range(3)] == [2, None, 1]  # ordered by measured bits
    up = {i: 32 * u / 400 for i, u in enumerate((300, 60, 160))}  # the marginal uses uplink bits per entry
    assert rows[2]["marginal"] == pytest.approx((0.55 - 0.4) / (up[2] - up[1]))
    assert rows[0]["marginal"] == pytest.approx((0.6 - 0.55) / (up[0] - up[2]))
    assert rows[1]["marginal"] == pytest.approx((0.4 - 0.1) / up[1])
    assert rows[3]["vs_index"] is None and rows[4]["vs_index"] is None  # two qsgd parameters vary: no rate
    assert rows[6]["vs_index"] == 5 and rows[6]["rate"] == 2 and rows[6]["rate_param"] == "bits"
    assert rows[0]["rate_param"] == "ratio" and rows[0]["label"].startswith("topk")
