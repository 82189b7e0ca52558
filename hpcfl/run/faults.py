"""Fault injection for tests of failure handling: ``HPCFL_FAULT="rank=1,round=2[,kind=K]"``.

At the start of the named round (0-based) the named rank, by kind:

* ``raise`` (default): raises an exception;
* ``hang``: stops answering (sleeps for an hour, inside no MPI call);
* ``kill``: kills itself with SIGKILL;
* ``nan``: its clients' updates of that round get a NaN (numerical-fault handling).

Used by the test suite to prove that any failing rank ends the whole job.
"""

from __future__ import annotations

import os

__all__ = ["InjectedFault", "maybe_fail"]


class InjectedFault(RuntimeError):
    pass


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for item in spec.split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _active(rank: int, round: int) -> str | None:
    spec = os.environ.get("HPCFL_FAULT")
    if not spec:
        return None
    f = _parse(spec)
    if f.get("rank") == str(rank) and f.get("round") == str(round):
        return f.get("kind", "raise")
    return None


def maybe_fail(rank: int, round: int) -> None:
    kind = _active(rank, round)
    if kind == "raise":
        raise InjectedFault(f"injected fault (HPCFL_FAULT) on rank {rank} in round {round}")
    if kind == "hang":
        import time

        time.sleep(3600)
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def poison(rank: int, round: int, update: dict) -> None:
    """kind=nan: put a NaN into the first tensor of an update."""
    if _active(rank, round) == "nan":
        first = next(iter(update.values()))
        first.view(-1)[0] = float("nan")
