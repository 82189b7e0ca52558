"""The round loop of rank 0: broadcast, gather, decode, aggregate, step, evaluate, log."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from hpcfl.codecs import CodecState
from hpcfl.codecs.update import GlobalView
from hpcfl.comm.transport import Transport
from hpcfl.errors import WireFormatError
from hpcfl.errors import NumericalFault, UsageError
from hpcfl.fl.evaluate import evaluate
from hpcfl.fl.link import links_for_job
from hpcfl.fl.sampling import host_rank, sample_clients
from hpcfl.fl.server import ServerOptimizer, client_weights
from hpcfl.models import flat_params, load_flat_
from hpcfl.results.writer import STAT_DTYPE, RunLog
from hpcfl.run import checkpoint
from hpcfl.run.chunk import CLIENT_RECORD, unpack_chunk
from hpcfl.run.faults import maybe_fail
from hpcfl.run.memory import rss_bytes
from hpcfl.run.progress import Progress
from hpcfl.run.setup import Setup

__all__ = ["run_root", "Root"]


@dataclass
class Received:
    """One round's gathered traffic, in client-id order."""

    records: np.ndarray          # CLIENT_RECORD rows
    messages: dict[int, np.ndarray]
    stats: np.ndarray            # STAT_DTYPE rows
    update_ids: np.ndarray
    update_vectors: np.ndarray
    infos: np.ndarray            # per-rank figures riding with the sizes
    wait_s: float
    gather_s: float
    records_s: float


