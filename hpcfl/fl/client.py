"""Local training of one virtual client.

The update a client sends is a *pseudo-gradient* in both algorithms, so the
server applies the same optimizer step either way:

* fedavg: ``global - local`` after tau local SGD steps (the model delta);
* fedsgd: the gradient at the global model, over one minibatch or the whole
  local data set (``full_batch``).

SGD is written out by hand (``p.add_``) instead of ``torch.optim``: the first
optimizer construction imports torch._dynamo (~1.2 s per rank, platform.md §4).
Minibatches come from a generator seeded by (job seed, round, client), so a
client's update does not depend on which rank hosts it or on the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hpcfl.models import load_flat_
from hpcfl.seeding import torch_generator

__all__ = ["LocalResult", "LocalTrainer"]


@dataclass
class LocalResult:
    update: dict[str, torch.Tensor]
    n_samples: int
    loss: float
    steps: int
    side: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # from captures


class LocalTrainer:
    """Trains clients one after another on one worker rank, reusing one model object."""

    def __init__(self, model: torch.nn.Module, train: dict, x: torch.Tensor, y: torch.Tensor, seed: int,
                 captures: list | None = None):
        self.model = model
        self.captures = captures or []  # hpcfl.fl.capture.Capture objects (codec side inputs)
        self.cfg = dict(train)
        self.x = x
        self.y = y
        self.seed = seed
        self.params = [p for _, p in model.named_parameters()]
        self.names = [n for n, _ in model.named_parameters()]

    def _steps(self, n: int) -> int:
        c = self.cfg
        if c["local_epochs"] > 0:
            return max(1, math.ceil(c["local_epochs"] * n / c["batch_size"]))
        return c["local_steps"]

    def _batches(self, idx: torch.Tensor, steps: int, gen: torch.Generator):
        """Epoch-wise shuffled minibatches of the client's indices."""
        bs = min(self.cfg["batch_size"], idx.numel())
        perm = idx[torch.randperm(idx.numel(), generator=gen)]
        pos = 0
        for _ in range(steps):
            if pos + bs > perm.numel():
                perm = idx[torch.randperm(idx.numel(), generator=gen)]
                pos = 0
            yield perm[pos:pos + bs]
            pos += bs

    def _loss_backward(self, b: torch.Tensor, scale: float = 1.0) -> float:
        out = self.model(self.x[b])
        loss = F.cross_entropy(out, self.y[b])
        (loss * scale).backward() if scale != 1.0 else loss.backward()
        return float(loss.detach())

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def train(self, global_flat: torch.Tensor, indices: np.ndarray, client: int, round: int) -> LocalResult:
        for cap in self.captures:
            cap.start()
        try:
            res = self._train(global_flat, indices, client, round)
        finally:
            side: dict[str, dict[str, torch.Tensor]] = {}
            for cap in self.captures:
                for name, d in cap.stop().items():
                    side.setdefault(name, {}).update(d)
        res.side = side
        return res

    def _train(self, global_flat: torch.Tensor, indices: np.ndarray, client: int, round: int) -> LocalResult:
        load_flat_(self.model, global_flat)
        self.model.train()
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        gen = torch_generator(self.seed, "local-batches", round, client)
        c = self.cfg
        if c["algorithm"] == "fedsgd":
            return self._fedsgd(idx, gen)
        start = [p.detach().clone() for p in self.params]
        bufs: list[torch.Tensor | None] = [None] * len(self.params)
        steps = self._steps(idx.numel())
        total = 0.0
        for b in self._batches(idx, steps, gen):
            self._zero_grad()
            total += self._loss_backward(b)
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    g = p.grad
                    if c["weight_decay"]:
                        g = g.add(p, alpha=c["weight_decay"])
                    if c["momentum"]:
                        bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul_(c["momentum"]).add_(g)
                        g = bufs[i]
                    p.add_(g, alpha=-c["lr"])
        with torch.no_grad():
            update = {n: s - p.detach() for n, s, p in zip(self.names, start, self.params)}
        return LocalResult(update, int(idx.numel()), total / steps, steps)

    def _fedsgd(self, idx: torch.Tensor, gen: torch.Generator) -> LocalResult:
        self._zero_grad()
        if self.cfg["full_batch"]:
            # exact full-data gradient, in chunks so memory stays bounded
            n = idx.numel()
            total = 0.0
            for s in range(0, n, 1024):
                b = idx[s:s + 1024]
                total += self._loss_backward(b, scale=b.numel() / n) * b.numel()
            loss = total / n
        else:
            b = next(self._batches(idx, 1, gen))
            loss = self._loss_backward(b)
        with torch.no_grad():
            update = {}
            for n_, p in zip(self.names, self.params):
                g = p.grad.detach().clone()
                if self.cfg["weight_decay"]:
                    g.add_(p.detach(), alpha=self.cfg["weight_decay"])
                update[n_] = g
        return LocalResult(update, int(idx.numel()), loss, 1)
