"""Explicit codec state, per client and tensor, serialisable and comparable.

A :class:`CodecState` belongs to one client: on the worker rank hosting the
client it holds the encoder side, on the root the decoder side (only the
``shared`` half is used there). Keys are tensor (slot) names, never indices,
so state survives layout changes (the torch PowerSGD-hook lesson).

Layout: ``state[name] = TensorState(enc={path: {key: value}}, shared={...},
last_round=r)``. Values are torch tensors, numpy arrays or Python scalars.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["TensorState", "CodecState"]

_SEP = "\x1f"  # unit separator: cannot appear in parameter names


@dataclass
class TensorState:
    enc: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_round: int = -1  # round this tensor's state was last updated (staleness analysis)


def _to_np(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy().copy()
    return np.array(v, copy=True)


class CodecState:
    """All codec state of one client (or the root's mirror of it)."""

    def __init__(self) -> None:
        self.tensors: dict[str, TensorState] = {}

    def for_tensor(self, name: str) -> TensorState:
        ts = self.tensors.get(name)
        if ts is None:
            ts = self.tensors[name] = TensorState()
        return ts

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    # -- size --------------------------------------------------------------
    def nbytes(self, side: str | None = None) -> int:
        """Bytes held (``side`` = "enc", "shared" or None for both)."""
        total = 0
        for ts in self.tensors.values():
            for s in (("enc", "shared") if side is None else (side,)):
                for d in getattr(ts, s).values():
                    for v in d.values():
                        total += v.nbytes if hasattr(v, "nbytes") else (
                            v.element_size() * v.numel() if isinstance(v, torch.Tensor) else 8)
        return int(total)

    # -- serialisation -----------------------------------------------------
    def to_arrays(self, side: str | None = None) -> dict[str, np.ndarray]:
        """Flat ``{key: ndarray}`` (keys joined by an unused separator) for HDF5/npz."""
        out: dict[str, np.ndarray] = {}
        for name, ts in self.tensors.items():
            out[_SEP.join((name, "#", "last_round"))] = np.array(ts.last_round)
            for s in (("enc", "shared") if side is None else (side,)):
                for path, d in getattr(ts, s).items():
                    for k, v in d.items():
                        out[_SEP.join((name, s, path, k))] = _to_np(v)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "CodecState":
        st = cls()
        for key, a in arrays.items():
            parts = key.split(_SEP)
            if len(parts) == 3 and parts[1] == "#":
                st.for_tensor(parts[0]).last_round = int(a)
                continue
            name, side, path, k = parts
            # Python scalars went in as 0-d int64/float64/bool (or str) arrays and come back as
            # scalars; everything else (incl. 0-d float32 tensors) as a tensor of its own dtype,
            # so a round trip keeps the digest.
            if a.ndim == 0 and (a.dtype.kind not in "fiub" or a.dtype in (np.int64, np.float64, np.bool_)):
                v: Any = a.item()
            else:
                v = torch.from_numpy(np.array(a, copy=True))
            getattr(st.for_tensor(name), side).setdefault(path, {})[k] = v
        return st

    def digest(self, side: str = "shared") -> str:
        """Hash of one side's state: equal digests mean lockstep."""
        h = hashlib.sha256()
        arrays = self.to_arrays(side)
        for key in sorted(arrays):
            if key.split(_SEP)[1] == "#":  # round bookkeeping, not state
                continue
            a = np.ascontiguousarray(arrays[key])
            h.update(key.encode())
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]
