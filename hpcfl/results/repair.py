"""Mark a run file whose writer died (MPI_Abort, SIGKILL) as failed.

A process killed while it holds an HDF5 file open for (SWMR) writing leaves the
superblock's *file consistency flags* set, and HDF5 then refuses to open the
file for writing again until ``h5clear -s`` resets them; readers are not
affected. The h5py wheels do not ship h5clear, so :func:`clear_status_flags`
does what ``h5clear -s`` does for superblock versions 2 and 3: zero the flags
byte and rewrite the superblock's Jenkins lookup3 checksum. It verifies the
old checksum first and changes nothing it does not understand.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["clear_status_flags", "mark_failed", "lookup3"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_M = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` (HDF5's H5_checksum_lookup3)."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M
    i = 0
    while n - i > 12:
        k0, k1, k2 = struct.unpack_from("<III", data, i)
        a = (a + k0) & _M
        b = (b + k1) & _M
        c = (c + k2) & _M
        a = (a - c) & _M; a ^= _rot(c, 4); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rot(a, 6); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rot(b, 8); b = (b + a) & _M  # noqa: E702
        a = (a - c) & _M; a ^= _rot(c, 16); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rot(a, 19); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rot(b, 4); b = (b + a) & _M  # noqa: E702
        i += 12
    rest = data[i:] + b"\x00" * (12 - (n - i))
    if n - i == 0:
        return c
    k0, k1, k2 = struct.unpack("<III", rest)
    a = (a + k0) & _M
    b = (b + k1) & _M
    c = (c + k2) & _M
    c ^= b; c = (c - _rot(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _M  # noqa: E702
    return c


def clear_status_flags(path: str | os.PathLike) -> bool:
    """Reset the consistency flags of a v2/v3 superblock at offset 0. True if changed."""
    p = Path(path)
    with open(p, "r+b") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:8] != _SIGNATURE or head[8] not in (2, 3):
            return False
        size_of_offsets = head[9]
        n = 12 + 4 * size_of_offsets
        fh.seek(0)
        block = bytearray(fh.read(n + 4))
        if len(block) != n + 4:
            return False
        (stored,) = struct.unpack_from("<I", block, n)
        if lookup3(bytes(block[:n])) != stored:
            return False  # not the layout we expect: touch nothing
        if block[11] == 0:
            return False
        block[11] = 0
        struct.pack_into("<I", block, n, lookup3(bytes(block[:n])))
        fh.seek(0)
        fh.write(block)
    return True


def mark_failed(path: str | os.PathLike, reason: str) -> bool:
    """Set ``status = "failed: <reason>"`` on a run file still marked running. True if done."""
    import h5py

    p = Path(path)
    if not p.exists():
        return False
    clear_status_flags(p)
    try:
        with h5py.File(p, "r+") as f:
            if str(f.attrs.get("status", "")) == "running":
                f.attrs["status"] = f"failed: {reason}"
                return True
    except OSError:
        return False
    return False
