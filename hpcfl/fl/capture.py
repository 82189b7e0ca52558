"""Training-time side information for codecs that ask for it (``Codec.side_inputs``).

Some methods need more than the update: the alternative-space method builds its
bases from each layer's input activations and output gradients. A codec names
what it needs (``side_inputs = ("activations",)``); the worker then asks
:func:`make_captures` for one capture object per name, the local trainer calls
``start()`` before the client's local steps and ``stop()`` after them, and the
result -- ``{parameter name: {key: tensor}}`` -- reaches the codec as
``ctx.side`` (per slot). Codecs never touch the model themselves.

Captures register by name with :func:`register_capture`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable

import torch

from hpcfl.errors import ConfigError

__all__ = ["Capture", "register_capture", "make_captures", "captures"]

_CAPTURES: dict[str, type["Capture"]] = {}


class Capture(ABC):
    """Collects side information while one client trains; bounded memory is its job."""

    name: ClassVar[str] = ""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @abstractmethod
    def start(self) -> None:
        """Called before the client's local steps (e.g. register hooks, reset buffers)."""

    @abstractmethod
    def stop(self) -> dict[str, dict[str, torch.Tensor]]:
        """Called after them: remove hooks, return ``{param name: {key: tensor}}``."""


def register_capture(cls: type[Capture]) -> type[Capture]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _CAPTURES[cls.name] = cls
    return cls


def captures() -> dict[str, type[Capture]]:
    import hpcfl.fl.capture_impl  # noqa: F401  (registers the built-in captures)

    return dict(_CAPTURES)


def make_captures(names: Iterable[str], model: torch.nn.Module) -> list[Capture]:
    known = captures()
    out = []
    for n in names:
        if n not in known:
            raise ConfigError("codec", f"the codec needs side information {n!r}, which no capture provides "
                              f"(known: {', '.join(sorted(known)) or 'none'})")
        out.append(known[n](model))
    return out
