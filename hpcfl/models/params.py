"""Flat views of a model's trainable parameters.

The FL loop communicates parameters only, as named tensors in a fixed order
(the routing table is built from :func:`param_table`) or as one flat float32
vector; both sides must agree on that order, so it is defined here once:
``named_parameters()`` order, trainable parameters only.
"""

from __future__ import annotations

import torch

__all__ = ["param_table", "flat_params", "load_flat_", "model_numel"]


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_table(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every trainable parameter, in ``named_parameters`` order."""
    return [(n, tuple(p.shape)) for n, p in _trainable(model)]


def model_numel(model: torch.nn.Module) -> int:
    """Number of trainable scalars, i.e. the length of :func:`flat_params`."""
    return sum(p.numel() for _, p in _trainable(model))


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """A detached float32 1-D copy of the trainable parameters, in :func:`param_table` order."""
    parts = [p.detach().reshape(-1).to(torch.float32) for _, p in _trainable(model)]
    if not parts:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(parts)  # cat always allocates, so this is a copy


def load_flat_(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Write ``flat`` (as produced by :func:`flat_params`) back into the parameters in place."""
    if flat.dim() != 1:
        raise ValueError(f"flat parameter vector must be 1-D, got shape {tuple(flat.shape)}")
    params = _trainable(model)
    total = sum(p.numel() for _, p in params)
    if flat.numel() != total:
        raise ValueError(f"flat parameter vector has {flat.numel()} elements, model has {total}")
    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view(p.shape))
            offset += n
