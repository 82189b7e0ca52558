"""The round loop of rank 0: broadcast, gather, decode, aggregate, step, evaluate, log."""

from __future__ import annotations

import math

import numpy as np
import torch
from mpi4py import MPI

from hpcfl.codecs import CodecState
from hpcfl.comm.frames import unpack_frames
from hpcfl.comm.transport import Transport
from hpcfl.errors import WireFormatError
from hpcfl.fl.evaluate import evaluate
from hpcfl.fl.sampling import host_rank, sample_clients
from hpcfl.fl.server import ServerOptimizer, client_weights
from hpcfl.models import flat_params, load_flat_
from hpcfl.results.writer import RunLog
from hpcfl.run.faults import maybe_fail
from hpcfl.run.progress import Progress
from hpcfl.run.setup import CLIENT_RECORD, Setup

__all__ = ["run_root"]


def _offsets(s: Setup) -> list[tuple[str, int, int]]:
    out, off = [], 0
    for name, shape in s.params:
        n = int(np.prod(shape))
        out.append((name, off, n))
        off += n
    return out


def run_root(s: Setup, tr: Transport, log: RunLog, progress: Progress) -> None:
    job = s.job
    seed, R, C, W = job.run.seed, job.run.rounds, job.data.n_clients, tr.size
    theta = flat_params(s.model)            # the global model, float32, updated in place
    flat = theta.numpy()                    # shared memory with theta: what Bcast sends
    opt = ServerOptimizer(job.server.lr, job.server.momentum)
    dec_states = {c: CodecState() for c in range(C)}
    offsets = _offsets(s)
    x_test = torch.from_numpy(s.data.x_test)
    y_test = torch.from_numpy(s.data.y_test)
    model_bytes = 4 * s.n_params
    t_start = MPI.Wtime()
    tcfg = job.train
    for r in range(R):
        t0 = MPI.Wtime()
        _, bcast_s = tr.bcast_model(flat, r)
        maybe_fail(tr.rank, r)
        sampled = sample_clients(C, r, seed, tcfg.clients_per_round, tcfg.client_fraction)
        per_rank = np.zeros(W, dtype=np.int64)
        for c in sampled:
            per_rank[host_rank(int(c), tr.n_workers)] += 1
        chunks, infos, wait_s, gather_s = tr.gather_bytes(None, np.array([bcast_s, 0.0, 0.0, 0.0]))
        t1 = MPI.Wtime()
        pending, gather_times = tr.igather_floats(np.array([wait_s + gather_s]))

        # frame 0 of each chunk: the client records; then messages in client-id order
        msg_of: dict[int, np.ndarray] = {}
        rec_parts = []
        for w, chunk in enumerate(chunks, start=1):
            hosted = [int(c) for c in sampled if host_rank(int(c), tr.n_workers) == w]
            try:
                frames = unpack_frames(chunk)
                if len(frames) != len(hosted) + 1:
                    raise ValueError(f"{len(frames) - 1} messages for {len(hosted)} sampled clients")
                recs = frames[0].view(CLIENT_RECORD)
                if recs["client"].tolist() != hosted:
                    raise ValueError(f"records for clients {recs['client'].tolist()}, expected {hosted}")
            except ValueError as e:
                raise WireFormatError(f"rank {w} chunk", 0, f"round {r}: {e}") from None
            rec_parts.append(recs)
            msg_of.update(zip(hosted, frames[1:]))
        crecs = np.concatenate(rec_parts) if rec_parts else np.zeros(0, dtype=CLIENT_RECORD)
        records_s = MPI.Wtime() - t1
        if _save_round(job.log.save_messages, r, R):
            _save_messages(log.path, r, msg_of)
        weights = client_weights([int(s.n_samples[c]) for c in sampled], job.server.weighting)
        agg = torch.zeros_like(theta)
        decode_s = np.full(C, np.nan)
        t_agg = 0.0
        stats = {"payload_bytes": 0, "header_bytes": 0}
        for c, w in zip(sampled.tolist(), weights):
            ta = MPI.Wtime()
            res = s.codec.decode(msg_of[c], client=c, round=r, state=dec_states[c])
            tb = MPI.Wtime()
            for name, off, n in offsets:
                agg[off:off + n].add_(res.update[name].reshape(-1), alpha=w)
            decode_s[c] = tb - ta
            t_agg += MPI.Wtime() - tb
            stats["payload_bytes"] += res.payload_bytes
            stats["header_bytes"] += res.header_bytes
        ta = MPI.Wtime()
        opt.step(theta, agg)
        aggregate_s = t_agg + MPI.Wtime() - ta

        evaluate_now = (r + 1) % job.run.eval_every == 0 or r == R - 1
        loss = acc = math.nan
        eval_s = 0.0
        if evaluate_now:
            te = MPI.Wtime()
            load_flat_(s.model, theta)
            loss, acc = evaluate(s.model, x_test, y_test)
            eval_s = MPI.Wtime() - te
        t_end = MPI.Wtime()
        round_s = t_end - t0

        # tables
        cl = {k: np.full(C, np.nan) for k in ("train_s", "encode_s", "train_loss", "recon_max_abs", "recon_rel_l2")}
        ints = {k: np.zeros(C, dtype=np.int64) for k in ("raw_bytes", "payload_bytes", "header_bytes",
                                                        "message_bytes", "downlink_bytes")}
        part = np.zeros(C, dtype=np.uint8)
        ids = crecs["client"]
        part[ids] = 1
        for k in cl:
            cl[k][ids] = crecs[k]
        for k in ("raw_bytes", "payload_bytes", "header_bytes"):
            ints[k][ids] = crecs[k]
        ints["message_bytes"] = ints["payload_bytes"] + ints["header_bytes"]
        ints["downlink_bytes"][ids] = model_bytes
        clients = {**cl, **ints, "participated": part, "decode_s": decode_s}
        tr.wait(pending)  # workers posted their gather times right after the gather
        ranks = {"bcast_s": infos[:, 0], "compute_s": infos[:, 1], "n_clients": infos[:, 2].astype(np.int64),
                 "idle_s": infos[:, 3], "gather_s": gather_times[:, 0]}
        uplink = int(ints["message_bytes"].sum())
        raw = int(ints["raw_bytes"].sum())
        nsamp = s.n_samples[sampled].astype(float)
        train_loss = float(np.sum(crecs_sorted(crecs, sampled)["train_loss"] * nsamp) / nsamp.sum())
        critical = (bcast_s + float(infos[1:, 1].max(initial=0.0)) + gather_s + records_s
                    + float(np.nansum(decode_s)) + aggregate_s + eval_s)
        server = {
            "round": r, "wall_time": t_end - t_start, "accuracy": acc, "loss": loss, "train_loss": train_loss,
            "n_participants": len(sampled), "bcast_s": bcast_s, "wait_s": wait_s, "gather_s": gather_s,
            "records_s": records_s, "decode_s": float(np.nansum(decode_s)), "aggregate_s": aggregate_s,
            "eval_s": eval_s, "round_s": round_s, "critical_s": critical, "overhead_s": round_s - critical,
            "uplink_bytes": uplink, "payload_bytes": stats["payload_bytes"],
            "header_bytes": stats["header_bytes"], "raw_bytes": raw,
            "downlink_bytes": model_bytes * len(sampled),
            "compression_ratio": raw / uplink if uplink else math.nan,
        }
        if stats["payload_bytes"] + stats["header_bytes"] != uplink:
            raise RuntimeError(f"round {r}: bytes decoded at the root ({stats}) differ from the bytes "
                               f"the clients reported ({uplink})")
        tl = MPI.Wtime()
        log.append_round(server, clients, ranks)
        log.set_round_value("log_s", MPI.Wtime() - tl)
        progress.round(r, acc, uplink, server["compression_ratio"], round_s)


def _save_round(mode: str, r: int, R: int) -> bool:
    return mode == "all" or (mode == "first" and r == 0) or (mode == "last" and r == R - 1)


def _save_messages(out, r: int, msg_of: dict[int, np.ndarray]) -> None:
    """Raw messages as received, one file each: <out>.messages/round00003-client00012.hpfl."""
    d = out.with_name(out.name + ".messages")
    d.mkdir(exist_ok=True)
    for c, m in msg_of.items():
        (d / f"round{r:05d}-client{c:05d}.hpfl").write_bytes(m.tobytes())


def crecs_sorted(crecs: np.ndarray, sampled: np.ndarray) -> np.ndarray:
    """Records in the order of ``sampled`` (workers send them grouped by rank)."""
    order = {int(c): i for i, c in enumerate(crecs["client"])}
    return crecs[[order[int(c)] for c in sampled]]
