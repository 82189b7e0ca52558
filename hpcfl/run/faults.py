"""Fault injection for tests of failure handling: ``HPCFL_FAULT="rank=1,round=2"``.

The named rank raises at the start of the named round (round is 0-based).
Used by the test suite to prove that one failing rank ends the whole job.
"""

from __future__ import annotations

import os

__all__ = ["InjectedFault", "maybe_fail"]


class InjectedFault(RuntimeError):
    pass


def _parse(spec: str) -> dict[str, int]:
    out = {}
    for item in spec.split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = int(v)
    return out


def maybe_fail(rank: int, round: int) -> None:
    spec = os.environ.get("HPCFL_FAULT")
    if not spec:
        return
    f = _parse(spec)
    if f.get("rank") == rank and f.get("round") == round:
        raise InjectedFault(f"injected fault (HPCFL_FAULT) on rank {rank} in round {round}")
