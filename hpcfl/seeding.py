"""The one place seeds are derived. Never touch torch's or numpy's global RNGs.

``derive_seed(base, *keys)`` hashes the base seed together with any mix of
ints and strings, so every (job seed, round, client, tensor, stage) tuple gets
an independent 63-bit seed that both sides of the wire can recompute.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

_MASK63 = (1 << 63) - 1


def derive_seed(base: int, *keys: int | str) -> int:
    """Return a deterministic 63-bit seed for ``(base, *keys)``.

    >>> derive_seed(0, "sample", 3) == derive_seed(0, "sample", 3)
    True
    >>> derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    True
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", int(base)))
    for k in keys:
        if isinstance(k, (bool, np.bool_)):
            raise TypeError("derive_seed keys must be int or str, not bool")
        if isinstance(k, (int, np.integer)):
            h.update(b"i" + struct.pack("<q", int(k)))
        elif isinstance(k, str):
            b = k.encode()
            h.update(b"s" + struct.pack("<I", len(b)) + b)
        else:
            raise TypeError(f"derive_seed keys must be int or str, got {type(k).__name__}")
    return int.from_bytes(h.digest(), "little") & _MASK63


def numpy_rng(base: int, *keys: int | str) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed`."""
    return np.random.Generator(np.random.PCG64(derive_seed(base, *keys)))


def torch_generator(base: int, *keys: int | str):
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed`."""
    import torch

    g = torch.Generator()
    g.manual_seed(derive_seed(base, *keys))
    return g
