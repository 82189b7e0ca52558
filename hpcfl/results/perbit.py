"""Per-bit accuracy: the accuracy one bit of uplink buys (Salehkalaibar & Rini, arXiv 2202.02812;
methods.md §4.5), for any run of any codec.

The paper defines the concept ("the accuracy improvement one bit of communication buys for the
centralized model") [ABS]; its exact formula was not retrieved [TBD], so both workable definitions
of methods.md §4.5 are implemented (our reconstruction [INF]):

**PBA_total** (one run, :func:`per_bit_accuracy`)
    ``(Acc_final - Acc_0) / B_total``: accuracy gained over training per uplink bit, with
    ``B_total = 8 x sum of the bytes all clients sent`` (``uplink_bytes`` = payload + header by
    default, or ``payload_bytes``). Per round, ``(Acc_t - Acc_prev) / B_t`` where ``Acc_prev`` is
    the previous evaluated accuracy (``Acc_0`` before the first) and ``B_t`` the bits sent since
    that evaluation; their sum weighted by ``B_t`` is PBA_total. The cumulative curve is
    ``(Acc_t - Acc_0) / B_(0..t)``.

    ``Acc_0`` is the logged accuracy of the initial global model: the root attribute
    ``initial_accuracy``, evaluated on the test set before round 0 (every run since that
    attribute was added logs it; resumed runs keep the original value). Only an older file
    without it falls back to chance ``1 / n_classes``; the result says which was used
    (``acc0_source``).

**Marginal PBA** (across runs, :func:`marginal_per_bit`)
    ``(Acc(R) - Acc(R')) / (b(R) - b(R'))`` between consecutive rates ``R' < R`` of runs that differ
    only in their rate: the accuracy the extra bit per entry bought. ``b`` is the *measured*
    bits per entry (``32 x bytes / raw_bytes``, side information and headers included), so the
    denominator is what was really sent; the nominal difference ``R - R'`` is given too. The
    lowest rate of a group is compared with (rate 0, ``Acc_0``), so a run alone in its group gets
    ``(Acc_final - Acc_0) / b``: the accuracy per bit per entry against sending nothing.

    Which runs form a group: by default, runs whose codec configs differ only in the ``bits``
    parameter (mwq, uniform) and whose learning setup is the same. With ``auto_rate=True`` (what
    ``hpcfl report`` uses) a codec without ``bits`` is grouped by the one codec parameter that
    alone varies among runs of the same codec ids and setup (top-k ``ratio``, qsgd ``levels``,
    ...), ordered by measured bits per entry.

Pure functions of :class:`~hpcfl.results.reader.Run`; no MPI, no torch.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from hpcfl.results.reader import Run

__all__ = ["DEFINITION_TOTAL", "DEFINITION_MARGINAL", "n_classes", "initial_accuracy", "acc0_kind", "bits_per_entry",
           "nominal_rate", "rate_params", "per_bit_accuracy", "marginal_per_bit", "markdown_table"]

DEFINITION_TOTAL = ("PBA_total = (Acc_final - Acc_0) / total uplink bits (all clients, all rounds); "
                    "per round: (Acc_t - Acc_prev) / bits sent since the previous evaluation")
DEFINITION_MARGINAL = ("marginal PBA(R) = (Acc(R) - Acc(R')) / (b(R) - b(R')) for consecutive rates R' < R "
                       "of otherwise identical runs; b = measured bits per entry (rate 0: Acc_0, 0 bits)")
_BYTES = {"uplink": "uplink_bytes", "payload": "payload_bytes"}


def n_classes(run: Run) -> int:
    data = run.job.get("data", {})
    if data.get("dataset") == "synthetic":
        return int(data.get("synthetic_classes", 10))
    from hpcfl.config.validate import INPUT_SHAPES

    return int(INPUT_SHAPES.get(data.get("dataset", ""), ((), 10))[1])


def initial_accuracy(run: Run) -> tuple[float, str]:
    """(Acc_0, where it came from): the ``initial_accuracy`` attribute, else chance 1 / n_classes."""
    v = run.attrs.get("initial_accuracy")
    if v is not None and math.isfinite(float(v)):
        return float(v), "logged (initial_accuracy: the initial model's test accuracy, before round 0)"
    return 1.0 / n_classes(run), ("chance (1/n_classes: this file predates the initial_accuracy attribute, "
                                  "so the initial model's accuracy is not in it)")


def acc0_kind(source: str) -> str:
    """The first word of an ``acc0_source``: "logged", "chance" or "given"."""
    return source.split(" ", 1)[0]


def _bytes(run: Run, bits: str) -> np.ndarray:
    if bits not in _BYTES:
        raise ValueError(f"bits must be one of {sorted(_BYTES)}, not {bits!r}")
    return run.rounds[_BYTES[bits]].astype(np.float64) if run.n_rounds else np.zeros(0)


def bits_per_entry(run: Run, bits: str = "payload") -> float:
    """Measured bits per model entry per participating client: ``32 x sum(bytes) / sum(raw_bytes)``."""
    raw = float(run.rounds["raw_bytes"].sum()) if run.n_rounds else 0.0
    return 32.0 * float(_bytes(run, bits).sum()) / raw if raw > 0 else math.nan


def per_bit_accuracy(run: Run, *, bits: str = "uplink", acc0: float | None = None) -> dict[str, Any]:
    """PBA_total of one run, per round and cumulative (see the module doc). Unit: accuracy per bit.

    ``bits``: "uplink" (payload + header, what crossed the wire) or "payload" (the codec's parts).
    ``acc0``: override Acc_0. NaN entries where nothing was evaluated or nothing was sent.

    Keys: definition, total, acc0, acc0_source, acc_final, bits, bits_total, bits_per_entry, and per
    evaluated round (arrays of equal length): rounds (row indices of ``/rounds``), accuracy,
    bits_cum (bits sent up to and including that round), per_round, cumulative.
    """
    a0, source = (float(acc0), "given") if acc0 is not None else initial_accuracy(run)
    sent = _bytes(run, bits) * 8.0
    acc = run.rounds["accuracy"].astype(np.float64) if run.n_rounds else np.zeros(0)
    idx = np.flatnonzero(~np.isnan(acc))
    cum = np.cumsum(sent)
    ev_bits = cum[idx]
    step_bits = np.diff(np.concatenate([[0.0], ev_bits]))
    step_acc = np.diff(np.concatenate([[a0], acc[idx]]))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_round = np.where(step_bits > 0, step_acc / step_bits, np.nan)
        cumulative = np.where(ev_bits > 0, (acc[idx] - a0) / ev_bits, np.nan)
    total_bits = float(cum[-1]) if cum.size else 0.0
    final = float(acc[idx[-1]]) if idx.size else math.nan
    total = (final - a0) / total_bits if idx.size and total_bits > 0 else math.nan
    return {"definition": DEFINITION_TOTAL, "total": total, "acc0": a0, "acc0_source": source,
            "acc_final": final, "bits": bits, "bits_total": total_bits,
            "bits_per_entry": bits_per_entry(run, bits), "rounds": idx, "accuracy": acc[idx], "bits_cum": ev_bits,
            "per_round": per_round, "cumulative": cumulative}


# ------------------------------------------------------------ across runs

def _nodes(cfg: Any) -> Iterable[dict]:
    """Every codec table in an expanded config, outermost first."""
    if isinstance(cfg, dict):
        if "id" in cfg:
            yield cfg
        for v in cfg.values():
            yield from _nodes(v)
    elif isinstance(cfg, list):
        for v in cfg:
            yield from _nodes(v)


def nominal_rate(run: Run) -> tuple[float, str | None]:
    """(rate, the codec key it came from): the first ``bits`` parameter in the codec tree (mwq,
    uniform), else the measured payload bits per entry rounded to 2 decimals (key None)."""
    for node in _nodes(run.codec.get("codec", {})):
        if isinstance(node.get("bits"), (int, float)) and not isinstance(node.get("bits"), bool):
            return float(node["bits"]), "bits"
    return round(bits_per_entry(run, "payload"), 2), None


def _strip_rate(run: Run, rate_key: str | None) -> dict:
    """The run's codec config without its rate parameter: ``"bits"`` is removed from the first codec
    table that has it; any other key is a dotted path into the config (as :func:`_flat` names it)."""
    codec = json.loads(json.dumps(run.codec.get("codec", {})))
    if rate_key == "bits":
        for node in _nodes(codec):
            if rate_key in node:
                node.pop(rate_key)
                break
    elif rate_key is not None:
        node: Any = codec
        *path, leaf = rate_key.split(".")
        for k in path:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return codec


def _setup(run: Run) -> dict:
    """The job's learning setup: what must be equal for two runs to differ only in their codec."""
    job = run.job
    setup = {k: job.get(k) for k in ("data", "model", "train", "server", "routing")}
    setup["run"] = {k: job.get("run", {}).get(k) for k in ("rounds", "seed", "eval_every")}
    return setup


def _group_key(run: Run, codec: dict) -> str:
    """The codec config without its rate parameter plus the job's learning setup."""
    return json.dumps([codec, _setup(run)], sort_keys=True)


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (cfg.items() if isinstance(cfg, dict) else []):
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.dumps(v, sort_keys=True)
    return out


def _is_id(key: str) -> bool:
    return key.split(".")[-1] == "id"


def _labels(codecs: Sequence[dict]) -> list[str]:
    """Codec id chain (ef / mwq) plus the parameters whose values differ between the codecs."""
    flats = [_flat(c) for c in codecs]
    keys = sorted(set().union(*flats)) if flats else []
    vary = [k for k in keys if not _is_id(k) and len({f.get(k) for f in flats}) > 1]
    out = []
    for c, f in zip(codecs, flats):
        ids = " / ".join(n["id"] for n in _nodes(c))
        extra = " ".join(f"{k.split('.')[-1]}={json.loads(f[k])}" for k in vary if k in f)
        out.append(f"{ids} {extra}".strip())
    return out


def rate_params(runs: Sequence[Run]) -> list[str | None]:
    """Per run, the codec parameter that is its rate under ``auto_rate``: ``"bits"`` when the codec
    tree has a numeric ``bits`` (mwq, uniform); else the dotted path (``"ratio"``,
    ``"inner.ratio"``) of the one codec parameter that alone varies among the given runs with the
    same codec ids and learning setup; else None (the run is grouped with identical configs only)."""
    fams: dict[str, list[dict]] = {}
    keys = []
    for r in runs:
        codec = r.codec.get("codec", {})
        k = json.dumps([[n.get("id") for n in _nodes(codec)], _setup(r)], sort_keys=True)
        keys.append(k)
        fams.setdefault(k, []).append(_flat(codec))
    out: list[str | None] = []
    for r, k in zip(runs, keys):
        if nominal_rate(r)[1] == "bits":
            out.append("bits")
            continue
        flats = fams[k]
        vary = [x for x in sorted(set().union(*flats)) if not _is_id(x) and len({f.get(x) for f in flats}) > 1]
        out.append(vary[0] if len(vary) == 1 else None)
    return out


def marginal_per_bit(runs: Sequence[Run], *, rate: Callable[[Run], float] | None = None,
                     group: Callable[[Run], str] | None = None, bits: str = "uplink",
                     auto_rate: bool = False) -> list[dict[str, Any]]:
    """Marginal per-bit accuracy across runs: one row per run, grouped by everything but the rate,
    sorted by group then rate (see the module doc). ``rate``/``group`` override how a run's rate
    and group are found (default: :func:`nominal_rate`; codec config minus its rate + job setup).
    ``auto_rate``: a codec without ``bits`` takes the one codec parameter that varies as its rate
    parameter (:func:`rate_params`); its rate is then the measured payload bits per entry.

    Row keys: group, label, rate, rate_param, acc_final, acc0, acc0_source, bits_per_entry, d_acc,
    d_rate, d_bits_per_entry, marginal (d_acc / d_bits_per_entry, accuracy per extra bit per entry),
    pba_total, path, index (position in ``runs``), vs_index (index of the run it is measured
    against; None = 0 bits at Acc_0), definition.
    """
    rows = []
    if rate is not None:
        found = [(float(rate(r)), None) for r in runs]
    elif auto_rate:
        found = []
        for r, key in zip(runs, rate_params(runs)):
            found.append(nominal_rate(r) if key == "bits" else (round(bits_per_entry(r, "payload"), 2), key))
    else:
        found = [nominal_rate(r) for r in runs]
    codecs = [_strip_rate(r, key) for r, (_, key) in zip(runs, found)]
    labels = _labels(codecs)
    for i, (r, (rt, key), codec, label) in enumerate(zip(runs, found, codecs, labels)):
        gk = _group_key(r, codec)
        if group is not None:
            gk = label = str(group(r))
        p = per_bit_accuracy(r, bits=bits)
        rows.append({"group": gk, "label": label, "rate": rt, "rate_param": key, "acc_final": p["acc_final"],
                     "acc0": p["acc0"], "acc0_source": p["acc0_source"], "bits_per_entry": p["bits_per_entry"],
                     "pba_total": p["total"], "path": str(r.path), "index": i})
    rows.sort(key=lambda w: (w["group"], w["rate"]))
    prev: dict[str, dict] = {}
    for w in rows:
        before = prev.get(w["group"], {"rate": 0.0, "acc_final": w["acc0"], "bits_per_entry": 0.0, "index": None})
        w["vs_index"] = before["index"]
        w["d_acc"] = w["acc_final"] - before["acc_final"]
        w["d_rate"] = w["rate"] - before["rate"]
        w["d_bits_per_entry"] = w["bits_per_entry"] - before["bits_per_entry"]
        ok = w["d_bits_per_entry"] > 0 and math.isfinite(w["d_acc"])
        w["marginal"] = w["d_acc"] / w["d_bits_per_entry"] if ok else math.nan
        prev[w["group"]] = w
    for w in rows:
        w["definition"] = DEFINITION_MARGINAL
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`marginal_per_bit` as a Markdown table (PBA_total in accuracy per Mbit)."""
    out = ["| codec | rate | final acc | bits/entry | PBA_total (acc/Mbit) | d acc | marginal (acc/bit/entry) |",
           "|---|---|---|---|---|---|---|"]

    def f(v: float, spec: str) -> str:
        return "–" if v is None or not math.isfinite(v) else format(v, spec)

    for w in rows:
        out.append(f"| {w['label']} | {w['rate']:g} | {f(w['acc_final'], '.4f')} | {f(w['bits_per_entry'], '.3f')} "
                   f"| {f(w['pba_total'] * 1e6, '.4g')} | {f(w['d_acc'], '+.4f')} | {f(w['marginal'], '+.4f')} |")
    return "\n".join(out)
