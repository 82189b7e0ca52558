"""Aggregation and the server optimizer (pure tensor maths, no MPI)."""

from __future__ import annotations

import torch

__all__ = ["client_weights", "ServerOptimizer"]


def client_weights(n_samples: list[int], weighting: str) -> list[float]:
    """Normalised weights over the *participating* clients (renormalised each round)."""
    if weighting == "equal" or sum(n_samples) == 0:
        return [1.0 / len(n_samples)] * len(n_samples)
    total = float(sum(n_samples))
    return [n / total for n in n_samples]


class ServerOptimizer:
    """SGD with heavy-ball momentum on the flat parameter vector.

    ``v <- mu * v + g``; ``theta <- theta - lr * v`` (LBGM's server step, methods.md §5.3;
    with lr = 1 and mu = 0 on model deltas this is plain FedAvg).
    """

    def __init__(self, lr: float, momentum: float = 0.0):
        self.lr = lr
        self.momentum = momentum
        self.velocity: torch.Tensor | None = None

    def step(self, theta: torch.Tensor, g: torch.Tensor) -> None:
        """Update ``theta`` in place with the aggregated pseudo-gradient ``g``."""
        if self.momentum:
            if self.velocity is None:
                self.velocity = g.clone()
            else:
                self.velocity.mul_(self.momentum).add_(g)
            g = self.velocity
        theta.add_(g, alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum,
                "velocity": None if self.velocity is None else self.velocity.clone()}
