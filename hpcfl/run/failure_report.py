"""Name the rank that ended without a word (SIGKILL, the OOM killer, a segfault) for the self-launcher.

A rank that raises leaves its reason in the note file (``HPCFL_FAIL_NOTE``) before MPI_Abort. A rank
killed outright cannot, and Hydra's ``BAD TERMINATION ... PID n`` banner does not say which rank it
was: when one process dies Hydra kills all the others with SIGKILL and then names the *first
process it reaps*, in whatever order. Measured with pip MPICH 5.0.2, 3 ranks, one ``kill -9``'d:
the banner named another rank's PID in 3 of 5 runs (docs/reliability.md, "Rank failures").

So the self-launcher (``hpcfl run`` outside MPI) watches the ranks itself:

* every rank records ``"<pid> <host>"`` in ``$HPCFL_RANK_DIR/rank<R>`` at start-up
  (:func:`record_rank`, best effort);
* :func:`launch` starts mpiexec, and a watcher thread opens a pidfd for each rank on this host as
  its file appears and notes which rank exits first. Hydra needs a round trip (proxy -> mpiexec ->
  proxy) before it kills the others (the next rank died 8-54 ms after the first in the
  measurements), while a pidfd wakes the watcher as the process exits; ranks that exit within one
  wake-up are all reported ("rank 1 (...) or rank 2 (...)"), all of them at once names none;
* a relay thread copies mpiexec's stdout through unchanged and keeps its tail, from which the
  banner's signal (``EXIT STRING: Killed (signal 9)``) and PID are read.

:func:`describe` turns that into the one-line reason that goes into the run file's status and the
last stderr line, e.g. ``rank 2 (pid 4711 on node1) was killed by signal 9 (SIGKILL) in round 4
(out of memory, scancel or a node failure?); the MPI launcher ended the job 0.02 s later``.

Ranks on other hosts (a self-launched mpiexec spreading over an allocation) cannot be watched from
here; for them only the banner's PID is available, mapped to a rank through the recorded PIDs and
reported as what it is: the process the launcher named, which may be one it ended itself.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RANK_DIR_ENV", "record_rank", "Launch", "launch", "describe", "parse_banner"]

RANK_DIR_ENV = "HPCFL_RANK_DIR"  # directory where each rank records "<pid> <host>" (set by the self-launcher)
_TAIL = 16384                    # bytes of mpiexec's stdout kept for the banner
_SCAN_S = 0.1                    # how often the watcher looks for new rank files
_POLL_FALLBACK_S = 0.02          # liveness polling where pidfd_open is missing


def record_rank(rank: int, env=None) -> None:
    """Record this rank's PID and host for the self-launcher (no-op outside it; never raises)."""
    env = os.environ if env is None else env
    d = env.get(RANK_DIR_ENV)
    if not d:
        return
    try:
        tmp = Path(d) / f".rank{rank}.{os.getpid()}.tmp"
        tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        os.replace(tmp, Path(d) / f"rank{rank}")
    except OSError:
        pass


