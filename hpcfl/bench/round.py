"""The compressed gather of one FL round, phase by phase (``hpcfl bench round``).

Collective: every rank calls :func:`bench_round`; rank 0 is the aggregator and
returns the records, ranks ``1..P-1`` host ``clients_per_rank`` clients each
(client ``c`` lives on rank ``1 + c // clients_per_rank``), as in a run.

For every payload size (raw float32 bytes per client) and codec, a *repetition*
is one round:

1. **encode** -- each worker encodes its clients' updates through
   :class:`~hpcfl.codecs.UpdateCodec` with persistent per-client state (so
   stateful codecs run in steady state); the phase time is the slowest worker's
   sum over its clients;
2. **gather**, ``K`` interleaved pairs (order alternating A-B, B-A), each after a
   ``Barrier``:

   * *hpcfl* -- the path a run takes: workers ``pack_frames`` their messages
     into one chunk (before the ``Barrier``: in a run this is the worker's local
     work, counted in ``overhead_s``, not in the gather; timed on its own),
     then :meth:`~hpcfl.comm.transport.Transport.gather_bytes` (every worker's
     slot -- size, figures and first bytes -- to the root point to point, then
     the rest of long chunks into a reused receive buffer, with hpcfl's polling waits), then the root ``unpack_frames`` every
     chunk (timed on its own, ``records_s`` in a run);
   * *bare* -- one blocking ``comm.Gatherv`` of the very same chunk bytes and
     per-rank counts into a preallocated, already-touched receive buffer, counts
     known in advance: the best case of plain mpi4py.

   The time of a sample is the maximum over ranks (IMB's t_max);
3. **decode** -- the root validates and decodes every message (the last hpcfl
   gather's), with per-client root state.

Waits between phases (workers while the root decodes, the root while workers
encode) poll with sleeps, so idle ranks do not steal the CPU from working ones
on an oversubscribed node. Per size, a *bare raw* Gatherv of the uncompressed
float32 bytes is timed as well: sending the update without any codec.

Derived figures (medians unless ``_best``): ``gather_MBps`` / ``bare_MBps`` =
wire bytes / time; ``gather_vs_bare`` = bare time / hpcfl gather time = hpcfl
bandwidth / bare bandwidth (the aim: >= 0.9), where the hpcfl gather is
``gather_bytes`` (slots + rests), the phase a run logs as ``wait_s`` +
``gather_s``; ``framed_vs_bare`` the same with the framing copies added (slowest
worker's ``pack_frames`` + the gather + the root's ``unpack_frames``);
``ratio`` the compression ratio; ``raw_gather_MBps`` = raw bytes / hpcfl gather
time; ``effective_MBps`` = raw bytes / (encode + framed gather + decode);
``speedup_vs_raw`` = bare raw time / (encode + framed gather + decode) (> 1: the
codec pays on this machine). MB/s = 10^6 B/s; sizes in bytes with K, M = 1024, 1024^2.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Mapping, Sequence

import numpy as np
from mpi4py import MPI

from hpcfl.bench.mpi import MIN_ITERS, PROBES, aligned_buffer, idle_wait

__all__ = ["DEFAULT_CODECS", "DEFAULT_SIZES", "bench_round", "bare_gatherv"]

DEFAULT_CODECS = ("identity", "fp16", "topk_ef", "qsgd_zstd")
DEFAULT_SIZES = tuple(1024 * 4 ** i for i in range(8))  # 1 KiB .. 16 MiB raw per client


def _idle_barrier(comm: MPI.Comm) -> None:
    idle_wait(comm.Ibarrier())


def _stats(a: Sequence[float]) -> tuple[float, float, float]:
    v = np.asarray(a, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    return float(v.min()), float(np.median(v)), float(v.max())


def _rate(nbytes: float, s: float) -> float:
    if math.isnan(s):
        return math.nan
    return nbytes / s / 1e6 if s > 0 else math.inf


def bare_gatherv(comm: MPI.Comm, send: np.ndarray, recv: np.ndarray | None, counts: np.ndarray | None,
                 displs: np.ndarray | None) -> float:
    """``Barrier``, then one timed blocking ``Gatherv`` of uint8 ``send``; this rank's seconds."""
    comm.Barrier()
    t0 = MPI.Wtime()
    if recv is not None:
        comm.Gatherv([send, MPI.BYTE], [recv, (counts, displs), MPI.BYTE], 0)
    else:
        comm.Gatherv([send, MPI.BYTE], None, 0)
    return MPI.Wtime() - t0


