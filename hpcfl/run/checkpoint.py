"""Checkpoints for ``hpcfl run --resume``: everything needed to continue a run exactly.

After round r (k = r + 1 rounds done), every ``run.checkpoint_every`` rounds and
after the last, each rank writes its own file into ``<run file>.ckpt/``:

* ``root-k<k>.h5``: the global model, the server optimizer's velocity, the
  previous global model (for codecs that read the last server step), each
  client's last participation, and the root's decoder-side codec state per client;
* ``rank<w>-k<k>.h5``: the codec state of every client worker w hosts.

Files are written to a temporary name and renamed, so a file that exists is
whole. A checkpoint k is usable when the root file and one file per worker rank
of that run exist; the two newest are kept. Client states are keyed by client
id, so a run may resume on a different number of ranks (results do not depend
on the world size). Sampling, minibatches and codec seeds derive from (seed,
round, client), so there is no RNG state to save.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from hpcfl.codecs import CodecState
from hpcfl.errors import UsageError

__all__ = ["ckpt_dir", "clear", "root_job_hash", "write_root", "write_rank", "latest", "read_root", "read_clients"]

_ROOT = re.compile(r"root-k(\d+)\.h5$")
_RANK = re.compile(r"rank(\d+)-k(\d+)\.h5$")
KEEP = 2


def ckpt_dir(run_path: Path) -> Path:
    return run_path.with_name(run_path.name + ".ckpt")


def clear(run_path: Path) -> int:
    """Delete the checkpoints of an earlier run written to the same path (a fresh run with
    ``--overwrite``): left in place they would be pruned in preference to the new run's own,
    newer-numbered files, and ``--resume`` would find them. Returns the number of files removed."""
    d = ckpt_dir(run_path)
    if not d.is_dir():
        return 0
    n = 0
    for p in d.iterdir():
        if _ROOT.match(p.name) or _RANK.match(p.name) or ".h5.tmp" in p.name:
            p.unlink(missing_ok=True)
            n += 1
    if not any(d.iterdir()):
        d.rmdir()
    return n


def _write_state(g: h5py.Group, st: CodecState) -> None:
    arrays = st.to_arrays()
    keys = list(arrays)
    g.attrs["keys_json"] = json.dumps(keys)
    for i, k in enumerate(keys):
        g.create_dataset(str(i), data=arrays[k])


def _read_state(g: h5py.Group) -> CodecState:
    keys = json.loads(g.attrs["keys_json"])
    return CodecState.from_arrays({k: g[str(i)][()] for i, k in enumerate(keys)})


def _atomic(path: Path, fill) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        fill(f)
    os.replace(tmp, path)


def _prune(d: Path, pattern: re.Pattern, group: int, mine) -> None:
    ks = sorted({int(m.group(group)) for p in d.iterdir() if (m := pattern.match(p.name)) and mine(m)})
    for k in ks[:-KEEP]:
        for p in d.iterdir():
            m = pattern.match(p.name)
            if m and mine(m) and int(m.group(group)) == k:
                p.unlink(missing_ok=True)


def write_root(run_path: Path, k: int, *, job_hash: str, world_size: int, theta: np.ndarray,
               velocity: np.ndarray | None, prev: np.ndarray | None, last_round: np.ndarray,
               states: dict[int, CodecState]) -> None:
    d = ckpt_dir(run_path)
    d.mkdir(exist_ok=True)

    def fill(f):
        f.attrs.update(rounds_done=k, job_hash=job_hash, world_size=world_size)
        f["theta"] = theta
        if velocity is not None:
            f["velocity"] = velocity
        if prev is not None:
            f["prev"] = prev
        f["last_round"] = last_round
        g = f.create_group("states")
        for c, st in states.items():
            if len(st):
                _write_state(g.create_group(str(c)), st)

    _atomic(d / f"root-k{k:06d}.h5", fill)
    _prune(d, _ROOT, 1, lambda m: True)


def write_rank(run_path: Path, rank: int, k: int, states: dict[int, CodecState]) -> None:
    d = ckpt_dir(run_path)
    d.mkdir(exist_ok=True)

    def fill(f):
        f.attrs["rounds_done"] = k
        f.attrs["clients_json"] = json.dumps(sorted(states))
        g = f.create_group("states")
        for c, st in states.items():
            if len(st):
                _write_state(g.create_group(str(c)), st)

    _atomic(d / f"rank{rank:04d}-k{k:06d}.h5", fill)
    _prune(d, _RANK, 2, lambda m: int(m.group(1)) == rank)


def latest(run_path: Path) -> int:
    """The newest complete checkpoint (rounds done), or raise UsageError."""
    d = ckpt_dir(run_path)
    if not d.is_dir():
        raise UsageError(f"no checkpoints for {run_path} (expected {d}/); was run.checkpoint_every = 0?")
    for k in sorted({int(m.group(1)) for p in d.iterdir() if (m := _ROOT.match(p.name))}, reverse=True):
        with h5py.File(d / f"root-k{k:06d}.h5", "r") as f:
            workers = int(f.attrs["world_size"]) - 1
        if all((d / f"rank{w:04d}-k{k:06d}.h5").exists() for w in range(1, workers + 1)):
            return k
    raise UsageError(f"no complete checkpoint in {d}: every rank's file of one round is needed")


def root_job_hash(run_path: Path, k: int) -> str:
    """The job hash (without rounds) recorded in checkpoint k, without reading the state."""
    with h5py.File(ckpt_dir(run_path) / f"root-k{k:06d}.h5", "r") as f:
        return str(f.attrs["job_hash"])


def read_root(run_path: Path, k: int) -> dict:
    with h5py.File(ckpt_dir(run_path) / f"root-k{k:06d}.h5", "r") as f:
        out = {"job_hash": str(f.attrs["job_hash"]), "world_size": int(f.attrs["world_size"]),
               "theta": f["theta"][()], "velocity": f["velocity"][()] if "velocity" in f else None,
               "prev": f["prev"][()] if "prev" in f else None, "last_round": f["last_round"][()],
               "states": {int(c): _read_state(f["states"][c]) for c in f["states"]}}
    return out


def read_clients(run_path: Path, k: int, clients: set[int]) -> dict[int, CodecState]:
    """Client-side codec states of ``clients`` from whichever rank file of round k holds them."""
    d = ckpt_dir(run_path)
    out: dict[int, CodecState] = {}
    for p in sorted(d.iterdir()):
        m = _RANK.match(p.name)
        if not m or int(m.group(2)) != k:
            continue
        with h5py.File(p, "r") as f:
            for c in f["states"]:
                if int(c) in clients:
                    out[int(c)] = _read_state(f["states"][c])
    return out
