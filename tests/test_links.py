"""Client links (docs/links.md): the CSV trace, its client -> row mapping, the lognormal spread, and
the refusal of bad trace files (ConfigError naming file, line and column; `hpcfl validate` exit 2)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcfl.errors import ConfigError
from hpcfl.fl.link import links_for_job, load_trace
from tests.conftest import hpcfl_env, write_job

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "traces" / "mobile-sample.csv"
HEADER = "client,uplink_mbps,downlink_mbps,latency_ms"
MEDIANS = {"mode": "model", "uplink_mbps": 10.0, "downlink_mbps": 50.0, "latency_ms": 20.0}


def _sample_rows() -> list[tuple[float, float, float]]:
    """The sample's data rows, parsed here independently of load_trace."""
    lines = [ln for ln in SAMPLE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == HEADER
    return [tuple(float(x) for x in ln.split(",")[1:]) for ln in lines[1:]]


# ------------------------------------------------------------------ the shipped sample

def test_sample_trace_loads():
    rows = load_trace(SAMPLE)
    assert rows.shape == (40, 3)  # "a synthetic sample of 40 clients"
    np.testing.assert_array_equal(rows, np.array(_sample_rows()))
    assert rows[0].tolist() == [5.3, 57.69, 78.5]  # the example rows in docs/links.md
    assert rows[1].tolist() == [12.12, 32.21, 66.6]
    assert (rows[:, :2] > 0).all()
    assert rows[:, 2].min() >= 15 and rows[:, 2].max() <= 120  # "latency 15-120 ms"
    # "lognormal around 10/50 Mbit/s": the medians of 40 draws land near them
    assert 5 < np.median(rows[:, 0]) < 20 and 25 < np.median(rows[:, 1]) < 100


def test_trace_client_uses_row_c_mod_rows():
    rows = load_trace(SAMPLE)
    n = 100  # more clients than rows: 40..79 and 80..99 wrap around
    links = links_for_job({**MEDIANS, "trace": str(SAMPLE), "spread": 0.7}, n, seed=3)
    for c in (0, 1, 39, 40, 41, 79, 80, 99):
        up, down, lat = rows[c % 40]
        assert links.uplink_bps[c] == up * 1e6  # Mbit/s = 10^6 bit/s
        assert links.downlink_bps[c] == down * 1e6
        assert links.latency_s[c] == lat / 1e3
    # the trace overrides the medians and the spread, and the seed plays no part
    other = links_for_job({**MEDIANS, "trace": str(SAMPLE), "spread": 0.0}, n, seed=99)
    np.testing.assert_array_equal(other.uplink_bps, links.uplink_bps)
    np.testing.assert_array_equal(other.latency_s, links.latency_s)


def test_transfer_time_formula():
    """A transfer of b bytes takes latency + 8 b / bandwidth."""
    links = links_for_job({**MEDIANS, "trace": str(SAMPLE)}, 45, seed=0)
    clients = np.array([0, 7, 44])  # 44 -> row 4
    nbytes = np.array([1000, 123_456, 0])
    rows = load_trace(SAMPLE)[clients % 40]
    np.testing.assert_allclose(links.uplink_s(clients, nbytes),
                               rows[:, 2] / 1e3 + 8 * nbytes / (rows[:, 0] * 1e6), rtol=1e-15)
    np.testing.assert_allclose(links.downlink_s(clients, nbytes),
                               rows[:, 2] / 1e3 + 8 * nbytes / (rows[:, 1] * 1e6), rtol=1e-15)
    # client 0: 78.5 ms + 8000 bit / 5.3 Mbit/s
    assert links.uplink_s(np.array([0]), np.array([1000]))[0] == pytest.approx(0.0785 + 8000 / 5.3e6, rel=1e-15)


def test_trace_comments_and_blank_lines(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(f"# comment\n\n{HEADER}\n  # indented comment\n0,1.5,2.5,3\n\n1, 4 ,5,0\n")
    assert load_trace(p).tolist() == [[1.5, 2.5, 3.0], [4.0, 5.0, 0.0]]


def test_trace_columns_by_name(tmp_path):
    """Columns are found by header name (any order, `client` optional); a spreadsheet's BOM is ignored."""
    p = tmp_path / "t.csv"
    p.write_bytes(b"\xef\xbb\xbflatency_ms,downlink_mbps,uplink_mbps\n30,20,10\n")
    assert load_trace(p).tolist() == [[10.0, 20.0, 30.0]]


# ------------------------------------------------------------------ medians and spread

def test_spread_zero_gives_identical_links():
    for link in ({**MEDIANS}, {**MEDIANS, "spread": 0.0}, {**MEDIANS, "trace": ""}):
        links = links_for_job(link, 17, seed=5)
        assert (links.uplink_bps == 10e6).all() and (links.downlink_bps == 50e6).all()
        assert (links.latency_s == 0.02).all()


def test_spread_is_deterministic_from_seed():
    link = {**MEDIANS, "spread": 0.5}
    a, b = links_for_job(link, 50, seed=11), links_for_job(link, 50, seed=11)
    for x, y in ((a.uplink_bps, b.uplink_bps), (a.downlink_bps, b.downlink_bps), (a.latency_s, b.latency_s)):
        np.testing.assert_array_equal(x, y)
    c = links_for_job(link, 50, seed=12)
    assert not np.array_equal(a.uplink_bps, c.uplink_bps)
    assert len(np.unique(a.uplink_bps)) == 50  # every client its own link
    assert (a.latency_s == 0.02).all()  # the spread applies to bandwidths only
    # up- and downlink factors are independent draws, not one factor for both
    assert not np.allclose(a.uplink_bps / 10e6, a.downlink_bps / 50e6)


def test_spread_link_depends_on_seed_and_client_only():
    """Links come from (job seed, client) only: client c keeps its link when the job has more clients."""
    link = {**MEDIANS, "spread": 0.8}
    small, big = links_for_job(link, 10, seed=4), links_for_job(link, 1000, seed=4)
    np.testing.assert_array_equal(small.uplink_bps, big.uplink_bps[:10])
    np.testing.assert_array_equal(small.downlink_bps, big.downlink_bps[:10])


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_spread_is_lognormal_around_the_medians(sigma):
    n = 20_000
    links = links_for_job({**MEDIANS, "spread": sigma}, n, seed=2026)
    for bps, median in ((links.uplink_bps, 10e6), (links.downlink_bps, 50e6)):
        assert (bps > 0).all()
        log_f = np.log(bps / median)
        # the sample median of ln f has standard error ~1.25 sigma / sqrt(n) (< 0.01 here): allow ~5 of them
        assert np.median(bps) == pytest.approx(median, rel=6.5 * sigma / np.sqrt(n))
        assert abs(log_f.mean()) < 5 * sigma / np.sqrt(n)
        assert log_f.std() == pytest.approx(sigma, rel=0.03)  # sigma of ln bandwidth = spread


# ------------------------------------------------------------------ bad trace files

BAD = [
    ("missing-column", "client,uplink_mbps,latency_ms\n0,1,3\n", ["line 1", "downlink_mbps"]),
    ("negative-bandwidth", f"# c\n{HEADER}\n0,1,2,3\n\n1,-4,2,3\n", ["line 5", "column uplink_mbps", "'-4'", "> 0"]),
    ("zero-bandwidth", f"{HEADER}\n0,1,0,3\n", ["line 2", "column downlink_mbps", "> 0"]),
    ("negative-latency", f"{HEADER}\n0,1,2,-3\n", ["line 2", "column latency_ms", ">= 0"]),
    ("non-numeric", f"{HEADER}\n0,1,2,3\n1,1,fast,3\n", ["line 3", "column downlink_mbps", "'fast'"]),
    ("nan", f"{HEADER}\n0,nan,2,3\n", ["line 2", "column uplink_mbps", "finite"]),
    ("inf", f"{HEADER}\n0,1,2,inf\n", ["line 2", "column latency_ms", "finite"]),
    ("empty-field", f"{HEADER}\n0,1,,3\n", ["line 2", "column downlink_mbps", "not a number"]),
    ("short-row", f"{HEADER}\n0,1,2\n", ["line 2", "3 field(s)", "header has 4"]),
    ("long-row", f"{HEADER}\n0,1,2,3,4\n", ["line 2", "5 field(s)", "header has 4"]),
    ("empty", "", ["no header line"]),
    ("comments-only", "# nothing\n\n", ["no header line"]),
    ("header-only", f"{HEADER}\n", ["no data rows"]),
]


@pytest.mark.parametrize("text, words", [pytest.param(t, w, id=i) for i, t, w in BAD])
def test_bad_trace_is_refused(tmp_path, text, words):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_trace(p)
    e = ei.value
    assert e.key == "link.trace"
    msg = str(e)
    assert str(p) in msg and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    # and through links_for_job, as every rank calls it
    with pytest.raises(ConfigError):
        links_for_job({**MEDIANS, "trace": str(p)}, 4, seed=0)


def test_unreadable_trace_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*nope.csv"):
        load_trace(tmp_path / "nope.csv")
    p = tmp_path / "latin1.csv"
    p.write_bytes(HEADER.encode() + b"\n0,1,2,3\xe9\n")
    with pytest.raises(ConfigError, match="latin1.csv: not UTF-8"):
        load_trace(p)


# ------------------------------------------------------------------ hpcfl validate

def _job(trace: Path, mode: str = "model") -> dict:
    return {
        "run": {"name": "links", "ranks": 3, "rounds": 2, "seed": 1},
        "data": {"dataset": "digits", "n_clients": 6},
        "model": {"name": "logreg"},
        "train": {"local_steps": 1, "batch_size": 8},
        "codec": {"id": "identity"},
        "link": {"mode": mode, "trace": str(trace)},
    }


def _main(args) -> tuple[int, str]:
    from hpcfl.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def test_validate_accepts_the_sample(tmp_path):
    for mode in ("model", "pace"):
        rc, err = _main(["validate", write_job(tmp_path / "ok.toml", _job(SAMPLE, mode))])
        assert rc == 0, err


@pytest.mark.parametrize("name, text, words", [pytest.param(i, t, w, id=i) for i, t, w in BAD])
def test_validate_refuses_bad_trace_with_one_line(tmp_path, name, text, words):
    trace = tmp_path / f"{name}.csv"
    trace.write_text(text)
    rc, err = _main(["validate", write_job(tmp_path / "job.toml", _job(trace))])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "link.trace" in lines[0] and str(trace) in lines[0] and words[0] in lines[0], err


def test_validate_subprocess_exit_2(tmp_path):
    """The real command line: exit code 2, one line on stderr, no traceback."""
    trace = tmp_path / "bad.csv"
    trace.write_text(f"# header follows\n{HEADER}\n0,1,2,3\n1,1,two,3\n")
    job = write_job(tmp_path / "job.toml", _job(trace))
    r = subprocess.run([sys.executable, "-m", "hpcfl", "validate", str(job)], capture_output=True, text=True,
                       timeout=120, env=hpcfl_env())
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{trace} line 4, column downlink_mbps" in lines[0] and "'two'" in lines[0]