_CHUNK_BUF = [np.empty(0, dtype=np.uint8)]  # the worker's reused chunk buffer (hpcfl/run/worker.py)


def _hpcfl_gather(tr, msgs: list[bytes], info: np.ndarray) -> tuple[float, float, float, float, list | None]:
    """The run's path: frame (workers), ``Barrier``, ``gather_bytes``, unframe (root).

    Returns (gather_bytes seconds, pack (workers) | unpack (root) seconds, wait, transfer, frames).
    """
    from hpcfl.comm.frames import pack_frames, unpack_frames

    tp = MPI.Wtime()
    chunk = None if tr.is_root else pack_frames(msgs, _CHUNK_BUF[0])
    pack_s = MPI.Wtime() - tp
    if chunk is not None and chunk.base is not _CHUNK_BUF[0]:  # as the worker: keep a buffer that fits
        _CHUNK_BUF[0] = np.empty(int(chunk.size * 1.25) + 4096, dtype=np.uint8)
    tr.comm.Barrier()
    t0 = MPI.Wtime()
    chunks, _, wait_s, transfer_s = tr.gather_bytes(chunk, info)
    t1 = MPI.Wtime()
    if not tr.is_root:
        return t1 - t0, pack_s, wait_s, transfer_s, None
    frames = [unpack_frames(c) for c in chunks]
    return t1 - t0, MPI.Wtime() - t1, wait_s, transfer_s, frames


def _counts(comm: MPI.Comm, nbytes: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every rank's byte count and displacement, on the root (untimed)."""
    mine = np.array([nbytes], dtype=np.int64)
    counts = np.empty(comm.Get_size(), dtype=np.int64) if comm.Get_rank() == 0 else None
    comm.Gather(mine, counts, 0)
    if counts is None:
        return None, None
    displs = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=displs[1:])
    return counts, displs


def _plan(comm: MPI.Comm, t_sample: float, budget: float, lo: int, hi: int) -> int:
    """Samples so that they take about ``budget`` s in all (rank 0 decides, everyone learns)."""
    k = np.zeros(1, dtype=np.int64)
    if comm.Get_rank() == 0:
        k[0] = hi if not t_sample > 0 else int(max(lo, min(hi, budget / t_sample)))
    comm.Bcast(k, 0)
    return int(k[0])


def _bare_raw(comm: MPI.Comm, raw: np.ndarray, budget: float, max_samples: int) -> np.ndarray | None:
    """Timed bare Gatherv of every worker's uncompressed bytes; per-sample max over ranks on the root."""
    counts, displs = _counts(comm, raw.size)
    recv = aligned_buffer(int(counts.sum()), fill=0) if counts is not None else None
    probe = min(bare_gatherv(comm, raw, recv, counts, displs) for _ in range(PROBES))
    worst = np.array([probe])
    comm.Allreduce(MPI.IN_PLACE, worst, MPI.MAX)
    n = _plan(comm, float(worst[0]), budget, MIN_ITERS, max_samples)
    times = np.array([bare_gatherv(comm, raw, recv, counts, displs) for _ in range(n)])
    allt = np.empty((comm.Get_size(), n)) if comm.Get_rank() == 0 else None
    comm.Gather(times, allt, 0)
    return allt.max(axis=0) if allt is not None else None