def _read_ranks(d: Path) -> dict[int, tuple[int, str]]:
    out = {}
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for name in names:
        m = re.fullmatch(r"rank(\d+)", name)
        if not m:
            continue
        try:
            pid, host = (d / name).read_text().split(None, 1)
            out[int(m.group(1))] = (int(pid), host.strip())
        except (OSError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    """For the fallback without pidfd: a zombie counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass
class Launch:
    """What the self-launcher saw of one mpiexec job."""

    rc: int = 0
    ranks: dict[int, tuple[int, str]] = field(default_factory=dict)  # rank -> (pid, host), as recorded
    exits: list[tuple[float, list[int]]] = field(default_factory=list)  # (monotonic time, ranks) per wake-up
    ended: float = 0.0             # monotonic time mpiexec exited
    tail: bytes = b""              # the end of mpiexec's stdout
    host: str = ""                 # the self-launcher's host

    @property
    def first(self) -> list[int]:
        """The rank(s) seen exiting first ([] if none was seen before mpiexec ended)."""
        return self.exits[0][1] if self.exits else []


class _Watcher(threading.Thread):
    def __init__(self, d: Path, n_ranks: int, result: Launch):
        super().__init__(name="hpcfl-rank-watch", daemon=True)
        self.d, self.n, self.res = d, n_ranks, result
        self.stop = threading.Event()

    def run(self) -> None:  # pragma: no branch - exercised by the MPI tests
        try:
            self._run()
        except Exception:  # noqa: BLE001 - a diagnostic aid must never break the run
            pass

    def _run(self) -> None:
        res, watched = self.res, {}
        use_pidfd = hasattr(os, "pidfd_open")
        poller = select.poll() if use_pidfd else None
        fds: dict[int, int] = {}      # fd -> rank
        living: dict[int, int] = {}   # rank -> pid (fallback)
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                gone = []
                if len(watched) < self.n:
                    for r, (pid, host) in _read_ranks(self.d).items():
                        if r in watched:
                            continue
                        watched[r] = (pid, host)
                        res.ranks[r] = (pid, host)
                        if host != res.host:
                            continue  # another node: only the banner can tell
                        if use_pidfd:
                            try:
                                fd = os.pidfd_open(pid)
                            except ProcessLookupError:
                                gone.append(r)  # died before we looked
                                continue
                            except OSError:
                                use_pidfd = False
                                living.update({fr: res.ranks[fr][0] for fr in fds.values()})
                                for fd_ in fds:
                                    poller.unregister(fd_)
                                    os.close(fd_)
                                fds.clear()
                                living[r] = pid
                                continue
                            fds[fd] = r
                            poller.register(fd, select.POLLIN)
                        else:
                            living[r] = pid
                if gone:
                    res.exits.append((now, sorted(gone)))
                if use_pidfd:
                    ev = []
                    if fds:
                        ev = poller.poll(_SCAN_S * 1000)
                    else:
                        self.stop.wait(_SCAN_S)
                    if ev:
                        t = time.monotonic()
                        ranks = sorted(fds[fd] for fd, _ in ev)
                        res.exits.append((t, ranks))
                        for fd, _ in ev:
                            poller.unregister(fd)
                            os.close(fd)
                            del fds[fd]
                else:
                    self.stop.wait(_POLL_FALLBACK_S)
                    dead = sorted(r for r, pid in living.items() if not _alive(pid))
                    if dead:
                        res.exits.append((time.monotonic(), dead))
                        for r in dead:
                            del living[r]
        finally:
            for fd in fds:
                os.close(fd)


def _relay(src, res: Launch) -> None:
    """Copy mpiexec's stdout to ours byte for byte (progress lines included), keeping the tail."""
    out = getattr(sys.stdout, "buffer", None)
    tail = bytearray()
    fd = src.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        tail += chunk
        if len(tail) > 2 * _TAIL:
            del tail[:-_TAIL]
        if out is not None:
            try:
                out.write(chunk)
                out.flush()
            except (OSError, ValueError):
                out = None  # our stdout is gone: keep draining, or mpiexec would block
        else:
            try:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
    res.tail = bytes(tail[-_TAIL:])


def launch(cmd: list[str], env: dict, n_ranks: int) -> Launch:
    """Run ``cmd`` (mpiexec ...) like ``subprocess.call``, watching its ranks. Returns a :class:`Launch`."""
    res = Launch(host=socket.gethostname())
    d = Path(tempfile.mkdtemp(prefix="hpcfl-ranks-"))
    env = dict(env, **{RANK_DIR_ENV: str(d)})
    watcher = _Watcher(d, n_ranks, res)
    try:
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE) as p:
            relay = threading.Thread(target=_relay, args=(p.stdout, res), name="hpcfl-stdout", daemon=True)
            relay.start()
            watcher.start()
            try:
                res.rc = p.wait()
            except BaseException:  # Ctrl-C: like subprocess.call, end the job before leaving
                p.kill()
                p.wait()
                raise
            finally:
                res.ended = time.monotonic()
                watcher.stop.set()
                watcher.join(2.0)
                relay.join(2.0)  # a rank orphaned by the launcher may hold the pipe open
                for r, v in _read_ranks(d).items():
                    res.ranks.setdefault(r, v)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


