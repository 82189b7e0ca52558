"""The round loop of a worker rank: train and encode each hosted client that was sampled."""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from hpcfl.codecs import CodecState
from hpcfl.comm.frames import pack_frames
from hpcfl.comm.transport import Transport
from hpcfl.fl.client import LocalTrainer
from hpcfl.fl.sampling import clients_of_rank, sample_clients
from hpcfl.run.faults import maybe_fail
from hpcfl.run.setup import CLIENT_RECORD, Setup

__all__ = ["run_worker"]


def _recon_error(update: dict[str, torch.Tensor], recon: dict[str, torch.Tensor]) -> tuple[float, float]:
    mx, num, den = 0.0, 0.0, 0.0
    for k, u in update.items():
        d = (u - recon[k]).float()
        mx = max(mx, float(d.abs().max())) if d.numel() else mx
        num += float((d * d).sum())
        den += float((u.float() * u.float()).sum())
    return mx, (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0


def run_worker(s: Setup, tr: Transport) -> None:
    job = s.job
    seed, R = job.run.seed, job.run.rounds
    C, W = job.data.n_clients, tr.n_workers
    hosted = set(clients_of_rank(tr.rank, C, W).tolist())
    states = {c: CodecState() for c in hosted}
    x = torch.from_numpy(s.data.x_train)
    y = torch.from_numpy(s.data.y_train)
    trainer = LocalTrainer(s.model, job.train.to_dict(), x, y, seed)
    flat = np.empty(s.n_params, dtype=np.float32)
    flat_t = torch.from_numpy(flat)
    want_recon = job.log.codec_error
    tcfg = job.train
    pending = None  # the previous round's gather-time report
    for r in range(R):
        idle_s, bcast_s = tr.bcast_model(flat, r)
        if pending is not None:
            tr.wait(pending)
        maybe_fail(tr.rank, r)
        sampled = sample_clients(C, r, seed, tcfg.clients_per_round, tcfg.client_fraction)
        mine = [int(c) for c in sampled if int(c) in hosted]
        msgs: list[bytes] = []
        recs = np.zeros(len(mine), dtype=CLIENT_RECORD)
        compute = 0.0
        for i, c in enumerate(mine):
            t0 = MPI.Wtime()
            res = trainer.train(flat_t, s.client_idx[c], c, r)
            t1 = MPI.Wtime()
            enc = s.codec.encode(res.update, client=c, round=r, state=states[c], want_recon=want_recon)
            t2 = MPI.Wtime()
            mx, rel = _recon_error(res.update, enc.recon) if want_recon else (np.nan, np.nan)
            msgs.append(enc.data)
            recs[i] = (c, t1 - t0, t2 - t1, res.loss, enc.raw_bytes, enc.payload_bytes, enc.header_bytes, mx, rel)
            compute += t2 - t0
        # frame 0 carries the client records; the rank's figures ride with the sizes
        info = np.array([bcast_s, compute, len(mine), idle_s], dtype=np.float64)
        _, _, wait_s, transfer_s = tr.gather_bytes(pack_frames([recs.tobytes()] + msgs), info)
        pending, _ = tr.igather_floats(np.array([wait_s + transfer_s]))
    if pending is not None:
        tr.wait(pending)
