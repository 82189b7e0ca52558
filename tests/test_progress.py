"""hpcfl.run.progress: rank 0's one line per round, in plain (batch log) and tty (terminal) mode."""

from __future__ import annotations

import io
import re

import pytest

from hpcfl.run.progress import Progress, resolve_mode

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"


def _lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_plain_lines():
    buf = io.StringIO()
    p = Progress("plain", 40, "quickstart", buf)
    p.start("40 rounds, 20 clients")
    p.round(0, 0.15320334, 5245840, 1.0, 0.105)       # HDF5 round 0 is printed as round 1/40
    p.round(9, float("nan"), 2048, 12.345, 1.5)      # a round without evaluation
    p.round(39, 0.964, 5245840, 1.0, 0.1)
    lines = _lines(buf)
    assert len(lines) == 4
    assert re.fullmatch(STAMP + r" hpcfl quickstart: 40 rounds, 20 clients", lines[0])
    assert re.fullmatch(STAMP + r" hpcfl quickstart: round 1/40 accuracy=0\.1532 uplink_bytes=5245840 "
                        r"ratio=1\.00 round_s=0\.1050", lines[1]), lines[1]
    assert lines[2].endswith("round 10/40 accuracy=- uplink_bytes=2048 ratio=12.35 round_s=1.5000")
    assert " round 40/40 accuracy=0.9640 " in lines[3]


def test_tty_columns():
    buf = io.StringIO()
    p = Progress("tty", 40, "quickstart", buf)
    p.start("40 rounds")
    p.round(0, 0.15320334, 5245840, 1.0, 0.105)
    p.round(9, float("nan"), 2048, 12.345, 1.5)
    p.round(39, 0.964, 512, 1.0, 0.1)
    lines = _lines(buf)
    assert lines[0] == "40 rounds"                   # start text as is, no time stamp
    header, rows = lines[1], lines[2:]
    assert header.split() == ["round", "acc", "uplink", "ratio", "time"]  # one header, second column is time
    assert len(rows) == 3 and all(len(r) == len(header) for r in rows)   # right-aligned to the header
    assert rows[0].split() == ["1/40", "0.1532", "5.0MiB", "1.00x", "105.0ms"]
    assert rows[1].split() == ["10/40", "-", "2.0KiB", "12.35x", "1500.0ms"]
    assert rows[2].split() == ["40/40", "0.9640", "512B", "1.00x", "100.0ms"]
    # every column ends where its header word ends (a missing accuracy is a "-" inside its column)
    for word in header.split():
        end = header.index(word) + len(word)
        for r in rows if word != "acc" else (rows[0], rows[2]):
            assert r[end - 1] != " " and (end == len(r) or r[end] == " "), (word, r)
    a = header.index("acc")  # the 6-wide accuracy column spans [a - 3, a + 3)
    assert rows[1][a - 3:a + 3].strip() == "-"


def test_off_prints_nothing():
    buf = io.StringIO()
    p = Progress("off", 3, "x", buf)
    p.start("hello")
    p.round(0, 0.5, 1, 1.0, 0.1)
    assert buf.getvalue() == ""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("mode, stream, want", [
    ("auto", _Tty(), "tty"),
    ("auto", io.StringIO(), "plain"),
    ("plain", _Tty(), "plain"),
    ("tty", io.StringIO(), "tty"),
    ("off", _Tty(), "off"),
])
def test_resolve_mode(mode, stream, want):
    assert resolve_mode(mode, stream) == want
