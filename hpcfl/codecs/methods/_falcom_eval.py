"""Figures for FalCom runs from run files: modelled link time and compression ratios per slot.

A synchronous round waits for its slowest sampled client, so at client uplink
bandwidth B (bit/s) and latency L the modelled uplink time of round r is
``max over sampled clients of message_bytes * 8 / B + L``; a run's modelled
communication time is the sum over rounds. This is what the "communication time
reduction" claim is about, checked without a slow network (compression and
decompression time are measured separately: ``encode_s``/``decode_s``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["modelled_round_times", "modelled_comm_time", "end_to_end_comm_time", "slot_bytes", "slot_ratios",
           "lossy_slots", "summary"]


def modelled_round_times(message_bytes: np.ndarray, participated: np.ndarray, bandwidth_bps: float,
                         latency_s: float = 0.0) -> np.ndarray:
    """Per round (rows of the R x C arrays): the slowest sampled client's bytes * 8 / B + L (0 if none)."""
    if bandwidth_bps <= 0:
        raise ValueError("bandwidth must be positive")
    t = np.where(np.asarray(participated, bool), np.asarray(message_bytes, np.float64) * 8.0 / bandwidth_bps
                 + latency_s, 0.0)
    return t.max(axis=1) if t.size else np.zeros(t.shape[0])


def modelled_comm_time(run: Any, bandwidth_bps: float, latency_s: float = 0.0) -> float:
    """Sum over rounds of :func:`modelled_round_times` for a loaded run (``hpcfl.results.load_run``)."""
    return float(modelled_round_times(run.clients["message_bytes"], run.clients["participated"], bandwidth_bps,
                                      latency_s).sum())


def end_to_end_comm_time(run: Any, bandwidth_bps: float, latency_s: float = 0.0) -> float:
    """Like :func:`modelled_comm_time` with the codec's measured time added: per round, the slowest
    sampled client's encode + transfer, then the root's decoding of all messages (rounds.decode_s)."""
    c = run.clients
    part = c["participated"].astype(bool)
    t = np.where(part, c["encode_s"] + c["message_bytes"] * 8.0 / bandwidth_bps + latency_s, 0.0)
    return float((t.max(axis=1) + np.nan_to_num(run.rounds["decode_s"])).sum())


def lossy_slots(run: Any, ndim: int | None = 4) -> list[int]:
    """Indices of the lossy-routed slots (of ``ndim`` dimensions; None: any), from the run's tensor table."""
    return [i for i, (name, shape, route) in enumerate(run.codec["slots"])
            if route == "lossy" and (ndim is None or len(shape) == ndim)]


def slot_bytes(run: Any, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per round: (raw bytes, payload bytes) summed over ``slots`` and the clients that reported the
    per-tensor ``ratio`` statistic (4n / the tensor's parts)."""
    numel = np.array([int(np.prod(s)) for _, s, _ in run.codec["slots"]], dtype=np.float64)
    sel = list(slots)
    r = run.codec_stat("ratio")[:, :, sel]  # (R, C, S), NaN where not reported
    raw = np.broadcast_to(4.0 * numel[sel], r.shape)
    ok = np.isfinite(r) & (r > 0)
    return np.where(ok, raw, 0.0).sum(axis=(1, 2)), np.where(ok, raw / np.where(ok, r, 1.0), 0.0).sum(axis=(1, 2))


def slot_ratios(run: Any, slots: Sequence[int]) -> np.ndarray:
    """Per round: raw / payload bytes over ``slots`` (see :func:`slot_bytes`), NaN where none reported."""
    raw, payload = slot_bytes(run, slots)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(payload > 0, raw / payload, np.nan)


def summary(run: Any, bandwidths: Sequence[float] = (10e6, 100e6), latency_s: float = 0.0,
            from_round: int = 2) -> dict[str, float]:
    """The figures docs/methods/falcom.md tabulates for one run.

    ``conv_ratio``: raw / payload bytes over the 4-D lossy slots and rounds >= ``from_round``
    (NaN for codecs that log no per-tensor ratio); ``ratio``: raw / message bytes over the
    whole run (every tensor, headers included); ``comm_s@B``: modelled uplink time;
    ``e2e_s@B``: plus encode/decode time (:func:`end_to_end_comm_time`);
    ``gather_s``: the measured uplink transfer (MPI, no slow link); ``encode_ms``/``decode_ms``:
    mean per message.
    """
    part = run.clients["participated"].astype(bool)
    raw, payload = slot_bytes(run, lossy_slots(run))
    raw, payload = raw[from_round:].sum(), payload[from_round:].sum()
    out = {"accuracy": float(run.rounds["accuracy"][-1]), "best_accuracy": float(np.nanmax(run.rounds["accuracy"])),
           "ratio": float(run.rounds["raw_bytes"].sum() / run.rounds["uplink_bytes"].sum()),
           "conv_ratio": float(raw / payload) if payload > 0 else float("nan"),
           "gather_s": float(run.rounds["gather_s"].sum()),
           "encode_ms": 1e3 * float(run.clients["encode_s"][part].mean()),
           "decode_ms": 1e3 * float(run.clients["decode_s"][part].mean())}
    for b in bandwidths:
        out[f"comm_s@{b / 1e6:g}Mbit"] = modelled_comm_time(run, b, latency_s)
        out[f"e2e_s@{b / 1e6:g}Mbit"] = end_to_end_comm_time(run, b, latency_s)
    return out
