"""Per-tensor routing: which tensors take the lossy codec and which go dense.

One policy, shared by every method and set per job (``[routing]``): a tensor
goes *dense* (the ``routing.dense`` codec: identity, or lossless zstd) if its
name matches ``dense_patterns``, if ``lossy_patterns`` is set and it matches
none, if it has fewer than ``min_ndim`` dimensions, or fewer than
``min_numel`` elements. Everything else is *lossy*.

The plan is a *tensor table* of slots that both sides derive identically from
the model's parameter list; a message refers to slots by index. With
``scope = "model"`` all lossy tensors are flattened, in parameter order, into
one slot named ``@model`` (global top-k, whole-model LBGM, intrinsic
compression); dense tensors keep their own slots.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Slot", "Member", "RoutingPolicy", "MODEL_SLOT"]

MODEL_SLOT = "@model"


@dataclass(frozen=True)
class Member:
    """A parameter inside a slot: its name, shape and offset in the slot's flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Slot:
    index: int
    name: str
    shape: tuple[int, ...]
    route: str  # "lossy" or "dense"
    members: tuple[Member, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class RoutingPolicy:
    scope: str = "tensor"
    min_numel: int = 0
    min_ndim: int = 0
    dense_patterns: tuple[str, ...] = ()
    lossy_patterns: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping) -> "RoutingPolicy":
        return cls(scope=cfg.get("scope", "tensor"), min_numel=int(cfg.get("min_numel", 0)),
                   min_ndim=int(cfg.get("min_ndim", 0)),
                   dense_patterns=tuple(cfg.get("dense_patterns", ())),
                   lossy_patterns=tuple(cfg.get("lossy_patterns", ())))

    def to_config(self) -> dict:
        return {"scope": self.scope, "min_numel": self.min_numel, "min_ndim": self.min_ndim,
                "dense_patterns": list(self.dense_patterns), "lossy_patterns": list(self.lossy_patterns)}

    def route(self, name: str, shape: Sequence[int]) -> str:
        if any(fnmatch.fnmatchcase(name, p) for p in self.dense_patterns):
            return "dense"
        if self.lossy_patterns and not any(fnmatch.fnmatchcase(name, p) for p in self.lossy_patterns):
            return "dense"
        if len(shape) < self.min_ndim or _numel(shape) < self.min_numel:
            return "dense"
        return "lossy"

    def plan(self, params: Sequence[tuple[str, Sequence[int]]]) -> list[Slot]:
        """The tensor table for a model's ``(name, shape)`` list (in model order)."""
        names = [n for n, _ in params]
        if len(set(names)) != len(names):
            raise ValueError("duplicate parameter names")
        routes = [(n, tuple(int(s) for s in sh), self.route(n, sh)) for n, sh in params]
        slots: list[Slot] = []
        if self.scope == "model":
            members, off = [], 0
            for n, sh, r in routes:
                if r == "lossy":
                    members.append(Member(n, sh, off, _numel(sh)))
                    off += _numel(sh)
            if members:
                slots.append(Slot(0, MODEL_SLOT, (off,), "lossy", tuple(members)))
            for n, sh, r in routes:
                if r == "dense":
                    slots.append(Slot(len(slots), n, sh, "dense", (Member(n, sh, 0, _numel(sh)),)))
        else:
            for n, sh, r in routes:
                slots.append(Slot(len(slots), n, sh, r, (Member(n, sh, 0, _numel(sh)),)))
        return slots
