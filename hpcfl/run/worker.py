"""The round loop of a worker rank: train and encode each hosted client that was sampled."""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcfl.codecs import CodecState
from hpcfl.codecs.update import GlobalView
from hpcfl.comm.transport import Transport
from hpcfl.fl.capture import make_captures
from hpcfl.fl.client import LocalTrainer
from hpcfl.fl.link import links_for_job
from hpcfl.fl.sampling import clients_of_rank, sample_clients
from hpcfl.results.writer import STAT_DTYPE
from hpcfl.run import checkpoint
from hpcfl.run.chunk import CLIENT_RECORD, pack_chunk
from hpcfl.run.faults import maybe_fail, poison
from hpcfl.run.memory import rss_bytes
from hpcfl.run.setup import Setup

__all__ = ["run_worker", "recon_error"]


def recon_error(update: dict[str, torch.Tensor], recon: dict[str, torch.Tensor]) -> tuple[float, float]:
    """max |u - û| and ||u - û|| / ||u|| over the whole update."""
    mx, num, den = 0.0, 0.0, 0.0
    for k, u in update.items():
        d = (u - recon[k]).float()
        mx = max(mx, float(d.abs().max())) if d.numel() else mx
        num += float((d * d).sum())
        den += float((u.float() * u.float()).sum())
    return mx, (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0


class Worker:
    """Hosts a fixed set of clients (round-robin) and their codec state across rounds."""

    def __init__(self, s: Setup, tr: Transport, out=None, resume_k: int | None = None):
        self.s, self.tr, self.job = s, tr, s.job
        C = self.job.data.n_clients
        self.hosted = set(clients_of_rank(tr.rank, C, tr.n_workers).tolist())
        self.states = {c: CodecState() for c in self.hosted}
        caps = make_captures(s.codec.side_inputs, s.model) if s.codec.side_inputs else []
        self.trainer = LocalTrainer(s.model, self.job.train.to_dict(), torch.from_numpy(s.data.x_train),
                                    torch.from_numpy(s.data.y_train), self.job.run.seed, captures=caps)
        self.flat = np.empty(s.n_params, dtype=np.float32)
        self.flat_t = torch.from_numpy(self.flat)
        self._chunk_buf = np.empty(0, dtype=np.uint8)  # reused for every round's chunk (sent before the next)
        self.prev: torch.Tensor | None = None  # last round's global model (needs_global codecs)
        self.dims = s.update_dims()
        self.names = [n for n, _ in s.params]
        self.pace = self.job.link.mode == "pace"
        self.links = links_for_job(self.job.link.to_dict(), C, self.job.run.seed) if self.pace else None
        self.last_round = {c: -1 for c in self.hosted}  # for the codec's download protocol
        self.out = out
        self.start = 0
        if resume_k is not None:
            self._restore(resume_k)

    def _restore(self, k: int) -> None:
        self.states.update(checkpoint.read_clients(self.out, k, self.hosted))
        ck = checkpoint.read_root(self.out, k)
        self.prev = None if ck["prev"] is None else torch.from_numpy(ck["prev"])
        for c in self.hosted:
            self.last_round[c] = int(ck["last_round"][c])
        self.start = k

    def _checkpoint(self, k: int) -> None:
        every, R = self.job.run.checkpoint_every, self.job.run.rounds
        if self.out is not None and every and (k % every == 0 or k == R):
            checkpoint.write_rank(self.out, self.tr.rank, k, self.states)

    def _glob(self):
        if not self.s.codec.needs_global:
            return None
        delta = None if self.prev is None else self.flat_t - self.prev
        self.prev = self.flat_t.clone()
        return self.s.codec.global_slots(GlobalView(self.flat_t, delta))

    def round(self, r: int, idle_s: float, bcast_s: float):
        job, s = self.job, self.s
        t = job.train
        sampled = sample_clients(job.data.n_clients, r, job.run.seed, t.clients_per_round, t.client_fraction)
        mine = [int(c) for c in sampled if int(c) in self.hosted]
        save = set(s.saved_clients(sampled).tolist()) & set(mine) if self.dims is not None else set()
        glob = self._glob()
        msgs, stats, saved_ids, saved = [], [], [], []
        recs = np.zeros(len(mine), dtype=CLIENT_RECORD)
        compute = 0.0
        for i, c in enumerate(mine):
            t0 = MPI.Wtime()
            res = self.trainer.train(self.flat_t, s.client_idx[c], c, r)
            poison(self.tr.rank, r, res.update)
            t1 = MPI.Wtime()
            enc = s.codec.encode(res.update, client=c, round=r, state=self.states[c],
                                 want_recon=job.log.codec_error, side=res.side, glob=glob)
            t2 = MPI.Wtime()
            mx, rel = recon_error(res.update, enc.recon) if job.log.codec_error else (np.nan, np.nan)
            msgs.append(enc.data)
            recs[i] = (c, t1 - t0, t2 - t1, res.loss, enc.raw_bytes, enc.payload_bytes, enc.header_bytes, mx, rel,
                       self.states[c].nbytes())
            stats.extend((0, c, slot, name.encode()[:24], value) for slot, name, value in enc.stats)
            if c in save:
                flat = torch.cat([res.update[n].reshape(-1).float() for n in self.names])
                saved_ids.append(c)
                saved.append(flat[torch.from_numpy(self.dims)].numpy())
            compute += t2 - t0
        vectors = np.stack(saved) if saved else np.zeros((0, 0 if self.dims is None else len(self.dims)), np.float32)
        chunk = pack_chunk(recs, np.array(stats, dtype=STAT_DTYPE), np.array(saved_ids, np.int64), vectors, msgs,
                           into=self._chunk_buf)
        if chunk.base is not self._chunk_buf:  # it did not fit: keep a larger buffer for the next rounds
            self._chunk_buf = np.empty(int(chunk.size * 1.25) + 4096, dtype=np.uint8)
        pace_s = self._pace(r, mine, recs) if self.pace and mine else 0.0
        for c in mine:
            self.last_round[c] = r
        # the rank's own figures ride with the sizes of the gather
        info = np.array([bcast_s, compute, len(mine), idle_s, pace_s, rss_bytes()], dtype=np.float64)
        _, _, wait_s, transfer_s = self.tr.gather_bytes(chunk, info)
        pending = self.tr.igather_floats(np.array([wait_s + transfer_s]))[0]
        self._checkpoint(r + 1)
        return pending

    def _pace(self, r: int, mine: list[int], recs: np.ndarray) -> float:
        """Sleep for the slowest hosted client's emulated downlink + uplink, so measured time
        includes the links. Clients share this rank's CPU one after another, so only the
        link time is paced, not a parallel timeline (docs/links.md)."""
        ids = np.array(mine)
        down = self.links.downlink_s(ids, [self.s.codec.downlink_bytes(r, self.last_round[c]) for c in mine])
        up = self.links.uplink_s(ids, recs["payload_bytes"] + recs["header_bytes"])
        pace = float((down + up).max())
        time.sleep(pace)
        return pace

    def run(self) -> None:
        pending = None  # the previous round's gather-time report
        for r in range(self.start, self.job.run.rounds):
            idle_s, bcast_s = self.tr.bcast_model(self.flat, r)
            if pending is not None:
                self.tr.wait(pending)
            maybe_fail(self.tr.rank, r)
            pending = self.round(r, idle_s, bcast_s)
        if pending is not None:
            self.tr.wait(pending)


def run_worker(s: Setup, tr: Transport, out=None, resume_k: int | None = None) -> None:
    Worker(s, tr, out, resume_k).run()
