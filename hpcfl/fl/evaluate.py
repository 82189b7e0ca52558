"""Global-model evaluation on the held-out test set (root only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy)."""
    model.eval()
    n = y.numel()
    loss = 0.0
    correct = 0
    for s in range(0, n, batch):
        out = model(x[s:s + batch])
        yb = y[s:s + batch]
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return loss / n, correct / n
