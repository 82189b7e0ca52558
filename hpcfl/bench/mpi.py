"""OSU-style MPI micro-benchmarks (``hpcfl bench mpi``) and the in-job calibration.

Every function here is *collective*: all ranks of ``comm`` call it with the same
arguments; rank 0 gets the results, the other ranks ``None`` (except
:func:`calibrate`, which returns the same dict everywhere).

Tests (methodology of OSU osu_latency / osu_bw / osu_gather, landscape.md §1.15):

* ``pingpong`` -- ranks 0 and 1: 0 sends, 1 echoes; one-way time = round trip / 2,
  bandwidth = size / one-way time;
* ``bw`` -- windowed bandwidth: rank 0 posts ``window`` non-blocking sends of the
  same buffer (rank 1 as many receives into one buffer, as OSU does), waits for
  all, then for a 1-byte acknowledgement; bandwidth = size x window / time;
* ``gather`` -- every rank contributes ``size`` bytes to rank 0 (``Gather``),
  after a ``Barrier`` per iteration; the time of an iteration is the maximum over
  ranks (IMB's t_max); bandwidth = (ranks - 1) x size / time (the bytes that
  cross between processes; root's own part is a local copy).

APIs: ``buffer`` (uppercase mpi4py calls on aligned numpy uint8 buffers),
``pickle`` (lowercase calls on the same numpy array, pickled in-band, as
FedML-style code does) and ``pkl5`` (:mod:`mpi4py.util.pkl5`, out-of-band
pickle).

Iterations (OSU defaults, large = >= 8 KiB): ping-pong 100 warm-up / 10,000
timed (large 10 / 1,000), windowed bandwidth 10 / 100 (large 2 / 20),
gather 100 / 1,000 (large 10 / 100). The first ``PROBES`` (3) warm-up iterations are
timed; from their median, rank 0 caps the timed iterations so that a point takes
about ``budget`` seconds (IMB-style time budget, at least ``MIN_ITERS``) and the
warm-up to a tenth of that (at least the 3 probes). Should the iterations turn
out slower than the probes, rank 0 stops the point once it has spent twice the
budget (checked, untimed, after every tenth of the iterations). Every iteration is timed on its own, so min /
median / max are over iterations.

Ranks that take no part in a test (ranks >= 2 in ping-pong) wait in an
``Ibarrier`` polled with sleeps: a rank blocked inside MPICH busy-polls a core,
and on an oversubscribed node it would slow the pair being measured.

Units: sizes in bytes (K, M = 1024, 1024^2); bandwidth in MB/s = 10^6 B/s.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
from mpi4py import MPI

from hpcfl.results.schema import CALIBRATION_FIELDS

__all__ = ["TESTS", "APIS", "DEFAULT_SIZES", "OSU_COUNTS", "LARGE", "MIN_ITERS", "CALIBRATION_DTYPE",
           "bench_mpi", "calibrate", "pow2_sizes", "plan_iterations", "idle_wait", "aligned_buffer"]

TESTS = ("pingpong", "bw", "gather")
APIS = ("buffer", "pickle", "pkl5")
LARGE = 8192
MIN_ITERS = 5
PROBES = 3  # first iterations, timed to plan the point; they count as warm-up
WINDOW = 64
# test -> ((warm-up, iterations) below LARGE, (warm-up, iterations) from LARGE)
OSU_COUNTS = {"pingpong": ((100, 10000), (10, 1000)), "bw": ((10, 100), (2, 20)),
              "gather": ((100, 1000), (10, 100))}
_TAG_PLAN, _TAG_DATA, _TAG_ACK, _TAG_GO = 901, 902, 903, 904


def pow2_sizes(lo: int, hi: int, step: int = 2) -> list[int]:
    """``lo, lo*step, ...`` up to ``hi`` (both powers of two)."""
    out, s = [], int(lo)
    while s <= hi:
        out.append(s)
        s *= step
    return out


DEFAULT_SIZES = tuple(pow2_sizes(1, 16 << 20))


def idle_wait(req: MPI.Request, poll: float = 1e-3) -> None:
    """Complete ``req`` polling ``Test()`` with sleeps (20 us, doubling up to ``poll``)."""
    nap = 2e-5
    while not req.Test():
        time.sleep(nap)
        nap = min(2 * nap, poll)


def _idle_barrier(comm: MPI.Comm) -> None:
    idle_wait(comm.Ibarrier())


def aligned_buffer(n: int, align: int = 64, fill: int = 1) -> np.ndarray:
    """A ``uint8`` array of ``n`` bytes starting on an ``align``-byte boundary, pages touched."""
    raw = np.empty(n + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    a = raw[off:off + n]
    a.fill(fill)
    return a


def plan_iterations(test: str, size: int, t_probe: float, *, warmup: int | None = None,
                    iters: int | None = None, budget: float = 0.2) -> tuple[int, int]:
    """``(warm-up, timed iterations)`` for one point; see the module docstring.

    ``warmup`` / ``iters`` override the OSU small-message counts (large messages
    get a tenth of them); ``budget <= 0`` disables the time cap.
    """
    (ws, its), (wl, itl) = OSU_COUNTS[test]
    large = size >= LARGE
    w = (wl if large else ws) if warmup is None else (max(1, warmup // 10) if large else warmup)
    n = (itl if large else its) if iters is None else (max(1, iters // 10) if large else iters)
    if budget > 0 and t_probe > 0 and math.isfinite(t_probe):
        cap = int(budget / t_probe)
        n = max(min(MIN_ITERS, n), min(n, cap))
        w = min(w, max(PROBES, n // 10))
    return max(PROBES, w), max(1, n)


# ------------------------------------------------------------------ one iteration per test and API

def _api_comm(comm: MPI.Comm, api: str):
    if api == "pkl5":
        from mpi4py.util import pkl5

        return pkl5.Intracomm(comm)
    return comm


def _pingpong_iter(comm, api: str, buf: np.ndarray, rbuf: np.ndarray) -> Callable[[], float]:
    rank = comm.Get_rank()
    wt = MPI.Wtime
    if api == "buffer":
        sb, rb = [buf, MPI.BYTE], [rbuf, MPI.BYTE]
        if rank == 0:
            def it() -> float:
                t0 = wt()
                comm.Send(sb, 1, _TAG_DATA)
                comm.Recv(rb, 1, _TAG_DATA)
                return (wt() - t0) / 2
        else:
            def it() -> float:
                comm.Recv(rb, 0, _TAG_DATA)
                comm.Send(sb, 0, _TAG_DATA)
                return 0.0
        return it
    pc = _api_comm(comm, api)
    if rank == 0:
        def it() -> float:
            t0 = wt()
            pc.send(buf, 1, _TAG_DATA)
            pc.recv(None, 1, _TAG_DATA)
            return (wt() - t0) / 2
    else:
        def it() -> float:
            pc.send(pc.recv(None, 0, _TAG_DATA), 0, _TAG_DATA)
            return 0.0
    return it


def _bw_iter(comm, api: str, buf: np.ndarray, rbuf: np.ndarray, window: int) -> Callable[[], float]:
    rank = comm.Get_rank()
    wt = MPI.Wtime
    ack = np.zeros(1, dtype=np.uint8)
    if api == "buffer":
        sb, rb = [buf, MPI.BYTE], [rbuf, MPI.BYTE]
        if rank == 0:
            def it() -> float:
                t0 = wt()
                MPI.Request.Waitall([comm.Isend(sb, 1, _TAG_DATA) for _ in range(window)])
                comm.Recv(ack, 1, _TAG_ACK)
                return wt() - t0
        else:
            def it() -> float:
                MPI.Request.Waitall([comm.Irecv(rb, 0, _TAG_DATA) for _ in range(window)])
                comm.Send(ack, 0, _TAG_ACK)
                return 0.0
        return it
    pc = _api_comm(comm, api)
    if rank == 0:
        def it() -> float:
            t0 = wt()
            for r in [pc.isend(buf, 1, _TAG_DATA) for _ in range(window)]:
                r.wait()
            comm.Recv(ack, 1, _TAG_ACK)
            return wt() - t0
    else:
        def it() -> float:
            for _ in range(window):
                pc.recv(None, 0, _TAG_DATA)
            comm.Send(ack, 0, _TAG_ACK)
            return 0.0
    return it


def _gather_iter(comm, api: str, buf: np.ndarray, rbuf: np.ndarray | None) -> Callable[[], float]:
    wt = MPI.Wtime
    if api == "buffer":
        sb = [buf, MPI.BYTE]
        rb = [rbuf, MPI.BYTE] if rbuf is not None else None

        def it() -> float:
            comm.Barrier()
            t0 = wt()
            comm.Gather(sb, rb, 0)
            return wt() - t0
        return it
    pc = _api_comm(comm, api)

    def it() -> float:
        comm.Barrier()
        t0 = wt()
        pc.gather(buf, 0)
        return wt() - t0
    return it


# ------------------------------------------------------------------ running one point

def _timed(it: Callable[[], float], iters: int, budget: float, stop_now: Callable[[bool], bool]) -> np.ndarray:
    """Run ``it`` up to ``iters`` times in blocks of a tenth; between blocks ``stop_now(over)`` shares
    rank 0's verdict (``over``: 2 x budget spent and at least MIN_ITERS done), untimed."""
    times = np.empty(iters, dtype=np.float64)
    done, block = 0, max(1, iters // 10)
    t0 = time.perf_counter()
    while done < iters:
        for i in range(done, min(iters, done + block)):
            times[i] = it()
        done = min(iters, done + block)
        if budget > 0 and done < iters:
            if stop_now(done >= MIN_ITERS and time.perf_counter() - t0 > 2 * budget):
                break
    return times[:done]


def _pair_point(comm, it: Callable[[], float], test: str, size: int, opts: dict
                ) -> tuple[np.ndarray | None, int]:
    """Ranks 0 and 1 run ``it``; the others idle. Returns rank 0's per-iteration times and the warm-up."""
    rank = comm.Get_rank()
    if rank >= 2:
        _idle_barrier(comm)
        return None, 0
    t_probe = float(np.median([it() for _ in range(PROBES)]))
    plan = np.zeros(2, dtype=np.int64)
    if rank == 0:
        plan[:] = plan_iterations(test, size, t_probe if test != "pingpong" else 2 * t_probe, **opts)
        comm.Send(plan, 1, _TAG_PLAN)
    else:
        comm.Recv(plan, 0, _TAG_PLAN)
    warmup, iters = int(plan[0]), int(plan[1])
    for _ in range(warmup - PROBES):
        it()
    flag = np.zeros(1, dtype=np.int8)

    def stop_now(over: bool) -> bool:
        if rank == 0:
            flag[0] = over
            comm.Send(flag, 1, _TAG_PLAN)
        else:
            comm.Recv(flag, 0, _TAG_PLAN)
        return bool(flag[0])

    times = _timed(it, iters, opts["budget"], stop_now)
    _idle_barrier(comm)
    return (times if rank == 0 else None), warmup


def _collective_point(comm, it: Callable[[], float], test: str, size: int, opts: dict
                      ) -> tuple[np.ndarray | None, int]:
    """Every rank runs ``it``; returns the per-iteration maximum over ranks on rank 0, and the warm-up."""
    rank = comm.Get_rank()
    t_probe = np.array([float(np.median([it() for _ in range(PROBES)]))])
    comm.Allreduce(MPI.IN_PLACE, t_probe, MPI.MAX)
    plan = np.zeros(2, dtype=np.int64)
    if rank == 0:
        plan[:] = plan_iterations(test, size, float(t_probe[0]), **opts)
    comm.Bcast(plan, 0)
    warmup, iters = int(plan[0]), int(plan[1])
    for _ in range(warmup - PROBES):
        it()
    flag = np.zeros(1, dtype=np.int8)

    def stop_now(over: bool) -> bool:
        flag[0] = over if rank == 0 else 0
        comm.Bcast(flag, 0)
        return bool(flag[0])

    times = _timed(it, iters, opts["budget"], stop_now)
    allt = np.empty((comm.Get_size(), times.size), dtype=np.float64) if rank == 0 else None
    comm.Gather(times, allt, 0)
    return (allt.max(axis=0) if rank == 0 else None), warmup


def _record(test: str, api: str, size: int, ranks: int, window: int, warmup: int, times: np.ndarray) -> dict:
    if test == "pingpong":
        moved = size
    elif test == "bw":
        moved = size * window
    else:
        moved = (ranks - 1) * size
    t = np.sort(times)
    tmin, tmed, tmax, tmean = float(t[0]), float(np.median(t)), float(t[-1]), float(t.mean())
    mbps = (lambda s: moved / s / 1e6 if s > 0 else math.inf)
    return {"test": test, "api": api, "size": int(size), "ranks": int(ranks),
            "window": int(window if test == "bw" else 1), "bytes_moved": int(moved),
            "warmup": int(warmup), "iters": int(times.size),
            "t_min_s": tmin, "t_median_s": tmed, "t_max_s": tmax, "t_mean_s": tmean,
            "MBps_median": mbps(tmed), "MBps_best": mbps(tmin), "MBps_mean": mbps(tmean)}


def bench_mpi(comm: MPI.Comm, tests: Sequence[str] = TESTS, apis: Sequence[str] = ("buffer", "pickle"),
              sizes: Sequence[int] = DEFAULT_SIZES, *, warmup: int | None = None, iters: int | None = None,
              budget: float = 0.2, window: int = WINDOW,
              progress: Callable[[dict], None] | None = None) -> list[dict] | None:
    """Run every (test, size, api) point; collective. Rank 0 returns the records."""
    for t in tests:
        if t not in TESTS:
            raise ValueError(f"unknown test {t!r}; known: {', '.join(TESTS)}")
    for a in apis:
        if a not in APIS:
            raise ValueError(f"unknown api {a!r}; known: {', '.join(APIS)}")
    rank, size_w = comm.Get_rank(), comm.Get_size()
    if size_w < 2:
        raise ValueError(f"hpcfl bench mpi needs at least 2 ranks, the world has {size_w}")
    opts = {"warmup": warmup, "iters": iters, "budget": budget}
    records: list[dict] = []
    comm.Barrier()
    for test in tests:
        for size in sizes:
            size = int(size)
            buf = aligned_buffer(size, fill=1 + rank % 200)
            if test == "gather":
                rbuf = aligned_buffer(size * size_w, fill=0) if rank == 0 else None
            else:
                rbuf = aligned_buffer(size, fill=0)
            for api in apis:
                if test == "pingpong":
                    times, w = _pair_point(comm, _pingpong_iter(comm, api, buf, rbuf), test, size, opts)
                elif test == "bw":
                    times, w = _pair_point(comm, _bw_iter(comm, api, buf, rbuf, window), test, size, opts)
                else:
                    times, w = _collective_point(comm, _gather_iter(comm, api, buf, rbuf), test, size, opts)
                if rank == 0:
                    rec = _record(test, api, size, size_w, window, w, times)
                    records.append(rec)
                    if progress is not None:
                        progress(rec)
            del buf, rbuf
    comm.Barrier()
    return records if rank == 0 else None


# ------------------------------------------------------------------ in-job calibration

# the run file's /calibration/table (hpcfl.results.schema documents it)
CALIBRATION_DTYPE = np.dtype([(m.name, m.dtype) for m in CALIBRATION_FIELDS])
CALIBRATION_SIZES = (8, 1 << 20, 16 << 20)
CALIBRATION_GATHER_SIZE = 1 << 20


def _calib_peers(n_workers: int, max_peers: int) -> list[int]:
    if n_workers <= max_peers:
        return list(range(1, n_workers + 1))
    return sorted({1 + round(i * (n_workers - 1) / (max_peers - 1)) for i in range(max_peers)})


def calibrate(comm: MPI.Comm, budget_s: float = 0.5, *, sizes: Sequence[int] = CALIBRATION_SIZES,
              gather_size: int = CALIBRATION_GATHER_SIZE, max_peers: int = 8, max_iters: int = 1000) -> dict:
    """A short in-job measurement of the MPI path; collective, same result on every rank.

    Buffer-based ping-pong (``Send``/``Recv``, one-way = round trip / 2) between
    rank 0 and each worker (at most ``max_peers``, evenly spread) for each of
    ``sizes`` (default 8 B, 1 MiB, 16 MiB), then a ``Gather`` of ``gather_size``
    bytes from every rank to rank 0 (time = maximum over ranks). Each point runs
    one probe, then ``clamp(share / probe, 3, max_iters)`` timed iterations where
    ``share`` splits 70 % of ``budget_s`` over the ping-pong points and 30 % to
    the gather. Workers not in the current ping-pong wait with sleeping polls.

    Returns ``{"latency_s", "bw_1MiB_Bps", "bw_16MiB_Bps", "gather_s",
    "gather_Bps", "world_size", "peers", "budget_s", "elapsed_s", "table"}``:
    ``latency_s`` is the median over peers of the median one-way time of the
    smallest size, ``bw_<size>_Bps`` the median over peers of ``size /
    median one-way time`` for the other sizes, ``gather_Bps`` ``(ranks - 1) x
    gather_size / median gather time``; ``table`` a :data:`CALIBRATION_DTYPE`
    array (one row per peer and size, then the gather with peer -1). With one
    rank every figure is NaN and the table empty.
    """
    t_start = MPI.Wtime()
    rank, P = comm.Get_rank(), comm.Get_size()
    sizes = [int(s) for s in sizes]
    peers = _calib_peers(P - 1, max(1, max_peers)) if P > 1 else []
    rows: list[tuple] = []

    def span_iters(t_probe: float, share: float) -> int:
        if not t_probe > 0:
            return max_iters
        return int(max(3, min(max_iters, share / t_probe)))

    share = 0.7 * budget_s / max(1, len(peers) * len(sizes))
    big = aligned_buffer(max(sizes + [1]), fill=1)
    go = np.zeros(1, dtype=np.int64)
    n_it = np.zeros(1, dtype=np.int64)
    if rank == 0:
        for p in peers:
            comm.Send(go, p, _TAG_GO)
            for s in sizes:
                b = [big[:s], MPI.BYTE]
                t0 = MPI.Wtime()
                comm.Send(b, p, _TAG_DATA)
                comm.Recv(b, p, _TAG_DATA)
                n = span_iters(MPI.Wtime() - t0, share)
                n_it[0] = n
                comm.Send(n_it, p, _TAG_PLAN)
                times = np.empty(n)
                for i in range(n):
                    t0 = MPI.Wtime()
                    comm.Send(b, p, _TAG_DATA)
                    comm.Recv(b, p, _TAG_DATA)
                    times[i] = (MPI.Wtime() - t0) / 2
                med = float(np.median(times))
                rows.append((b"pingpong", p, s, n, float(times.min()), med, float(times.max()),
                             s / med / 1e6 if med > 0 else math.inf))
    elif rank in peers:
        idle_wait(comm.Irecv(go, 0, _TAG_GO))
        for s in sizes:
            b = [big[:s], MPI.BYTE]
            comm.Recv(b, 0, _TAG_DATA)
            comm.Send(b, 0, _TAG_DATA)
            comm.Recv(n_it, 0, _TAG_PLAN)
            for _ in range(int(n_it[0])):
                comm.Recv(b, 0, _TAG_DATA)
                comm.Send(b, 0, _TAG_DATA)
    _idle_barrier(comm)
    del big

    gather_med = math.nan
    if P > 1:
        gbuf = aligned_buffer(gather_size, fill=1)
        grecv = aligned_buffer(gather_size * P, fill=0) if rank == 0 else None
        it = _gather_iter(comm, "buffer", gbuf, grecv)
        probe = np.array([it()])
        worst = np.zeros(1)
        comm.Allreduce(probe, worst, MPI.MAX)
        n = span_iters(float(worst[0]), 0.3 * budget_s)
        times = np.array([it() for _ in range(n)])
        allt = np.empty((P, n)) if rank == 0 else None
        comm.Gather(times, allt, 0)
        if rank == 0:
            t = allt.max(axis=0)
            gather_med = float(np.median(t))
            moved = (P - 1) * gather_size
            rows.append((b"gather", -1, gather_size, n, float(t.min()), gather_med, float(t.max()),
                         moved / gather_med / 1e6 if gather_med > 0 else math.inf))

    out = None
    if rank == 0:
        table = np.array(rows, dtype=CALIBRATION_DTYPE)
        pp = table[table["test"] == b"pingpong"]
        res: dict = {}
        for i, s in enumerate(sizes):
            sel = pp[pp["size"] == s]
            med = float(np.median(sel["t_median_s"])) if sel.size else math.nan
            if i == 0:
                res["latency_s"] = med
            else:
                res[f"bw_{_size_key(s)}_Bps"] = (float(np.median(s / sel["t_median_s"]))
                                                 if sel.size else math.nan)
        res["gather_s"] = gather_med
        res["gather_Bps"] = (P - 1) * gather_size / gather_med if gather_med > 0 else math.nan
        res.update(world_size=P, peers=len(peers), budget_s=float(budget_s), table=table)
        out = res
    out = comm.bcast(out, 0)
    out["elapsed_s"] = float(comm.allreduce(MPI.Wtime() - t_start, MPI.MAX))
    return out


def _size_key(n: int) -> str:
    for unit, m in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return f"{n}B"



# ------------------------------------------------------------------ output

# name -> (HDF5 dtype, unit, meaning), as hpcfl.bench.report.CODEC_FIELDS
MPI_FIELDS: dict[str, tuple[str, str, str]] = {
    "test": ("str", "", "pingpong (ranks 0<->1), bw (OSU windowed, 0->1) or gather (all ranks -> 0)."),
    "api": ("str", "", "buffer (Send/Recv/Isend/Gather on numpy uint8), pickle (send/recv/isend/gather "
            "of the same ndarray, in-band pickle) or pkl5 (mpi4py.util.pkl5, out-of-band pickle)."),
    "size": ("i8", "B", "Message size (per rank for gather)."),
    "ranks": ("i8", "1", "World size."),
    "window": ("i8", "1", "Messages in flight per bw iteration (1 for the other tests)."),
    "bytes_moved": ("i8", "B", "Bytes per timed unit: size (pingpong, one way), size x window (bw), "
                    "(ranks - 1) x size (gather)."),
    "warmup": ("i8", "1", "Untimed iterations (incl. the 3 timed probes)."),
    "iters": ("i8", "1", "Timed iterations (each timed on its own)."),
    "t_min_s": ("f8", "s", "Fastest iteration: one-way time (pingpong), window time (bw), gather time, "
                "max over ranks (gather)."),
    "t_median_s": ("f8", "s", "Median iteration."),
    "t_max_s": ("f8", "s", "Slowest iteration."),
    "t_mean_s": ("f8", "s", "Mean iteration (what OSU reports)."),
    "MBps_median": ("f8", "MB/s", "bytes_moved / t_median_s / 1e6."),
    "MBps_best": ("f8", "MB/s", "bytes_moved / t_min_s / 1e6."),
    "MBps_mean": ("f8", "MB/s", "bytes_moved / t_mean_s / 1e6."),
}

UNITS_NOTE = "sizes in bytes (K = 1024, M = 1024^2); MB/s = 10^6 bytes/s"

_TEST_TITLE = {
    "pingpong": "ping-pong 0<->1: one-way time = round trip / 2; MB/s = size / one-way time",
    "bw": "windowed bandwidth 0->1 (OSU osu_bw): time per window; MB/s = size x window / time",
    "gather": "Gather to rank 0 (Barrier per iteration; time = max over ranks); MB/s = (ranks-1) x size / time",
}


def _mpi_rows(records: Sequence[dict]) -> list[tuple[str, int, list[str], list[tuple[str, ...]]]]:
    from hpcfl.bench.report import _fmt, _size, _time

    out = []
    for test in [t for t in TESTS if any(r["test"] == t for r in records)]:
        rs = [r for r in records if r["test"] == test]
        apis = [a for a in APIS if any(r["api"] == a for r in rs)]
        head = ["size"]
        for a in apis:
            head += [f"{a} median", "min", "max", "MB/s", "iters"]
        if "buffer" in apis and len(apis) > 1:
            head += [f"buffer/{a}" for a in apis if a != "buffer"]
        rows = []
        for size in sorted({r["size"] for r in rs}):
            by = {r["api"]: r for r in rs if r["size"] == size}
            row = [_size(size)]
            for a in apis:
                r = by.get(a)
                row += ([_time(r["t_median_s"]), _time(r["t_min_s"]), _time(r["t_max_s"]), _fmt(r["MBps_median"]),
                         str(r["iters"])] if r else ["-"] * 5)
            if "buffer" in apis and len(apis) > 1:
                for a in apis:
                    if a != "buffer":
                        ok = "buffer" in by and a in by
                        row.append(f"{by[a]['t_median_s'] / by['buffer']['t_median_s']:.1f}x" if ok else "-")
            rows.append(tuple(row))
        ranks = rs[0]["ranks"]
        out.append((test, ranks, head, rows))
    return out


def format_mpi_table(records: Sequence[dict]) -> str:
    """One fixed-width table per test, APIs side by side (times: median, min, max over iterations)."""
    parts = []
    for test, ranks, head, rows in _mpi_rows(records):
        allrows = [tuple(head)] + rows
        widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in allrows]
        lines.insert(1, "-" * len(lines[0]))
        parts.append(f"# {_TEST_TITLE[test]} ({ranks} ranks)\n" + "\n".join(lines))
    return "\n\n".join(parts) + f"\n\n# {UNITS_NOTE}; buffer/X = X's median time / buffer's"


def format_mpi_markdown(records: Sequence[dict]) -> str:
    parts = []
    for test, ranks, head, rows in _mpi_rows(records):
        lines = [f"**{_TEST_TITLE[test]}** ({ranks} ranks)", "",
                 "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
