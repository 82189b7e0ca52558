"""Models on flattened inputs: logistic regression and the MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LogReg", "MLP"]


class LogReg(nn.Module):
    """One Linear layer on the flattened input (LBGM's "FCN")."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden width, then Linear to the classes.

    Layers are named ``fc1 .. fcN`` so routing patterns can address them.
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: list[int], n_classes: int):
        super().__init__()
        widths = [math.prod(input_shape), *hidden, n_classes]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(a, b))
        self.n_layers = len(widths) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.n_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.n_layers:
                x = torch.relu(x)
        return x
