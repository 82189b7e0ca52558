"""Moving bytes between ranks with buffer-based mpi4py calls (no pickling).

Per round:

* ``bcast_model``: the root broadcasts a 24-byte round token, then the flat
  float32 model. The token separates *idle* time (a worker waiting for the root
  to finish the previous round) from the *transfer* of the model, and carries
  the inline slot size of the coming gather.
* ``gather_bytes``: each worker sends one chunk holding its clients' framed
  messages and metric records, in one point-to-point message holding its size,
  a few per-rank figures and the chunk's first bytes (a slot); a chunk longer
  than its slot sends the rest in a second message, received straight into a
  preallocated uint8 buffer at the root. The root keeps its last two
  receive buffers and reuses one only when nothing outside the transport still
  refers to it (no chunk, frame or decoded view of an earlier round is alive),
  so callers always see memory no one else holds, without paying page faults
  for a fresh buffer every round (docs/mpi-performance.md).
* ``igather_floats``: figures known only afterwards (a worker's gather time).

Two kinds of wait (MPICH progresses non-blocking collectives only inside MPI
calls, and a rank blocked in MPI busy-polls a core):

* *idle* waits (for the root, for the slowest worker) poll ``Test()`` and sleep
  with back-off up to ``poll_interval``, so waiting ranks leave the CPU to the
  ranks still training (busy-waiting made clients 25-35 % slower on 2 cores,
  platform.md §4);
* *transfer* waits, entered when every party is known to be present, poll
  ``Test()`` with ``sched_yield`` and never sleep, so a rendezvous protocol is
  not stretched by sleeps.

``poll_interval = 0`` blocks inside MPI for every wait.

**Watchdog.** Every wait has a deadline of ``timeout`` seconds (``run.timeout``);
past it the waiting rank raises :class:`~hpcfl.errors.RankTimeout` naming the
round and the ranks it was waiting for, and the caller aborts the job (a rank
blocked in a collective can only be freed by ``MPI_Abort``). To name the
missing ranks, the root receives the per-round sizes point to point (one
``Irecv`` per worker) rather than in an ``Igather``. With ``poll_interval = 0``
waits block inside MPI and the watchdog cannot fire.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from mpi4py import MPI

from hpcfl.errors import RankTimeout

__all__ = ["Transport", "Pending"]

ROOT = 0
_TAG_SIZES = 7301  # a worker's slot (size, info, first bytes), worker -> root, point to point (a missing rank is named)
_TAG_REST = 7302   # the rest of a chunk longer than the slot
# Largest slot payload. Inline bytes are copied on both sides; above ~64 KiB per worker the copies cost
# more than the second message saves, so larger chunks go whole in the second message (inline = 0).
MAX_INLINE = 64 << 10


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Deadline:
    """When a wait must give up, and what to say then."""

    __slots__ = ("at", "what")

    def __init__(self, timeout: float, what: Callable[[], str]):
        self.at = time.perf_counter() + timeout
        self.what = what

    def check(self) -> None:
        if time.perf_counter() > self.at:
            raise RankTimeout(self.what())


def _wait_idle(req: MPI.Request, poll: float, dl: _Deadline | None = None) -> None:
    """Yield for ~100 us, then sleep with exponential back-off from 20 us to ``poll``."""
    if poll <= 0:
        req.Wait()
        return
    if req.Test():
        return
    spin_until = time.perf_counter() + 1e-4
    while time.perf_counter() < spin_until:
        os.sched_yield()
        if req.Test():
            return
    nap = 2e-5
    while not req.Test():
        if dl is not None:
            dl.check()
        time.sleep(nap)
        nap = min(nap * 2, poll)


def _wait_transfer(req: MPI.Request, poll: float, dl: _Deadline | None = None) -> None:
    """Every party is present: progress the request as fast as possible, yielding the CPU."""
    if poll <= 0:
        req.Wait()
        return
    n = 0
    while not req.Test():
        os.sched_yield()
        n += 1
        if dl is not None and n % 256 == 0:
            dl.check()


class _RecvPool:
    """The root's receive buffers for :meth:`Transport.gather_bytes`, reused when provably unreferenced.

    A buffer is handed out again only if its reference count shows that the pool
    holds the sole reference: every numpy view, ``memoryview`` or
    ``torch.from_numpy`` tensor made from it (or from a view of it) keeps one,
    so no caller can observe its old contents being overwritten; a buffer the
    pool reuses is exactly one that would otherwise have been freed. Otherwise
    (for instance the previous round's chunks are still alive) the other slot
    or a new buffer is used. A buffer serves requests between about half its
    size and its size, so a small round does not pin a huge buffer.
    """

    def __init__(self, slots: int = 2):
        self.slots = slots
        # the count of a buffer only the pool holds, taken with the very expression _free uses (so
        # interpreters that skip counting some stack references give the same baseline)
        self._bufs: list[np.ndarray] = [np.empty(0, dtype=np.uint8)]
        self._base = sys.getrefcount(self._bufs[0])
        self._bufs.clear()

    def _free(self, i: int) -> bool:
        return sys.getrefcount(self._bufs[i]) <= self._base

    def get(self, n: int) -> np.ndarray:
        if self.slots <= 0:  # no reuse: a fresh buffer every time
            return np.empty(n, dtype=np.uint8)
        for i in range(len(self._bufs)):
            if n <= self._bufs[i].size <= 2 * n + 65536 and self._free(i):
                return self._bufs[i][:n]
        buf = np.empty(n, dtype=np.uint8)
        if len(self._bufs) >= self.slots:
            free = [i for i in range(len(self._bufs)) if self._free(i)]
            del self._bufs[free[0] if free else 0]  # a busy buffer lives on through its views
        self._bufs.append(buf)
        return buf[:n]


@dataclass
class Pending:
    """A started non-blocking collective and the buffers it must keep alive."""

    req: MPI.Request
    buffers: tuple


class Transport:
    """The job's communicator and the collectives an FL round needs."""

    def __init__(self, comm: MPI.Comm | None = None, poll_interval: float = 0.0002, recv_buffers: int = 2,
                 timeout: float = math.inf):
        """``recv_buffers``: receive buffers the root keeps for reuse (0: a fresh one every gather);
        ``timeout``: seconds any wait may last before :class:`RankTimeout` (the watchdog)."""
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.poll = poll_interval
        self.timeout = timeout
        self.round = -1  # the round of the last broadcast token, for the watchdog's messages
        self._token = np.zeros(3, dtype=np.int64)  # round, model size, inline bytes of the coming gather
        self._recv_pool = _RecvPool(recv_buffers)      # the root's receive buffers for whole slots
        self._rest_pool = _RecvPool(recv_buffers)      # ... and for the rest of chunks longer than a slot
        self._send = np.zeros(0, dtype=np.uint8)       # a worker's slot buffer (reused: sends complete in the call)
        self.inline = 0        # bytes of chunk that travel inside the size message (agreed through the token)
        self._next_inline = 0  # the root's choice for the next token, from the sizes it just saw

    @property
    def is_root(self) -> bool:
        return self.rank == ROOT

    @property
    def n_workers(self) -> int:
        return self.size - 1

    def _deadline(self, what: Callable[[], str]) -> _Deadline | None:
        return _Deadline(self.timeout, what) if math.isfinite(self.timeout) else None

    def _hung(self, what: str) -> Callable[[], str]:
        r = f"round {self.round}" if self.round >= 0 else "start-up"
        return lambda: (f"rank {self.rank}, {r}: {what} did not complete within run.timeout = {self.timeout:g} s; "
                        "a rank stopped answering (hung or dead), so the job is ended")

    def barrier(self) -> None:
        _wait_idle(self.comm.Ibarrier(), self.poll, self._deadline(self._hung("a barrier")))

    def bcast_model(self, flat: np.ndarray, round: int) -> tuple[float, float]:
        """Broadcast the root's float32 vector into ``flat`` on every rank.

        Returns ``(idle_s, bcast_s)``: the wait for the round token (workers: the
        root finishing its previous round) and the model transfer itself.
        """
        t0 = MPI.Wtime()
        if self.is_root:
            self._token[:] = (round, flat.size, self._next_inline)
        self.round = round
        _wait_idle(self.comm.Ibcast([self._token, MPI.INT64_T], root=ROOT), self.poll,
                   self._deadline(lambda: f"rank {self.rank} waited run.timeout = {self.timeout:g} s for the root "
                                  f"(rank 0) to start round {round}; the root is hung or dead, so the job is ended"))
        if not self.is_root and (int(self._token[0]) != round or int(self._token[1]) != flat.size):
            raise RuntimeError(f"rank {self.rank}: root is in round {int(self._token[0])} with "
                               f"{int(self._token[1])} parameters; this rank expected round {round} "
                               f"with {flat.size}")
        self.inline = int(self._token[2])
        t1 = MPI.Wtime()
        _wait_transfer(self.comm.Ibcast([flat, MPI.FLOAT], root=ROOT), self.poll,
                       self._deadline(self._hung("the model broadcast")))
        return t1 - t0, MPI.Wtime() - t1

    def sync_inline(self) -> None:
        """Agree on the root's current inline size outside a model broadcast (benchmarks); a run
        agrees on it through the round token at no cost."""
        tok = np.array([self._next_inline], dtype=np.int64)
        _wait_idle(self.comm.Ibcast([tok, MPI.INT64_T], root=ROOT), self.poll, self._deadline(self._hung("sync")))
        self.inline = int(tok[0])

    def gather_bytes(self, chunk: np.ndarray | None, info: np.ndarray
                     ) -> tuple[list[np.ndarray] | None, np.ndarray | None, float, float]:
        """Gather one uint8 chunk per worker, plus a fixed-length float64 ``info`` vector
        per rank that rides along with the sizes (no extra message).

        One point-to-point message per worker carries its size, its info and the first
        ``inline`` bytes of its chunk (a *slot*); only a chunk longer than that sends the rest
        in a second message, received once every size is known. ``inline`` is the root's
        choice from the previous gather (1.25 x the largest chunk if that is at most ``MAX_INLINE``, else 0),
        agreed through the round token, so in steady state a small gather is one message per
        worker, like a bare ``Gatherv`` whose counts are known in advance.

        Returns ``(chunks, infos, wait_s, transfer_s)``. On the root ``chunks[w-1]`` is worker
        ``w``'s chunk (a view into a buffer that nothing else refers to), ``infos[r]`` rank r's
        info, ``wait_s`` the time until every size was known (waiting for the slowest worker)
        and ``transfer_s`` the rest of the transfer. Workers get ``(None, None, ...)``.
        """
        send = chunk if chunk is not None else np.zeros(0, dtype=np.uint8)
        k = info.size + 1
        hb = 8 * k
        slot = hb + self.inline
        t0 = MPI.Wtime()
        if not self.is_root:
            if self._send.size < slot:
                self._send = np.zeros(slot, dtype=np.uint8)
            head = self._send[:hb].view(np.float64)
            head[0] = send.size
            head[1:] = info
            n_in = min(send.size, self.inline)
            self._send[hb:hb + n_in] = send[:n_in]
            _wait_idle(self.comm.Isend([self._send[:hb + n_in], MPI.BYTE], dest=ROOT, tag=_TAG_SIZES), self.poll,
                       self._deadline(self._hung("sending this rank's slot to the root")))
            t1 = MPI.Wtime()
            if send.size > self.inline:
                _wait_transfer(self.comm.Isend([send[self.inline:], MPI.BYTE], dest=ROOT, tag=_TAG_REST), self.poll,
                               self._deadline(self._hung("sending the rest of this rank's chunk")))
            return None, None, t1 - t0, MPI.Wtime() - t1
        P = self.size
        slots = self._recv_pool.get((P - 1) * slot).reshape(P - 1, slot)
        self._recv_slots(slots)
        t1 = MPI.Wtime()
        allinfo = np.empty((P, k), dtype=np.float64)
        allinfo[ROOT, 0] = send.size
        allinfo[ROOT, 1:] = info
        allinfo[1:] = slots[:, :hb].view(np.float64)  # copies: the info must not pin the slot buffer
        counts = allinfo[1:, 0].astype(np.int64)
        chunks = [slots[w, hb:hb + min(int(counts[w]), self.inline)] for w in range(P - 1)]
        long = [w for w in range(P - 1) if counts[w] > self.inline]
        if long:  # rest of the long chunks: one buffer, each chunk made whole in it
            rest = self._rest_pool.get(int(counts[long].sum()))
            off, reqs = 0, []
            for w in long:
                whole = rest[off:off + int(counts[w])]
                whole[:self.inline] = chunks[w]
                reqs.append(self.comm.Irecv([whole[self.inline:], MPI.BYTE], source=w + 1, tag=_TAG_REST))
                chunks[w] = whole
                off += int(counts[w])
            dl = self._deadline(self._hung("the transfer of the updates"))
            for rq in reqs:
                _wait_transfer(rq, self.poll, dl)
        want = _round_up(int(1.25 * int(counts.max(initial=0))) + 64, 64)
        self._next_inline = want if want <= MAX_INLINE else 0
        return chunks, allinfo[:, 1:], t1 - t0, MPI.Wtime() - t1

    def _recv_slots(self, slots: np.ndarray) -> None:
        """Receive every worker's slot, point to point, so a rank that never sends can be named."""
        waiting = {w: self.comm.Irecv([slots[w - 1], MPI.BYTE], source=w, tag=_TAG_SIZES)
                   for w in range(1, self.size)}
        if self.poll <= 0:
            MPI.Request.Waitall(list(waiting.values()))
            return

        def missing() -> str:
            ranks = sorted(waiting)
            shown = ", ".join(map(str, ranks[:20])) + (f" and {len(ranks) - 20} more" if len(ranks) > 20 else "")
            return (f"round {self.round}: rank{'s' if len(ranks) > 1 else ''} {shown} sent nothing to the root within "
                    f"run.timeout = {self.timeout:g} s (hung or dead); the job is ended")

        dl = self._deadline(missing)
        # yield for ~100 us before the first sleep, as _wait_idle does: the slots of a round whose workers
        # are all done arrive within microseconds, and a sleeping root added 0.4-0.9 ms to every small
        # gather (docs/mpi-performance.md §3)
        spin_until = time.perf_counter() + 1e-4
        while waiting and time.perf_counter() < spin_until:
            os.sched_yield()
            for w in [w for w, rq in waiting.items() if rq.Test()]:
                del waiting[w]
        nap = 2e-5
        while waiting:
            for w in [w for w, rq in waiting.items() if rq.Test()]:
                del waiting[w]
            if not waiting:
                break
            if dl is not None:
                dl.check()
            time.sleep(nap)
            nap = min(nap * 2, self.poll)

    def igather_floats(self, values: np.ndarray) -> tuple[Pending, np.ndarray | None]:
        """Start a gather of a fixed-length float64 vector per rank; finish with :meth:`wait`.

        Used for figures known only after a collective (a worker's own gather time):
        workers post it and move on, the root collects it before writing the round.
        """
        send = np.ascontiguousarray(values, dtype=np.float64)
        recv = np.zeros((self.size, send.size), dtype=np.float64) if self.is_root else None
        req = self.comm.Igather([send, MPI.DOUBLE], [recv, MPI.DOUBLE] if self.is_root else None, root=ROOT)
        return Pending(req, (send, recv)), recv

    def wait(self, pending: Pending) -> None:
        _wait_idle(pending.req, self.poll, self._deadline(self._hung("the gather of the ranks' gather times")))

    def gather_strings(self, s: str) -> list[str] | None:
        """Small start-up metadata (host names); pickled, never on the per-round path."""
        return self.comm.gather(s, root=ROOT)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)