_BANNER_PID = re.compile(rb"PID (\d+) RUNNING AT (\S+)")
_BANNER_SIG = re.compile(rb"EXIT STRING: ([^\n]*?)\s*\(signal (\d+)\)")
_BANNER_CODE = re.compile(rb"EXIT CODE: (\d+)")
_TIMED_OUT = re.compile(rb"APPLICATION TIMED OUT, TIMEOUT = (\S+)")


def parse_banner(tail: bytes) -> dict:
    """Hydra's BAD TERMINATION banner: {"pid", "host", "code", "signal", "signal_text"} (those found)."""
    out: dict = {}
    if m := list(_BANNER_PID.finditer(tail)):
        out["pid"], out["host"] = int(m[-1].group(1)), m[-1].group(2).decode(errors="replace")
    if m := list(_BANNER_CODE.finditer(tail)):
        out["code"] = int(m[-1].group(1))
    if m := list(_BANNER_SIG.finditer(tail)):
        out["signal"], out["signal_text"] = int(m[-1].group(2)), m[-1].group(1).decode(errors="replace")
    return out


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _who(ranks: dict[int, tuple[int, str]], r: int) -> str:
    pid, host = ranks.get(r, (None, "?"))
    return f"rank {r} (pid {pid} on {host})" if pid is not None else f"rank {r}"


def describe(res: Launch, rounds_done: int | None) -> str | None:
    """The reason for a job that failed with no rank's word, naming the rank, its host and the round;
    None when there is nothing better to say than the exit code."""
    rc = res.rc
    when = f"in round {rounds_done}" if rounds_done is not None else "during start-up (before the run file existed)"
    if m := _TIMED_OUT.search(res.tail):
        limit = m.group(1).decode(errors="replace")
        return f"the MPI launcher's time limit (MPIEXEC_TIMEOUT = {limit}) ran out {when}; it ended every rank"
    if rc < 0:  # mpiexec itself was killed; its ranks went with it
        return f"mpiexec itself was killed by signal {-rc} ({_signame(-rc)}) {when}"
    banner = parse_banner(res.tail)
    sig = banner.get("signal")
    if sig is None and rc in (9, 137):
        sig = 9  # Hydra reports a signal as the exit code; no hpcfl path exits with 9 on its own
    remote = any(h != res.host for _, h in res.ranks.values())
    local = [r for r, (_, h) in res.ranks.items() if h == res.host]
    if res.first and not (len(local) > 1 and len(res.first) == len(local)):  # all at once names nobody
        who, note = " or ".join(_who(res.ranks, r) for r in res.first), ""
    elif "pid" in banner:  # not seen (another host, or all at once): what the launcher said, and its worth
        by_pid = {pid: r for r, (pid, _) in res.ranks.items()}
        r = by_pid.get(banner["pid"])
        named = _who(res.ranks, r) if r is not None else f"pid {banner['pid']} on {banner.get('host', '?')}"
        who = f"a rank (the MPI launcher names {named}, the first process it reaped, which may be one it ended itself)"
        note = "; ranks on other hosts are not watched" if remote else ""
    elif sig is not None:
        who = "a rank"
        note = "; ranks on other hosts are not watched" if remote else "; the MPI launcher does not say which rank"
    else:
        return None
    if sig is not None:
        what = f"was killed by signal {sig} ({_signame(sig)}) {when}"
        if sig == 9:
            what += " (out of memory, scancel or a node failure?)"
    else:
        what = f"ended first, without a word, {when}"
    text = f"{who} {what}"
    if res.exits and res.ended:
        text += f"; the MPI launcher ended the job {max(0.0, res.ended - res.exits[0][0]):.2f} s later"
    return text + note
