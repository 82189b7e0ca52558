"""Which clients train in a round, and which rank hosts each client.

Both are pure functions of the job, so every rank computes them itself and no
control message is needed.
"""

from __future__ import annotations

import numpy as np

from hpcfl.seeding import numpy_rng

__all__ = ["n_sampled", "sample_clients", "host_rank", "clients_of_rank"]


def n_sampled(n_clients: int, count: int = 0, fraction: float = 1.0) -> int:
    """Clients per round: ``count`` if > 0, else ``fraction`` of them rounded half up (at least 1)."""
    if count > 0:
        return min(count, n_clients)
    # round(.., 9) drops binary noise first: 0.29 * 50 is 14.499999999999998, and means 14.5
    return max(1, min(n_clients, int(np.floor(round(fraction * n_clients, 9) + 0.5))))


def sample_clients(n_clients: int, round: int, seed: int, count: int = 0, fraction: float = 1.0) -> np.ndarray:
    """Sorted ids of the clients sampled in ``round``; deterministic from (seed, round).

    >>> sample_clients(10, 0, 0, count=3).tolist() == sample_clients(10, 0, 0, count=3).tolist()
    True
    """
    m = n_sampled(n_clients, count, fraction)
    if m == n_clients:
        return np.arange(n_clients, dtype=np.int64)
    rng = numpy_rng(seed, "sample-clients", round)
    return np.sort(rng.choice(n_clients, size=m, replace=False)).astype(np.int64)


def host_rank(client: int, n_workers: int) -> int:
    """World rank hosting ``client``: round-robin over ranks 1..n_workers.

    Static, because a client's codec state (error-feedback residuals, look-back
    gradients) lives on its host rank across rounds.
    """
    return 1 + client % n_workers


def clients_of_rank(rank: int, n_clients: int, n_workers: int) -> np.ndarray:
    if rank < 1:
        return np.zeros(0, dtype=np.int64)
    return np.arange(rank - 1, n_clients, n_workers, dtype=np.int64)