def bench_round(comm: MPI.Comm, specs: Sequence[tuple[str, Mapping]], sizes: Sequence[int] = DEFAULT_SIZES, *,
                clients_per_rank: int = 1, repeat: int = 5, warmup: int = 1, budget: float = 0.3,
                max_gathers: int = 50, poll_interval: float = 0.0002, recv_buffers: int = 2,
                data: str = "gaussian", seed: int = 0,
                progress: Callable[[dict], None] | None = None) -> list[dict] | None:
    """Measure encode / gather / decode and bare Gatherv; collective. Rank 0 returns one record per point.

    ``specs`` are resolved ``(label, config)`` pairs
    (:func:`hpcfl.bench.codecs.resolve_specs`); ``sizes`` raw bytes per client
    (multiples of 4). ``repeat`` timed rounds after ``warmup`` untimed ones; in
    each round ``K`` hpcfl/bare gather pairs, ``K`` chosen after the warm-up so
    that the gathers of a point take about ``budget`` s (1 to ``max_gathers``).
    ``poll_interval`` and ``recv_buffers`` configure the
    :class:`~hpcfl.comm.transport.Transport` (ablations: 0 blocks inside MPI /
    allocates a fresh receive buffer per gather).
    """
    import torch

    from hpcfl.bench.codecs import routing_for
    from hpcfl.bench.data import make_tensor, matrix_shape
    from hpcfl.codecs import CodecState, UpdateCodec
    from hpcfl.comm.frames import pack_frames
    from hpcfl.comm.transport import Transport

    rank, P = comm.Get_rank(), comm.Get_size()
    if P < 2:
        raise ValueError(f"hpcfl bench round needs at least 2 ranks (root + workers), the world has {P}")
    if warmup < 1 or repeat < 1 or clients_per_rank < 1:
        raise ValueError("warmup, repeat and clients_per_rank must be >= 1")
    for s in sizes:
        if s < 4 or s % 4:
            raise ValueError(f"size {s}: raw bytes per client must be a positive multiple of 4 (float32)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tr = Transport(comm, poll_interval, recv_buffers=recv_buffers)
    W, cpr = P - 1, clients_per_rank
    mine = list(range((rank - 1) * cpr, rank * cpr)) if rank > 0 else []
    clients_of = {w: list(range((w - 1) * cpr, w * cpr)) for w in range(1, P)}
    info = np.zeros(4, dtype=np.float64)  # as many per-rank figures as a run sends with the sizes
    records: list[dict] = []
    try:
        comm.Barrier()
        for size in sizes:
            n = int(size) // 4
            shape = matrix_shape(n)
            xs = {c: torch.from_numpy(np.array(make_tensor(data, n, seed + c))) for c in mine}
            raw = (np.concatenate([xs[c].numpy().reshape(-1).view(np.uint8) for c in mine]) if mine
                   else np.zeros(0, dtype=np.uint8))
            raw_t = _bare_raw(comm, raw, budget / 3, max_gathers * repeat)
            del raw
            for label, cfg in specs:
                uc = UpdateCodec(cfg, routing_for(cfg), [("x", shape)], seed=seed)
                enc_states = {c: CodecState() for c in mine}
                dec_states = {c: CodecState() for c in range(W * cpr)} if rank == 0 else {}
                enc_s, dec_s, hp, bare = [], [], [], []
                warm_pairs: list[float] = []  # this rank's hpcfl + bare seconds per warm-up pair
                wire_bytes = msg_bytes = 0
                K = 2
                for rep in range(warmup + repeat):
                    timed = rep >= warmup
                    t0 = MPI.Wtime()
                    msgs = [uc.encode({"x": xs[c]}, client=c, round=rep, state=enc_states[c]).data for c in mine]
                    t_enc = MPI.Wtime() - t0
                    _idle_barrier(comm)  # the root sleeps while workers encode
                    # the bare variant sends the same bytes the hpcfl path frames (untimed here)
                    chunk = pack_frames(msgs) if rank > 0 else np.zeros(0, dtype=np.uint8)
                    counts, displs = _counts(comm, chunk.size)
                    tr.sync_inline()  # a run agrees on the inline slot through the round token (untimed here too)
                    brecv = aligned_buffer(int(counts.sum()), fill=0) if rank == 0 else None
                    frames = None
                    for k in range(K):
                        pair = 0.0
                        for variant in ((0, 1) if (k + rep) % 2 == 0 else (1, 0)):
                            if variant == 0:
                                t, side, wait_s, transfer_s, fr = _hpcfl_gather(tr, msgs, info)
                                frames = fr if fr is not None else frames
                                if timed:
                                    hp.append((t, side, wait_s, transfer_s))
                            else:
                                t = bare_gatherv(comm, chunk, brecv, counts, displs)
                                if timed:
                                    bare.append(t)
                            pair += t
                        if not timed:
                            warm_pairs.append(pair)
                    t_dec = 0.0
                    if rank == 0:
                        if rep == 0:
                            _check_same(frames, brecv, displs)
                        wire_bytes = int(counts.sum())
                        msg_bytes = sum(len(m) for fw in frames for m in fw)
                        t0 = MPI.Wtime()
                        for w, fw in enumerate(frames, start=1):
                            for c, m in zip(clients_of[w], fw):
                                uc.decode(m, client=c, round=rep, state=dec_states[c])
                        t_dec = MPI.Wtime() - t0
                    _idle_barrier(comm)  # workers sleep while the root decodes
                    if timed:
                        enc_s.append(t_enc)
                        dec_s.append(t_dec)
                    if rep == warmup - 1:
                        worst = np.array([float(np.median(warm_pairs))])
                        comm.Allreduce(MPI.IN_PLACE, worst, MPI.MAX)
                        K = _plan(comm, float(worst[0]), budget / repeat, 1, max_gathers)
                    del msgs, chunk, brecv, frames
                rec = _collect(comm, label, uc, int(size), P, cpr, repeat, K, enc_s, dec_s, hp, bare, raw_t,
                               wire_bytes, msg_bytes, data)
                if rank == 0:
                    records.append(rec)
                    if progress is not None:
                        progress(rec)
                del uc, enc_states, dec_states
            del xs
        comm.Barrier()
    finally:
        torch.set_num_threads(threads)
    return records if rank == 0 else None


def _check_same(frames: list[list[np.ndarray]], brecv: np.ndarray, displs: np.ndarray) -> None:
    """The bare Gatherv delivered the same bytes as the hpcfl path (messages, after the frame header)."""
    for w, fw in enumerate(frames, start=1):
        pos = int(displs[w]) + 8 * (len(fw) + 1)
        for m in fw:
            if not np.array_equal(brecv[pos:pos + len(m)], m):
                raise RuntimeError(f"bare Gatherv and hpcfl gather disagree on rank {w}'s bytes")
            pos += len(m)


def _collect(comm: MPI.Comm, label: str, uc, size: int, P: int, cpr: int, repeat: int, K: int,
             enc_s: list, dec_s: list, hp: list, bare: list, raw_t: np.ndarray | None, wire_bytes: int,
             msg_bytes: int, data: str) -> dict | None:
    """Per-sample maxima over ranks and the derived figures (root); ``None`` elsewhere."""
    mine = {"enc": np.array(enc_s), "dec": np.array(dec_s), "hp": np.array(hp).reshape(-1, 4),
            "bare": np.array(bare)}
    allr = comm.gather(mine, 0)
    if comm.Get_rank() != 0:
        return None
    W = P - 1
    hp_all = np.stack([r["hp"] for r in allr])  # (rank, sample, [gather_bytes, pack|unpack, wait, transfer])
    gather_t = hp_all[:, :, 0].max(axis=0)
    framed_t = hp_all[1:, :, 1].max(axis=0) + gather_t + hp_all[0, :, 1]  # + slowest pack + root unpack
    bare_t = np.stack([r["bare"] for r in allr]).max(axis=0)
    enc_t = np.stack([r["enc"] for r in allr[1:]]).max(axis=0)
    dec_t = allr[0]["dec"]
    clients = W * cpr
    raw_total = clients * size
    transport_t = (hp_all[:, :, 2] + hp_all[:, :, 3]).max(axis=0)  # gather_bytes alone, no framing
    e, g, d, b = (_stats(x) for x in (enc_t, gather_t, dec_t, bare_t))
    tp, fr = _stats(transport_t), _stats(framed_t)
    r_ = _stats(raw_t if raw_t is not None else [])
    round_s = e[1] + fr[1] + d[1]
    return {
        "codec": label, "config_json": json.dumps(uc.codec.get_config(), sort_keys=True), "data": data,
        "size": size, "n": size // 4, "ranks": P, "workers": W, "clients_per_rank": cpr, "clients": clients,
        "raw_bytes": raw_total, "message_bytes": msg_bytes, "wire_bytes": wire_bytes,
        "ratio": raw_total / msg_bytes if msg_bytes else math.inf,
        "repeat": repeat, "gathers": int(gather_t.size), "gathers_per_round": K,
        "encode_min_s": e[0], "encode_median_s": e[1], "encode_max_s": e[2],
        "decode_min_s": d[0], "decode_median_s": d[1], "decode_max_s": d[2],
        "gather_min_s": g[0], "gather_median_s": g[1], "gather_max_s": g[2],
        "bare_min_s": b[0], "bare_median_s": b[1], "bare_max_s": b[2],
        "transport_min_s": tp[0], "transport_median_s": tp[1], "transport_max_s": tp[2],
        "transport_vs_bare": b[1] / tp[1] if tp[1] > 0 else math.nan,
        "framed_min_s": fr[0], "framed_median_s": fr[1], "framed_max_s": fr[2],
        "framed_vs_bare": b[1] / fr[1] if fr[1] > 0 else math.nan,
        "root_wait_median_s": float(np.median(hp_all[0, :, 2])),
        "root_transfer_median_s": float(np.median(hp_all[0, :, 3])),
        "root_unpack_median_s": float(np.median(hp_all[0, :, 1])),
        "pack_median_s": float(np.median(hp_all[1:, :, 1].max(axis=0))),
        "bare_raw_min_s": r_[0], "bare_raw_median_s": r_[1], "bare_raw_max_s": r_[2],
        "bare_raw_samples": int(raw_t.size) if raw_t is not None else 0,
        "gather_MBps": _rate(wire_bytes, g[1]), "bare_MBps": _rate(wire_bytes, b[1]),
        "gather_vs_bare": b[1] / g[1] if g[1] > 0 else math.nan,
        "gather_vs_bare_best": b[0] / g[0] if g[0] > 0 else math.nan,
        "raw_gather_MBps": _rate(raw_total, g[1]), "effective_MBps": _rate(raw_total, round_s),
        "bare_raw_MBps": _rate(raw_total, r_[1]),
        "speedup_vs_raw": r_[1] / round_s if round_s > 0 else math.nan,
    }


# ------------------------------------------------------------------ output

ROUND_FIELDS: dict[str, tuple[str, str, str]] = {
    "codec": ("str", "", "Codec label (id, recipe, or id(params))."),
    "config_json": ("str", "", "Expanded codec config."),
    "data": ("str", "", "Test tensor kind; client c encodes make_tensor(data, n, seed + c)."),
    "size": ("i8", "B", "Raw float32 bytes per client."),
    "n": ("i8", "1", "Elements per client update (size / 4)."),
    "ranks": ("i8", "1", "World size (rank 0 aggregates)."),
    "workers": ("i8", "1", "Ranks hosting clients (ranks - 1)."),
    "clients_per_rank": ("i8", "1", "Clients encoded by each worker per round."),
    "clients": ("i8", "1", "Clients per round (workers x clients_per_rank)."),
    "raw_bytes": ("i8", "B", "Raw bytes delivered per round: clients x size."),
    "message_bytes": ("i8", "B", "Wire messages per round, all clients (last timed round)."),
    "wire_bytes": ("i8", "B", "Gathered bytes per round: messages + frame headers (last timed round)."),
    "ratio": ("f8", "x", "raw_bytes / message_bytes."),
    "repeat": ("i8", "1", "Timed rounds (encode and decode samples)."),
    "gathers": ("i8", "1", "Timed samples of each gather variant (repeat x gathers_per_round)."),
    "gathers_per_round": ("i8", "1", "Interleaved hpcfl/bare gather pairs per round."),
    "encode_min_s": ("f8", "s", "Encode phase: slowest worker's encodes of its clients, fastest round."),
    "encode_median_s": ("f8", "s", "Encode phase, median round."),
    "encode_max_s": ("f8", "s", "Encode phase, slowest round."),
    "decode_min_s": ("f8", "s", "Root decodes every message of a round (validate + decode), fastest round."),
    "decode_median_s": ("f8", "s", "Decode phase, median round."),
    "decode_max_s": ("f8", "s", "Decode phase, slowest round."),
    "gather_min_s": ("f8", "s", "hpcfl gather: Transport.gather_bytes (slots to the root, then rests) after "
                     "a Barrier, max over ranks, fastest sample."),
    "gather_median_s": ("f8", "s", "hpcfl gather, median sample."),
    "gather_max_s": ("f8", "s", "hpcfl gather, slowest sample."),
    "bare_min_s": ("f8", "s", "Bare comm.Gatherv of the same per-rank bytes into a preallocated buffer, "
                   "max over ranks, fastest sample."),
    "bare_median_s": ("f8", "s", "Bare Gatherv, median sample."),
    "bare_max_s": ("f8", "s", "Bare Gatherv, slowest sample."),
    "transport_min_s": ("f8", "s", "Transport.gather_bytes alone (p2p slots + rests, wait_s + "
                        "transfer_s; no framing), max over ranks, fastest sample."),
    "transport_median_s": ("f8", "s", "gather_bytes alone, median sample."),
    "transport_max_s": ("f8", "s", "gather_bytes alone, slowest sample."),
    "transport_vs_bare": ("f8", "1", "bare_median_s / transport_median_s."),
    "framed_min_s": ("f8", "s", "Slowest worker's pack_frames + the hpcfl gather + the root's unpack_frames, "
                     "per sample, fastest."),
    "framed_median_s": ("f8", "s", "Framed gather, median sample."),
    "framed_max_s": ("f8", "s", "Framed gather, slowest sample."),
    "framed_vs_bare": ("f8", "1", "bare_median_s / framed_median_s: the gather with hpcfl's framing copies."),
    "root_wait_median_s": ("f8", "s", "Root: sizes, point to point (gather_bytes wait_s), median."),
    "root_transfer_median_s": ("f8", "s", "Root: rest of long chunks (gather_bytes transfer_s), median."),
    "root_unpack_median_s": ("f8", "s", "Root: unpack_frames of every chunk, median."),
    "pack_median_s": ("f8", "s", "Workers: pack_frames, max over workers, median."),
    "bare_raw_min_s": ("f8", "s", "Bare Gatherv of the uncompressed float32 bytes (no codec), fastest."),
    "bare_raw_median_s": ("f8", "s", "Bare Gatherv of the raw bytes, median."),
    "bare_raw_max_s": ("f8", "s", "Bare Gatherv of the raw bytes, slowest."),
    "bare_raw_samples": ("i8", "1", "Samples of the raw Gatherv."),
    "gather_MBps": ("f8", "MB/s", "wire_bytes / gather_median_s / 1e6."),
    "bare_MBps": ("f8", "MB/s", "wire_bytes / bare_median_s / 1e6."),
    "gather_vs_bare": ("f8", "1", "hpcfl gather bandwidth / bare Gatherv bandwidth = bare_median_s / "
                       "gather_median_s (aim >= 0.9; framing excluded, see framed_vs_bare)."),
    "gather_vs_bare_best": ("f8", "1", "bare_min_s / gather_min_s."),
    "raw_gather_MBps": ("f8", "MB/s", "raw_bytes / gather_median_s / 1e6."),
    "effective_MBps": ("f8", "MB/s", "raw_bytes / (encode + framed gather + decode medians) / 1e6."),
    "bare_raw_MBps": ("f8", "MB/s", "raw_bytes / bare_raw_median_s / 1e6: sending without a codec."),
    "speedup_vs_raw": ("f8", "x", "bare_raw_median_s / (encode + framed gather + decode medians); > 1: the "
                       "codec pays."),
}

UNITS_NOTE = "sizes: raw bytes per client (K = 1024, M = 1024^2); MB/s = 10^6 bytes/s; times are medians"


def _round_rows(records: Sequence[Mapping]) -> tuple[list[str], list[tuple[str, ...]]]:
    from hpcfl.bench.report import _fmt, _size, _time

    head = ["size", "codec", "ratio", "encode", "gather", "bare Gatherv", "gather/bare", "framed/bare", "decode",
            "gather MB/s", "bare MB/s", "raw/gather MB/s", "effective MB/s", "raw Gatherv MB/s", "speedup"]
    rows = []
    for r in records:
        rows.append((_size(r["size"]), r["codec"][:24], _fmt(r["ratio"]), _time(r["encode_median_s"]),
                     _time(r["gather_median_s"]), _time(r["bare_median_s"]), f"{100 * r['gather_vs_bare']:.0f}%",
                     f"{100 * r['framed_vs_bare']:.0f}%",
                     _time(r["decode_median_s"]), _fmt(r["gather_MBps"]), _fmt(r["bare_MBps"]),
                     _fmt(r["raw_gather_MBps"]), _fmt(r["effective_MBps"]), _fmt(r["bare_raw_MBps"]),
                     f"{r['speedup_vs_raw']:.2f}x"))
    return head, rows


def format_round_table(records: Sequence[Mapping]) -> str:
    head, rows = _round_rows(records)
    allrows = [tuple(head)] + rows
    widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in allrows]
    lines.insert(1, "-" * len(lines[0]))
    if records:
        r0 = records[0]
        lines.insert(0, f"# {r0['ranks']} ranks: root + {r0['workers']} workers x {r0['clients_per_rank']} "
                        f"client(s); {UNITS_NOTE}")
    return "\n".join(lines)


def format_round_markdown(records: Sequence[Mapping]) -> str:
    head, rows = _round_rows(records)
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
