"""Estimate a job's memory before any rank starts, and refuse one that would not fit.

Codec state dominates at scale: error feedback keeps one residual per client,
LBGM's root keeps one look-back gradient per client and tensor. Rather than a
per-codec formula, the estimate runs the job's codec for two rounds on one
synthetic update (the model's real shapes) and measures the state it leaves:
exact for state that does not grow with rounds, which is every codec here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcfl.errors import ConfigError

__all__ = ["MemoryEstimate", "estimate_memory", "check_memory", "BASELINE_RANK_BYTES"]

# One rank after importing torch, numpy, mpi4py and h5py: ~325 MiB RSS (platform.md §4); its peak during
# setup (data set build, first evaluation) measured 390 MiB in the soak run (docs/reliability.md, Soak).
BASELINE_RANK_BYTES = 400 * 2**20


@dataclass
class MemoryEstimate:
    client_state: int      # codec state one client keeps on its host rank
    root_state: int        # decoder state the root keeps per client
    model: int             # 4 x parameters
    root: int              # whole root rank
    worker: int            # largest worker rank
    ranks: int

    @property
    def total(self) -> int:
        return self.root + (self.ranks - 1) * self.worker

    def describe(self) -> str:
        g = 2**30
        return (f"root {self.root / g:.2f} GiB, each worker up to {self.worker / g:.2f} GiB, total "
                f"{self.total / g:.2f} GiB for {self.ranks} ranks (codec state per client: "
                f"{self.client_state / 2**20:.2f} MiB on its worker, {self.root_state / 2**20:.2f} MiB on the root)")


def estimate_memory(job, codec, n_params: int, dataset_bytes: int = 0) -> MemoryEstimate:
    import torch

    from hpcfl.codecs import CodecState

    g = torch.Generator().manual_seed(0)
    update = {n: torch.randn(*sh, generator=g) * 1e-3 for n, sh in codec.params}
    cs, rs = CodecState(), CodecState()
    for r in range(2):
        res = codec.encode(update, client=0, round=r, state=cs)
        codec.decode(res.data, client=0, round=r, state=rs)
    client_state, root_state = cs.nbytes(), rs.nbytes("shared")
    C, W = job.data.n_clients, max(1, job.run.ranks - 1)
    model = 4 * n_params
    per_worker_clients = math.ceil(C / W)
    sampled = max(1, round(C * job.train.client_fraction)) if not job.train.clients_per_round \
        else job.train.clients_per_round
    # root: model, velocity, previous model, aggregate, one decoded update, the round's messages
    root = BASELINE_RANK_BYTES + dataset_bytes + 5 * model + C * root_state + sampled * len(res.data)
    # worker: model copy, training copy and gradients, one update, its clients' state
    worker = BASELINE_RANK_BYTES + dataset_bytes + 4 * model + per_worker_clients * client_state
    return MemoryEstimate(client_state, root_state, model, root, worker, job.run.ranks)


def check_memory(est: MemoryEstimate, limit_gb: float, available: int) -> None:
    """Refuse when the estimate exceeds run.memory_limit_gb per rank, or (no limit set) the
    memory available on this machine for all ranks of a single-node launch."""
    if limit_gb > 0:
        limit = limit_gb * 2**30
        worst = max(est.root, est.worker)
        if worst > limit:
            raise ConfigError("run.memory_limit_gb", f"the job needs an estimated {est.describe()}; that is "
                              f"more than {limit_gb} GiB per rank")
    elif available and est.total > available:
        raise ConfigError("data.n_clients", f"the job needs an estimated {est.describe()}, but only "
                          f"{available / 2**30:.2f} GiB are available here; use fewer clients or ranks, a codec "
                          "with less state, or set run.memory_limit_gb per rank for a multi-node run")
