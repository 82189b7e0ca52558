"""What one worker sends the root each round: one chunk of frames (no MPI here).

Frames, in order (each a multiple of 8 bytes, see :mod:`hpcfl.comm.frames`):

0. client records (``CLIENT_RECORD`` rows, one per sampled hosted client, in id order)
1. codec statistics (``STAT_DTYPE`` rows; round filled in by the root)
2. ids of the clients whose raw updates are saved (int64), 3. their vectors (float32, n x dims)
4... one wire message per sampled hosted client, in id order
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcfl.comm.frames import pack_frames, unpack_frames
from hpcfl.results.writer import STAT_DTYPE

__all__ = ["CLIENT_RECORD", "Chunk", "pack_chunk", "unpack_chunk"]

# Per-client metrics a worker sends each round (fixed dtype: no pickling). 80 bytes.
CLIENT_RECORD = np.dtype([("client", "i8"), ("train_s", "f8"), ("encode_s", "f8"), ("train_loss", "f8"),
                          ("raw_bytes", "i8"), ("payload_bytes", "i8"), ("header_bytes", "i8"),
                          ("recon_max_abs", "f8"), ("recon_rel_l2", "f8"), ("state_bytes", "i8")])
_FIXED_FRAMES = 4


def _pad8(a: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    extra = (-b.size) % 8
    return b if not extra else np.concatenate([b, np.zeros(extra, np.uint8)])


@dataclass
class Chunk:
    records: np.ndarray
    stats: np.ndarray
    update_ids: np.ndarray
    update_vectors: np.ndarray
    messages: list[np.ndarray]


def pack_chunk(records: np.ndarray, stats: np.ndarray, update_ids: np.ndarray, update_vectors: np.ndarray,
               messages: list, into: np.ndarray | None = None) -> np.ndarray:
    """One worker's chunk; ``into``: a reusable buffer (see :func:`pack_frames`)."""
    frames = [_pad8(records), _pad8(stats), _pad8(np.asarray(update_ids, np.int64)),
              _pad8(np.asarray(update_vectors, np.float32))]
    return pack_frames(frames + [np.frombuffer(m, np.uint8) if not isinstance(m, np.ndarray) else m
                                 for m in messages], into)


def unpack_chunk(chunk: np.ndarray, expect_clients: list[int], dims: int) -> Chunk:
    """Split and check one worker's chunk; ValueError says what is wrong."""
    frames = unpack_frames(chunk)
    n = len(expect_clients)
    if len(frames) != _FIXED_FRAMES + n:
        raise ValueError(f"{len(frames) - _FIXED_FRAMES} messages for {n} sampled clients")
    rec_b, st_b, id_b, vec_b = frames[:_FIXED_FRAMES]
    if rec_b.size != n * CLIENT_RECORD.itemsize:
        raise ValueError(f"{rec_b.size} bytes of client records for {n} clients")
    records = rec_b.view(CLIENT_RECORD)
    if records["client"].tolist() != list(expect_clients):
        raise ValueError(f"records for clients {records['client'].tolist()}, expected {list(expect_clients)}")
    if st_b.size % STAT_DTYPE.itemsize:
        raise ValueError("codec statistics frame is not a whole number of rows")
    stats = st_b.view(STAT_DTYPE)
    ids = id_b.view(np.int64)
    need = ids.size * dims * 4
    if vec_b.size < need or vec_b.size - need >= 8:
        raise ValueError(f"{vec_b.size} bytes of saved updates for {ids.size} x {dims} floats")
    vectors = vec_b[:need].view(np.float32).reshape(ids.size, dims)
    return Chunk(records, stats, ids, vectors, frames[_FIXED_FRAMES:])
