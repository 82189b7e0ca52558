"""Rank 0's one line per round: aligned columns on a terminal, log lines in batch jobs.

The counter is 1-based, "round k/R" is the k-th completed round, i.e. row k-1 of the run file's
0-based ``/rounds`` table. ``plain`` (batch logs)::

    2026-11-22T10:15:03 hpcfl quickstart: round 1/40 accuracy=0.1532 uplink_bytes=5245840 ratio=1.00 round_s=0.1050

``tty`` (a terminal): a header, then aligned columns; ``time`` is the round's wall time (round_s)::

    round     acc     uplink    ratio       time
     1/40  0.1532     5.0MiB    1.00x    105.0ms

Accuracy is ``-`` on rounds that skip the evaluation.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["Progress", "resolve_mode"]


def resolve_mode(mode: str, stream: TextIO | None = None) -> str:
    stream = sys.stdout if stream is None else stream
    if mode == "auto":
        return "tty" if hasattr(stream, "isatty") and stream.isatty() else "plain"
    return mode


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


class Progress:
    def __init__(self, mode: str, rounds: int, name: str, stream: TextIO | None = None):
        self.mode = mode
        self.rounds = rounds
        self.name = name
        self.out = sys.stdout if stream is None else stream
        self._header = False

    def _print(self, s: str) -> None:
        print(s, file=self.out, flush=True)

    def start(self, text: str) -> None:
        if self.mode == "off":
            return
        if self.mode == "plain":
            self._print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} hpcfl {self.name}: {text}")
        else:
            self._print(text)

    def round(self, r: int, acc: float, uplink: int, ratio: float, round_s: float) -> None:
        if self.mode == "off":
            return
        acc_s = "   -  " if math.isnan(acc) else f"{acc:6.4f}"
        w = len(str(self.rounds))
        if self.mode == "tty":
            if not self._header:
                self._print(f"{'round':>{2 * w + 1}}  {'acc':>6}  {'uplink':>9}  {'ratio':>7}  {'time':>9}")
                self._header = True
            self._print(f"{r + 1:>{w}}/{self.rounds}  {acc_s}  {_fmt_bytes(uplink):>9}  {ratio:6.2f}x  "
                        f"{round_s * 1e3:7.1f}ms")
        else:
            self._print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} hpcfl {self.name}: round {r + 1}/{self.rounds} "
                        f"accuracy={acc_s.strip()} uplink_bytes={uplink} ratio={ratio:.2f} "
                        f"round_s={round_s:.4f}")