class Root:
    def __init__(self, s: Setup, tr: Transport, log: RunLog, progress: Progress, resume_k: int | None = None):
        self.s, self.tr, self.log, self.progress, self.job = s, tr, log, progress, s.job
        self.C = self.job.data.n_clients
        self.theta = flat_params(s.model)   # the global model, float32, updated in place
        self.flat = self.theta.numpy()      # shares memory with theta: what the broadcast sends
        self.prev: torch.Tensor | None = None
        self.opt = ServerOptimizer(self.job.server.lr, self.job.server.momentum)
        self.dec_states = {c: CodecState() for c in range(self.C)}
        self.last_round = np.full(self.C, -1, dtype=np.int64)  # last participation, per client
        self.offsets = []
        off = 0
        for name, shape in s.params:
            n = int(np.prod(shape))
            self.offsets.append((name, off, n))
            off += n
        self.x_test = torch.from_numpy(s.data.x_test)
        self.y_test = torch.from_numpy(s.data.y_test)
        self.dims = s.update_dims()
        link = self.job.link
        self.links = links_for_job(link.to_dict(), self.C, self.job.run.seed) if link.mode != "off" else None
        self.start = 0
        if resume_k is not None:
            self._restore(resume_k)

    def _restore(self, k: int) -> None:
        ck = checkpoint.read_root(self.log.path, k)
        if ck["job_hash"] != self.job.hash_without_rounds:
            raise UsageError(f"{self.log.path}: checkpoint after round {k} was written by another job "
                             f"({ck['job_hash']}, this one is {self.job.hash_without_rounds})")
        self.theta.copy_(torch.from_numpy(ck["theta"]))
        self.opt.velocity = None if ck["velocity"] is None else torch.from_numpy(ck["velocity"])
        self.prev = None if ck["prev"] is None else torch.from_numpy(ck["prev"])
        self.last_round[:] = ck["last_round"]
        for c, st in ck["states"].items():
            self.dec_states[c] = st
        self.start = k

    def _checkpoint(self, k: int) -> float:
        every, R = self.job.run.checkpoint_every, self.job.run.rounds
        if not every or (k % every and k != R):
            return 0.0
        t = MPI.Wtime()
        v = self.opt.velocity
        checkpoint.write_root(self.log.path, k, job_hash=self.job.hash_without_rounds, world_size=self.tr.size,
                              theta=self.theta.numpy(), velocity=None if v is None else v.numpy(),
                              prev=None if self.prev is None else self.prev.numpy(), last_round=self.last_round,
                              states=self.dec_states)
        return MPI.Wtime() - t

    # ------------------------------------------------------------------ steps
    def receive(self, r: int, sampled: np.ndarray, bcast_s: float) -> tuple[Received, object]:
        tr = self.tr
        chunks, infos, wait_s, gather_s = tr.gather_bytes(None, np.array([bcast_s, 0.0, 0.0, 0.0, 0.0,
                                                                            rss_bytes()]))
        t1 = MPI.Wtime()
        pending = tr.igather_floats(np.array([wait_s + gather_s]))
        ndims = 0 if self.dims is None else len(self.dims)
        parts, msgs = [], {}
        for w, chunk in enumerate(chunks, start=1):
            hosted = [int(c) for c in sampled if host_rank(int(c), tr.n_workers) == w]
            try:
                ch = unpack_chunk(chunk, hosted, ndims)
            except ValueError as e:
                raise WireFormatError(f"rank {w} chunk", 0, f"round {r}: {e}") from None
            parts.append(ch)
            msgs.update(zip(hosted, ch.messages))

        def cat(xs, dtype, shape=(0,)):
            return np.concatenate(xs) if xs else np.zeros(shape, dtype=dtype)

        rec = Received(cat([p.records for p in parts], CLIENT_RECORD), msgs, cat([p.stats for p in parts], STAT_DTYPE),
                       cat([p.update_ids for p in parts], np.int64),
                       cat([p.update_vectors for p in parts], np.float32, (0, ndims)), infos, wait_s, gather_s,
                       MPI.Wtime() - t1)
        return rec, pending

    def _glob(self):
        if not self.s.codec.needs_global:
            return None
        delta = None if self.prev is None else self.theta - self.prev
        self.prev = self.theta.clone()
        return self.s.codec.global_slots(GlobalView(self.theta.clone(), delta))

    def aggregate_fused(self, r: int, sampled: np.ndarray, rec: Received, glob) -> dict:
        """server.aggregate = "fused": one weighted sum per tensor through the codec."""
        ta = MPI.Wtime()
        ws = client_weights([int(self.s.n_samples[c]) for c in sampled], self.job.server.weighting)
        weights = dict(zip(sampled.tolist(), ws))
        msgs = {c: rec.messages[c] for c in sampled.tolist()}
        upd, payload, header = self.s.codec.decode_sum(msgs, weights, round=r, states=self.dec_states, glob=glob)
        tb = MPI.Wtime()
        agg = torch.cat([upd[name].reshape(-1) for name, _, _ in self.offsets])
        if not bool(torch.isfinite(agg).all()):
            raise NumericalFault(f"the fused aggregate of round {r} holds NaN/Inf; fused aggregation cannot "
                                 "tell which client sent it (server.aggregate = 'per_client' can)")
        self.opt.step(self.theta, agg)
        decode_s = np.full(self.C, np.nan)
        return {"decode_s": decode_s, "decode_total": tb - ta, "aggregate_s": MPI.Wtime() - tb,
                "payload_bytes": payload, "header_bytes": header, "dropped": np.zeros(self.C, dtype=np.uint8)}

    def aggregate(self, r: int, sampled: np.ndarray, rec: Received, glob) -> dict:
        """Decode every message (client-id order, so sums do not depend on the world size), take the
        weighted mean and one server step. Non-finite values are screened on the aggregate, once per
        round (a per-tensor screen of every update cost ~3% of a quickstart round); only when the
        aggregate is not finite are the clients searched, and then dropped or reported."""
        if self.job.server.aggregate == "fused":
            return self.aggregate_fused(r, sampled, rec, glob)
        decode_s = np.full(self.C, np.nan)
        dropped = np.zeros(self.C, dtype=np.uint8)
        payload, header = 0, 0
        decoded: list[tuple[int, dict]] = []
        for c in sampled.tolist():
            ta = MPI.Wtime()
            res = self.s.codec.decode(rec.messages[c], client=c, round=r, state=self.dec_states[c], glob=glob)
            decode_s[c] = MPI.Wtime() - ta
            payload += res.payload_bytes
            header += res.header_bytes
            decoded.append((c, res.update))
        ta = MPI.Wtime()
        agg = self._weighted_sum(decoded)
        if not bool(torch.isfinite(agg).all()):
            bad = {c: [n for n, u in upd.items() if not bool(torch.isfinite(u).all())] for c, upd in decoded}
            bad = {c: names for c, names in bad.items() if names}
            if not bad:
                raise NumericalFault(f"the aggregate of round {r} overflowed to Inf although every client's update "
                                     "is finite; lower train.lr or server.lr")
            if self.job.run.nonfinite == "stop":
                c, names = next(iter(bad.items()))
                raise NumericalFault(f"client {c} sent NaN/Inf in round {r} (tensors {', '.join(names[:3])}); "
                                     "stopping (run.nonfinite = 'drop' skips such clients instead)")
            dropped[list(bad)] = 1
            decoded = [(c, upd) for c, upd in decoded if c not in bad]
            shown = ", ".join(map(str, list(bad)[:10])) + (" ..." if len(bad) > 10 else "")
            print(f"hpcfl run: round {r}: dropped client{'s' if len(bad) > 1 else ''} {shown} (NaN/Inf in the update; "
                  "run.nonfinite = 'drop')", file=sys.stderr, flush=True)
            agg = self._weighted_sum(decoded)
        if decoded:
            self.opt.step(self.theta, agg)
        return {"decode_s": decode_s, "decode_total": float(np.nansum(decode_s)), "aggregate_s": MPI.Wtime() - ta,
                "payload_bytes": payload, "header_bytes": header, "dropped": dropped}

    def _weighted_sum(self, decoded: list[tuple[int, dict]]) -> torch.Tensor:
        agg = torch.zeros_like(self.theta)
        if decoded:
            weights = client_weights([int(self.s.n_samples[c]) for c, _ in decoded], self.job.server.weighting)
            for (c, upd), w in zip(decoded, weights):
                for name, off, n in self.offsets:
                    agg[off:off + n].add_(upd[name].reshape(-1), alpha=w)
        return agg

    def evaluate(self, r: int) -> tuple[float, float, float]:
        R = self.job.run.rounds
        if not ((r + 1) % self.job.run.eval_every == 0 or r == R - 1):
            return math.nan, math.nan, 0.0
        te = MPI.Wtime()
        load_flat_(self.s.model, self.theta)
        loss, acc = evaluate(self.s.model, self.x_test, self.y_test)
        return loss, acc, MPI.Wtime() - te

    def tables(self, r: int, sampled: np.ndarray, rec: Received, agg: dict, gather_times: np.ndarray):
        C, crecs = self.C, rec.records
        cl = {k: np.full(C, np.nan) for k in ("train_s", "encode_s", "train_loss", "recon_max_abs", "recon_rel_l2")}
        ints = {k: np.zeros(C, dtype=np.int64) for k in ("raw_bytes", "payload_bytes", "header_bytes",
                                                        "message_bytes", "downlink_bytes", "state_bytes")}
        part = np.zeros(C, dtype=np.uint8)
        ids = crecs["client"]
        part[ids] = 1
        for k in cl:
            cl[k][ids] = crecs[k]
        for k in ("raw_bytes", "payload_bytes", "header_bytes", "state_bytes"):
            ints[k][ids] = crecs[k]
        ints["message_bytes"] = ints["payload_bytes"] + ints["header_bytes"]
        for c in sampled.tolist():
            ints["downlink_bytes"][c] = self.s.codec.downlink_bytes(r, int(self.last_round[c]))
        self.last_round[sampled] = r
        clients = {**cl, **ints, "participated": part, "decode_s": agg["decode_s"], "dropped": agg["dropped"]}
        if self.links is not None:
            up = np.full(C, np.nan)
            down = np.full(C, np.nan)
            up[ids] = self.links.uplink_s(ids, ints["message_bytes"][ids])
            down[ids] = self.links.downlink_s(ids, ints["downlink_bytes"][ids])
            clients.update(link_up_s=up, link_down_s=down, modelled_s=down + cl["train_s"] + cl["encode_s"] + up)
        infos = rec.infos
        ranks = {"bcast_s": infos[:, 0], "compute_s": infos[:, 1], "n_clients": infos[:, 2].astype(np.int64),
                 "idle_s": infos[:, 3], "pace_s": infos[:, 4], "rss_bytes": infos[:, 5].astype(np.int64),
                 "gather_s": gather_times[:, 0]}
        return clients, ranks

    # ------------------------------------------------------------------- loop
    def run(self) -> None:
        job, tr = self.job, self.tr
        R, t = job.run.rounds, job.train
        t_start = MPI.Wtime() - (self.log.last_value("wall_time") if self.start else 0.0)
        for r in range(self.start, R):
            t0 = MPI.Wtime()
            _, bcast_s = tr.bcast_model(self.flat, r)
            maybe_fail(tr.rank, r)
            sampled = sample_clients(self.C, r, job.run.seed, t.clients_per_round, t.client_fraction)
            glob = self._glob()
            rec, pending = self.receive(r, sampled, bcast_s)
            if _save_round(job.log.save_messages, r, R):
                _save_messages(self.log.path, r, rec.messages)
            agg = self.aggregate(r, sampled, rec, glob)
            loss, acc, eval_s = self.evaluate(r)
            t_end = MPI.Wtime()
            round_s = t_end - t0
            tr.wait(pending[0])  # workers posted their gather times right after the gather
            clients, ranks = self.tables(r, sampled, rec, agg, pending[1])
            uplink = int(clients["message_bytes"].sum())
            raw = int(clients["raw_bytes"].sum())
            if agg["payload_bytes"] + agg["header_bytes"] != uplink:
                raise RuntimeError(f"round {r}: bytes decoded at the root ({agg['payload_bytes']} + "
                                   f"{agg['header_bytes']}) differ from the bytes the clients reported ({uplink})")
            nsamp = self.s.n_samples[sampled].astype(float)
            order = {int(c): i for i, c in enumerate(rec.records["client"])}
            losses = rec.records["train_loss"][[order[int(c)] for c in sampled]]
            decode_total = agg["decode_total"]
            critical = (bcast_s + float(rec.infos[1:, 1].max(initial=0.0)) + rec.gather_s + rec.records_s
                        + decode_total + agg["aggregate_s"] + eval_s)
            server = {
                "round": r, "wall_time": t_end - t_start, "accuracy": acc, "loss": loss,
                "train_loss": float(np.sum(losses * nsamp) / nsamp.sum()), "n_participants": len(sampled),
                "bcast_s": bcast_s, "wait_s": rec.wait_s, "gather_s": rec.gather_s, "records_s": rec.records_s,
                "decode_s": decode_total, "aggregate_s": agg["aggregate_s"], "eval_s": eval_s,
                "round_s": round_s, "critical_s": critical, "overhead_s": round_s - critical,
                "uplink_bytes": uplink, "payload_bytes": agg["payload_bytes"], "header_bytes": agg["header_bytes"],
                "raw_bytes": raw, "downlink_bytes": int(clients["downlink_bytes"].sum()),
                "compression_ratio": raw / uplink if uplink else math.nan,
                "root_state_bytes": sum(st.nbytes("shared") for st in self.dec_states.values()),
                "n_dropped": int(agg["dropped"].sum()),
            }
            if self.links is not None:
                m = clients["modelled_s"]
                server.update(modelled_round_s=float(np.nanmax(m)) + decode_total + agg["aggregate_s"],
                              modelled_uplink_s=float(np.nanmax(clients["link_up_s"])),
                              modelled_downlink_s=float(np.nanmax(clients["link_down_s"])))
            tl = MPI.Wtime()
            self.log.append_round(server, clients, ranks, stats=rec.stats,
                                  updates=(rec.update_ids, rec.update_vectors) if self.dims is not None else None)
            self.log.set_round_value("log_s", MPI.Wtime() - tl)
            ck = self._checkpoint(r + 1)
            if ck:
                self.log.set_round_value("ckpt_s", ck)
            self.progress.round(r, acc, uplink, server["compression_ratio"], round_s)


def _save_round(mode: str, r: int, R: int) -> bool:
    return mode == "all" or (mode == "first" and r == 0) or (mode == "last" and r == R - 1)


def _save_messages(out, r: int, msg_of: dict[int, np.ndarray]) -> None:
    """Raw messages as received, one file each: <out>.messages/round00003-client00012.hpfl."""
    d = out.with_name(out.name + ".messages")
    d.mkdir(exist_ok=True)
    for c, m in msg_of.items():
        (d / f"round{r:05d}-client{c:05d}.hpfl").write_bytes(m.tobytes())


def run_root(s: Setup, tr: Transport, log: RunLog, progress: Progress, resume_k: int | None = None) -> None:
    Root(s, tr, log, progress, resume_k).run()
