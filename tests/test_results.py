"""hpcfl.results: RunLog writer, load_run reader, summaries, and the report/schema commands."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from hpcfl.errors import UsageError
from hpcfl.results import load_run
from hpcfl.results.report import PHASES, format_summary, summarize
from hpcfl.results.schema import CLIENT_METRICS, META, RANK_METRICS, ROOT_ATTRS, ROUND_METRICS, SCHEMA_VERSION
from hpcfl.results.writer import RunLog

C, W = 4, 3
JOB = {"run": {"name": "restest", "rounds": 3}}
CODEC = {"codec": {"id": "fp16"}, "dense": {"id": "identity"}}


def attrs() -> dict:
    return {"job_json": json.dumps(JOB), "codec_json": json.dumps(CODEC), "seed": 11, "n_clients": C,
            "launcher": "self", "codec_hash": "00ff"}


def meta() -> dict:
    return {"client_rank": np.array([1, 2, 1, 2], dtype=np.int32),
            "client_train_samples": np.array([10, 20, 30, 40], dtype=np.int64),
            "hostnames": np.array([b"h0", b"h1", b"h1"])}


def round_data(r: int):
    part = np.array([1, 0, 1, 1] if r % 2 == 0 else [0, 1, 1, 0], dtype=np.uint8)
    server = {"round": r, "wall_time": 1.5 * (r + 1), "accuracy": 0.5 + 0.1 * r if r != 1 else math.nan,
              "loss": 2.0 - r, "n_participants": int(part.sum()), "uplink_bytes": 1000 + r,
              "payload_bytes": 900 + r, "header_bytes": 100, "raw_bytes": 4000, "downlink_bytes": 500,
              "round_s": 0.5 + r, "bcast_s": 0.1, "wait_s": 0.2 * r, "gather_s": 0.01, "decode_s": 0.05,
              "eval_s": 0.0 if r == 1 else 0.03}
    clients = {"participated": part, "train_s": np.where(part, 0.1 * (r + 1), np.nan),
               "encode_s": np.where(part, 0.01, np.nan), "decode_s": np.where(part, 0.002 * (r + 1), np.nan),
               "raw_bytes": part.astype(np.int64) * 400, "payload_bytes": part.astype(np.int64) * 300}
    ranks = {"bcast_s": np.array([0.0, 0.1, 0.2]) + r, "n_clients": np.array([0, 1, 2], dtype=np.int32)}
    return server, clients, ranks


def write_run(path, rounds: int = 3) -> None:
    with RunLog(path, attrs=attrs(), n_clients=C, n_ranks=W, meta=meta()) as log:
        for r in range(rounds):
            log.append_round(*round_data(r))
        log.set_round_value("log_s", 0.25)


def test_write_and_load(tmp_path):
    p = tmp_path / "sub" / "run.h5"
    write_run(p)
    run = load_run(p)
    assert run.path == p and run.n_rounds == 3 and run.status == "complete" and run.complete
    # attrs: ours plus the writer's own
    for k, v in attrs().items():
        assert run.attrs[k] == v and type(run.attrs[k]) is type(v), k
    assert run.attrs["schema_version"] == SCHEMA_VERSION and run.attrs["rounds_done"] == 3
    assert isinstance(run.attrs["created"], str) and run.attrs["created"].endswith("+00:00")
    assert run.job == JOB and run.codec == CODEC
    # /rounds: one field per metric, given values back exactly
    assert run.rounds.dtype.names == tuple(m.name for m in ROUND_METRICS)
    for r in range(3):
        server, clients, ranks = round_data(r)
        row = run.rounds[r]
        for k, v in server.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(row[k])
            else:
                assert row[k] == v, (r, k)
        for k, v in clients.items():
            np.testing.assert_array_equal(run.clients[k][r], v)
        for k, v in ranks.items():
            np.testing.assert_array_equal(run.ranks[k][r], v)
    assert set(run.clients) == {m.name for m in CLIENT_METRICS}
    assert set(run.ranks) == {m.name for m in RANK_METRICS}
    assert run.clients["train_s"].shape == (3, C) and run.ranks["bcast_s"].shape == (3, W)
    assert run.clients["participated"].dtype == np.uint8 and run.clients["payload_bytes"].dtype == np.int64
    # set_round_value touched only the last round
    assert math.isnan(run.rounds["log_s"][0]) and run.rounds["log_s"][2] == 0.25
    # meta
    assert set(run.meta) == {"client_rank", "client_train_samples", "hostnames"}
    for k, v in meta().items():
        np.testing.assert_array_equal(run.meta[k], v)


def test_fill_values(tmp_path):
    p = tmp_path / "fill.h5"
    with RunLog(p, attrs={}, n_clients=C, n_ranks=W) as log:
        log.append_round({"round": 0}, {}, {})
        log.append_round({}, {"train_s": np.array([1.0, 2.0, 3.0, 4.0])}, {})
    run = load_run(p)
    for m in ROUND_METRICS:
        v = run.rounds[m.name]
        if m.name == "round":
            assert v.tolist() == [0, -1]  # round's fill marks a row nobody numbered
        elif math.isnan(m.fill):
            assert np.isnan(v).all(), m.name
        else:
            assert (v == m.fill).all() and m.fill == 0, m.name
    for m in CLIENT_METRICS:
        v = run.clients[m.name]
        if m.name == "train_s":
            assert np.isnan(v[0]).all() and v[1].tolist() == [1.0, 2.0, 3.0, 4.0]
        elif math.isnan(m.fill):
            assert np.isnan(v).all(), m.name
        else:
            assert (v == 0).all(), m.name
    assert (run.ranks["n_clients"] == 0).all() and np.isnan(run.ranks["compute_s"]).all()
    assert run.meta == {}


def test_failed_status_on_exception(tmp_path):
    p = tmp_path / "fail.h5"
    with pytest.raises(ZeroDivisionError):
        with RunLog(p, attrs={}, n_clients=2, n_ranks=2) as log:
            log.append_round({"round": 0}, {}, {})
            1 / 0  # noqa: B018
    run = load_run(p)
    assert run.status.startswith("failed: ZeroDivisionError") and not run.complete
    assert run.n_rounds == 1 and run.attrs["rounds_done"] == 1


def test_refuses_existing_file_unless_overwrite(tmp_path):
    p = tmp_path / "run.h5"
    write_run(p, rounds=2)
    with pytest.raises(UsageError, match="exists"):
        RunLog(p, attrs={}, n_clients=1, n_ranks=1)
    assert load_run(p).n_rounds == 2  # untouched
    with RunLog(p, attrs={}, n_clients=1, n_ranks=1, overwrite=True) as log:
        log.append_round({"round": 0}, {}, {})
    run = load_run(p)
    assert run.n_rounds == 1 and run.clients["train_s"].shape == (1, 1)


def test_close_is_idempotent(tmp_path):
    log = RunLog(tmp_path / "x.h5", attrs={}, n_clients=1, n_ranks=1)
    log.close("complete")
    log.close("failed: late")
    assert load_run(tmp_path / "x.h5").status == "complete"


def test_killed_writer_leaves_readable_file(tmp_path):
    p = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_results import RunLog, attrs, meta, round_data, C, W
        log = RunLog({str(p)!r}, attrs=attrs(), n_clients=C, n_ranks=W, meta=meta())
        for r in range(3):
            log.append_round(*round_data(r))
        os._exit(1)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    run = load_run(p)
    assert run.n_rounds == 3 and run.status == "running" and not run.complete
    assert run.rounds["round"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(run.clients["participated"][2], round_data(2)[1]["participated"])
    s = summarize(run)
    assert s["status"] == "running" and s["rounds"] == 3


def test_load_run_errors(tmp_path):
    with pytest.raises(UsageError, match="no such"):
        load_run(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UsageError):
        load_run(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(UsageError, match="not an hpcfl run file"):
        load_run(tmp_path / "other.h5")


def test_summarize_matches_hand_sums(tmp_path):
    p = tmp_path / "run.h5"
    write_run(p)
    run = load_run(p)
    s = summarize(run)
    rows = [round_data(r)[0] for r in range(3)]
    assert s["name"] == "restest" and s["codec"] == "fp16" and s["status"] == "complete" and s["rounds"] == 3
    assert s["final_accuracy"] == pytest.approx(0.7)  # round 2 (round 1 was not evaluated)
    assert s["best_accuracy"] == pytest.approx(0.7)
    assert s["final_loss"] == pytest.approx(0.0)
    for k in ("uplink_bytes", "payload_bytes", "header_bytes", "raw_bytes", "downlink_bytes"):
        assert s[k] == sum(row[k] for row in rows) and isinstance(s[k], int), k
    assert s["compression_ratio"] == pytest.approx(3 * 4000 / (1000 + 1001 + 1002))
    assert s["wall_s"] == pytest.approx(4.5)
    total = 0.5 + 1.5 + 2.5
    assert s["round_s_mean"] == pytest.approx(total / 3)
    assert set(s["phases_s"]) == set(PHASES)
    assert s["phases_s"]["wait_s"] == pytest.approx(0.2 * (0 + 1 + 2))
    assert s["phases_s"]["eval_s"] == pytest.approx(0.06)
    assert s["phases_share"]["bcast_s"] == pytest.approx(0.3 / total)
    assert math.isnan(s["phases_s"]["aggregate_s"])  # never logged: NaN, not 0
    train = [v for r in range(3) for v, p_ in zip(round_data(r)[1]["train_s"], round_data(r)[1]["participated"]) if p_]
    assert s["client_train_s_mean"] == pytest.approx(np.mean(train))
    dec = [0.002 * (r + 1) for r in range(3) for p_ in round_data(r)[1]["participated"] if p_]
    assert s["client_decode_s_mean"] == pytest.approx(np.mean(dec))
    text = format_summary(s)
    assert "restest" in text and "fp16" in text and "0.7000" in text and "[complete]" in text


def test_summarize_empty_run(tmp_path):
    p = tmp_path / "empty.h5"
    RunLog(p, attrs={}, n_clients=2, n_ranks=2).close("complete")
    s = summarize(load_run(p))
    assert s["rounds"] == 0 and s["uplink_bytes"] == 0 and math.isnan(s["final_accuracy"])
    format_summary(s)


def test_dataframes(tmp_path):
    pd = pytest.importorskip("pandas")
    p = tmp_path / "run.h5"
    write_run(p)
    run = load_run(p)
    df = run.rounds_frame()
    assert isinstance(df, pd.DataFrame) and df.index.name == "round" and list(df.index) == [0, 1, 2]
    assert df.loc[2, "uplink_bytes"] == 1002
    cf = run.clients_frame()
    n_part = sum(int(round_data(r)[1]["participated"].sum()) for r in range(3))
    assert len(cf) == n_part and (cf["participated"] == 1).all()
    assert set(cf.columns) >= {"round", "client", "rank", "train_s"}
    row = cf[(cf["round"] == 1) & (cf["client"] == 1)].iloc[0]
    assert row["rank"] == 2 and row["train_s"] == pytest.approx(0.2)
    assert len(run.clients_frame(participated_only=False)) == 3 * C
    rf = run.ranks_frame()
    assert len(rf) == 3 * W and rf[(rf["round"] == 2) & (rf["rank"] == 1)]["bcast_s"].iloc[0] == pytest.approx(2.1)


# ------------------------------------------------------------------ CLI

def _hpcfl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcfl", *args], capture_output=True, text=True, timeout=60)


def test_cli_report(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_run(a)
    write_run(b, rounds=1)
    r = _hpcfl("report", str(a))  # one run: the summary
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith(format_summary(summarize(load_run(a))) + "\n  per-bit accuracy")  # + the per-bit block
    assert "Acc0 0.1000 (chance" in out  # this synthetic file logs no initial_accuracy (tests/test_perbit.py)
    r = _hpcfl("report", str(a), str(b))  # several: one comparison table (tests/test_compare.py)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("2 runs; target accuracy")
    r = _hpcfl("report", "--json", str(a), str(b))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    d = json.loads(lines[0])
    want = summarize(load_run(a))
    assert d["uplink_bytes"] == want["uplink_bytes"] and d["final_accuracy"] == pytest.approx(0.7)
    assert d["phases_s"]["wait_s"] == pytest.approx(want["phases_s"]["wait_s"])
    assert json.loads(lines[1])["rounds"] == 1


def test_cli_report_missing_file(tmp_path):
    r = _hpcfl("report", str(tmp_path / "nope.h5"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_schema():
    r = _hpcfl("schema", "results")
    assert r.returncode == 0, r.stderr
    for m in ROUND_METRICS + CLIENT_METRICS + RANK_METRICS + META:
        assert f"| `{m.name}` | {m.dtype} |" in r.stdout, m.name
    for k in ROOT_ATTRS:
        assert f"| `{k}` |" in r.stdout
    r = _hpcfl("schema", "job")
    assert r.returncode == 0, r.stderr
    from hpcfl.config.schema import FREEFORM_SECTIONS, SCHEMA

    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| `")]
    for sec, fields in SCHEMA.items():
        for k in fields:
            assert any(ln.startswith(f"| `{sec}.{k}` |") for ln in rows), f"{sec}.{k}"
    for sec in FREEFORM_SECTIONS:
        assert any(f"`[{sec}]`" in ln for ln in rows)
    assert len(rows) == sum(len(f) for f in SCHEMA.values()) + len(FREEFORM_SECTIONS)
    assert all(ln.count(" | ") >= 3 and ln.endswith("|") for ln in rows)


def test_cli_report_json_is_strict_json(tmp_path):
    p = tmp_path / "a.h5"
    write_run(p)  # aggregate_s is never logged: its sum is NaN
    r = _hpcfl("report", "--json", str(p))
    assert r.returncode == 0, r.stderr

    def no_constants(c):
        raise ValueError(f"non-JSON constant {c}")

    d = json.loads(r.stdout, parse_constant=no_constants)
    assert d["phases_s"]["aggregate_s"] is None
