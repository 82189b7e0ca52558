"""Sparsifiers: exact top-k, random-k with a shared seed, threshold-v.

All three send ``values`` (float32, the kept entries in ascending index order)
plus *where* they are. Top-k and threshold say where with one of four index
encodings (param ``index``); random-k sends only the seed the root regenerates
the positions from.

Index encodings (``n`` = elements of the slot, ``k`` = entries kept)
--------------------------------------------------------------------
========  ==================  ===========================================
mode      part                payload bytes of the index part
========  ==================  ===========================================
int32     ``indices`` int32   ``4k``, strictly increasing
bitmap    ``bitmap`` uint8    ``ceil(n/8)``, bit i (little bit order) set
                              iff entry i is kept; padding bits zero
delta     ``gaps`` uint32     ``4k``: first index, then successive gaps
                              (all >= 1); meant to be followed by zstd
auto      int32 or bitmap     ``min(4k, ceil(n/8))`` (bitmap only when
                              strictly smaller)
========  ==================  ===========================================

A message therefore costs ``4k + index bytes`` (top-k, threshold, DGC) and
``8 + 4k`` (random-k). The decoder accepts any one of the three index parts,
whatever the configured mode (the part itself says which encoding it is).

Why ``delta`` exists (measured, numpy 2.4 / zstandard 0.25, Gaussian data,
exact top-k): zstd barely shrinks sorted int32 indices (1% of 16 M: 4.00 ->
3.1-3.25 B/index; 0.1%: 3.4; 10%: 2.8-2.9), because the low bytes of sorted
positions are noise. The gaps of the same indices are small numbers whose
three high bytes are mostly zero: zstd takes them to 1.43 B/index at 1%
(1.95-2.1 at 0.1%, 0.95 at 10%), against 1.79 for a zstd-compressed bitmap and
an entropy bound of ~1.01 B/index at 1%. At 1% a whole message drops from
8.00 to ~5.43 B per kept entry (-32%); zstd level 1 and 3 give the same size,
level 1 runs at ~400 MB/s on the gaps (level 3: ~250). Hence the recipe
``topk_zstd`` (``index = "delta"`` + zstd level 1 on ``gaps``). Float32 values
only shrink to ~3.4 B/value under zstd (-15%), so they are not compressed by
default (list them in ``bytes.parts`` to try).

Fast exact top-k (:func:`topk_indices`)
---------------------------------------
``torch.topk`` on one CPU thread is slow for large ``n`` (1% of 16 M floats:
~0.32 s). We instead estimate the k-th largest magnitude from a seeded sample
of 16,384 entries, take a threshold ``t`` a safe margin below it (4 binomial
standard deviations), collect the candidates ``|x| >= t`` in one streaming
pass, and run an exact selection on the candidates only (about 1.15-1.45 k
of them). Tensors of at most 65,536 entries, and k > n/4, skip the sample and
select over all entries directly.
If fewer than ``k`` candidates turn up, the threshold is lowered (sample rank
x4) and the pass repeated, at most twice, before an exact selection over all
entries. The result is *exactly* the k largest magnitudes, with ties broken
towards the lowest index, so it does not depend on the sample or the seed.
NaN entries are never preferred over numbers (they rank below 0).

On CPU tensors the candidate pass runs on a zero-copy numpy view of the
tensor, in cache-sized chunks, and the final selection uses ``np.partition``:
measured on the development VM (one thread), numpy's abs / compare /
flatnonzero take ~9 ms for 16 M floats where the equivalent torch ops take
~20 ms (torch's elementwise compare and nonzero are ~5x slower
single-threaded, and its large temporaries page-fault), and ``np.partition``
of 1.8 M candidates takes 1.1 ms against 19 ms for ``torch.topk``. On other
devices everything is torch. Either way the tensor is only read.

Measured (16 M float32, ``torch.set_num_threads(1)``, best of 5-15): 1%:
13 ms vs 284 ms for ``torch.topk(x.abs(), k)`` (21x; memcpy of the same 64 MiB
into an existing buffer: 3 ms, a fresh ``clone``: 27 ms); 0.1%: 6.6 ms (27x);
10%: 25 ms (11x).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcfl.codecs.base import Codec, Ctx, Encoded, Param, PartError, from_numpy, need_part, to_numpy
from hpcfl.codecs.registry import register_codec, register_recipe

__all__ = ["TopK", "RandomK", "Threshold", "SparseCodec", "topk_indices", "threshold_indices",
           "count_for", "pack_indices", "read_sparse", "scatter", "INDEX_MODES"]

INDEX_MODES = ("auto", "int32", "bitmap", "delta")
INDEX_PARTS = ("indices", "bitmap", "gaps")

_SAMPLE = 16384       # sampled magnitudes for the threshold estimate
_MARGIN_SD = 4.0      # threshold this many binomial sd below the estimated k-th largest
_DIRECT_N = 1 << 16   # at or below this size, select over all entries directly
_CHUNK = 1 << 18      # elements per chunk of the numpy candidate pass (1 MiB of float32)
_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------ selection

def count_for(n: int, ratio: float, k: int = 0) -> int:
    """Entries to keep of ``n``: ``k`` if > 0, else ``max(1, ceil(ratio * n))``; never more than n.

    ``ratio * n`` within 1e-9 (relative) of an integer counts as that integer, so
    ``ratio = 0.07, n = 100`` gives 7, not ``ceil(7.000000000000001) = 8``.
    """
    if n <= 0:
        return 0
    if k > 0:
        return min(int(k), n)
    r = ratio * n
    near = round(r)
    kk = near if abs(r - near) <= 1e-9 * max(1.0, r) else math.ceil(r)
    return int(min(n, max(1, kk)))


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN ranked below every number (as -1)."""
    a = x.abs()
    return a.masked_fill_(torch.isnan(a), -1.0)


def _pick(cand: torch.Tensor | None, a: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    """Keep the k largest of magnitudes ``a``, ties broken towards the lowest index.

    ``cand`` holds the ascending indices ``a`` belongs to (None: ``a`` is the
    whole vector); it must be a superset of the true top-k, i.e. hold every
    entry >= the k-th largest magnitude. Returns ascending int64 indices.
    """
    c = a.numel()
    if c == k:
        return torch.arange(c, device=a.device) if cand is None else cand
    if backend == "numpy":
        # numpy's introselect is ~15x faster than torch.topk here (1.8 M values: 1.1 vs 19 ms)
        an = a.numpy()
        vk = np.partition(an, c - k)[c - k]
        gt = an > vk
        need = k - int(np.count_nonzero(gt))
        eq = an == vk
        if need < int(np.count_nonzero(eq)):
            eq &= np.cumsum(eq, dtype=np.int64) <= need
        keep = np.flatnonzero(gt | eq)
        return torch.from_numpy(keep if cand is None else cand.numpy()[keep])
    vk = torch.topk(a, k, sorted=False).values.min()
    gt = a > vk
    need = k - int(gt.sum())
    eq = a == vk
    if need < int(eq.sum()):
        eq &= torch.cumsum(eq, 0, dtype=torch.int64) <= need
    keep = torch.nonzero(gt | eq).squeeze(1)
    return keep if cand is None else cand[keep]


def _select_all(x: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    """Exact top-k over every entry (small tensors and the rare fallback)."""
    return _pick(None, _magnitude(x), k, backend)


def _scan(x: torch.Tensor, t: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending indices of ``|x| >= t`` and their magnitudes (x flat, float32)."""
    if backend == "numpy":
        xn = x.detach().numpy()
        n = xn.size
        ch = min(_CHUNK, n)
        buf = np.empty(ch, np.float32)
        mask = np.empty(ch, np.bool_)
        idx_parts, val_parts = [], []
        tt = np.float32(t)
        for s in range(0, n, ch):  # chunks of 256 Ki elements: the work inside is vectorised
            c = xn[s:s + ch]
            b = buf[:c.size]
            m = mask[:c.size]
            np.abs(c, out=b)
            np.greater_equal(b, tt, out=m)
            i = np.flatnonzero(m)
            val_parts.append(b[i])
            i += s
            idx_parts.append(i)
        return (torch.from_numpy(np.concatenate(idx_parts)), torch.from_numpy(np.concatenate(val_parts)))
    a = x.abs()
    cand = torch.nonzero(a >= t).squeeze(1)
    return cand, a[cand]


def _backend(x: torch.Tensor, backend: str) -> str:
    if backend == "auto":
        return "numpy" if x.device.type == "cpu" else "torch"
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', not {backend!r}")
    if backend == "numpy" and x.device.type != "cpu":
        raise ValueError("the numpy backend needs a CPU tensor")
    return backend


def topk_indices(x: torch.Tensor, k: int, seed: int = 0, *, backend: str = "auto") -> torch.Tensor:
    """Ascending int64 indices (on x's device) of the ``k`` largest ``|x|``, exactly.

    Ties are broken towards the lowest index, so the result is a function of
    ``x`` and ``k`` alone; ``seed`` only drives the threshold sample (speed).
    ``backend`` picks the candidate pass: "numpy" (CPU only), "torch" or "auto".
    """
    x = x.detach().reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    x = x.contiguous()
    n = x.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} outside [0, {n}]")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if k == n:
        return torch.arange(n, device=x.device)
    be = _backend(x, backend)
    if n <= _DIRECT_N or 4 * k > n:
        return _select_all(x, k, be)
    g = torch.Generator().manual_seed(int(seed))
    pos = torch.randint(n, (_SAMPLE,), generator=g).to(x.device)
    sample = np.sort(_magnitude(x[pos]).cpu().numpy())[::-1]  # numpy: torch.sort is ~10x slower here
    q = k / n
    rank = max(1, int(math.ceil(_SAMPLE * q + _MARGIN_SD * math.sqrt(_SAMPLE * q * (1 - q)))) + 1)
    for _ in range(3):
        if rank > _SAMPLE:
            break
        t = float(sample[rank - 1])
        if not t > 0:  # the sample's tail is zeros (or NaN): no useful threshold
            break
        cand, a = _scan(x, t, be)
        if cand.numel() >= k:
            return _pick(cand.to(x.device), a.to(x.device), k, be)
        rank *= 4
    return _select_all(x, k, be).to(x.device)


def threshold_indices(x: torch.Tensor, v: float, *, backend: str = "auto") -> torch.Tensor:
    """Ascending int64 indices of ``|x| >= v`` (NaN never qualifies)."""
    x = x.detach().reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    x = x.contiguous()
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    return _scan(x, v, _backend(x, backend))[0].to(x.device)


# ------------------------------------------------------------ index packing

def pack_indices(idx: torch.Tensor, n: int, mode: str) -> dict[str, np.ndarray]:
    """Encode ascending int64 indices of an ``n``-vector as one index part (see module doc)."""
    k = idx.numel()
    if mode == "auto":
        mode = "bitmap" if (n + 7) // 8 < 4 * k else "int32"
    if mode == "int32" and n - 1 > _INT32_MAX:
        mode = "delta" if n - 1 <= 2**32 - 1 else "bitmap"  # int32 cannot address this tensor
    if mode == "delta" and n - 1 > 2**32 - 1:
        mode = "bitmap"
    if mode == "int32":
        return {"indices": to_numpy(idx.to(torch.int32))}
    if mode == "delta":
        gaps = torch.diff(idx, prepend=idx.new_zeros(1)) if k else idx
        return {"gaps": to_numpy(gaps).astype(np.uint32)}
    if mode == "bitmap":
        mask = torch.zeros(n, dtype=torch.bool, device=idx.device)
        mask[idx] = True
        return {"bitmap": np.packbits(to_numpy(mask), bitorder="little")}
    raise ValueError(f"unknown index mode {mode!r}")


def _read_indices(enc: Encoded, n: int, k: int) -> np.ndarray:
    """Decode and validate the one index part: ``k`` strictly increasing indices in [0, n)."""
    present = [p for p in INDEX_PARTS if p in enc.parts]
    if len(present) != 1:
        raise PartError("indices", f"expected exactly one of {', '.join(INDEX_PARTS)}; got "
                        f"{', '.join(present) or 'none'}")
    which = present[0]
    if which == "bitmap":
        bm = need_part(enc, "bitmap", np.uint8, (n + 7) // 8)
        ones = int(np.bitwise_count(bm).sum(dtype=np.int64))
        if ones != k:
            raise PartError("bitmap", f"{ones} bits set but {k} values")
        if n % 8 and bm[-1] >> (n % 8):
            raise PartError("bitmap", f"padding bits beyond element {n} are set")
        return np.flatnonzero(np.unpackbits(bm, count=n, bitorder="little"))
    if which == "indices":
        idx = need_part(enc, "indices", np.int32, k)
        if k:
            if idx[0] < 0 or idx[-1] >= n:
                raise PartError("indices", f"index outside [0, {n})")
            if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
                raise PartError("indices", "indices not strictly increasing (unsorted or duplicate)")
        return idx.astype(np.int64)
    gaps = need_part(enc, "gaps", np.uint32, k)
    if k > 1 and not bool(np.all(gaps[1:] > 0)):
        raise PartError("gaps", "zero gap (duplicate index)")
    idx = np.cumsum(gaps, dtype=np.int64)  # k <= n < 2**32 gaps below 2**32: no overflow
    if k and idx[-1] >= n:
        raise PartError("gaps", f"index {int(idx[-1])} outside [0, {n})")
    return idx


def read_sparse(enc: Encoded, n: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(indices int64, values float32)``; ``k`` = required count (None: any <= n)."""
    if k is None:
        vals = need_part(enc, "values", np.float32, max_size=n)
    else:
        vals = need_part(enc, "values", np.float32, k)
    return _read_indices(enc, n, vals.size), vals


def scatter(idx: np.ndarray, vals: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    out = np.zeros(n, np.float32)
    out[idx] = vals
    return from_numpy(out, shape)


def _index_param() -> Param:
    return Param(str, "auto", "Index encoding: int32 (4 B/entry), bitmap (ceil(n/8) B), delta (uint32 "
                 "gaps for a following zstd), auto (smaller of int32 and bitmap).", choices=INDEX_MODES)


def _ratio_param() -> Param:
    return Param(float, 0.01, "Share of entries kept: k = max(1, ceil(ratio * n)).", min=0.0, max=1.0,
                 min_open=True)


def _k_param() -> Param:
    return Param(int, 0, "Entries kept per slot (capped at n); 0 = use ratio.", min=0)


class SparseCodec(Codec):
    """Common parts and decoding of index + value sparsifiers (top-k, threshold, DGC).

    Decoding is a validated scatter and keeps no state.
    """

    compressible_parts = INDEX_PARTS

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("values",) + INDEX_PARTS

    def expected_count(self, n: int) -> int | None:
        """Entries a valid message must carry for an n-element slot (None: any 0..n)."""
        return None

    def emit(self, x: torch.Tensor, idx: torch.Tensor, ctx: Ctx,
             values: torch.Tensor | None = None) -> Encoded:
        """Parts for the entries ``idx`` (ascending) of flat ``x``; recon on x's device when asked."""
        vals = x[idx] if values is None else values
        parts = {"values": to_numpy(vals.float())}
        parts.update(pack_indices(idx, x.numel(), self.index))
        enc = Encoded(parts)
        if ctx.want_recon:
            r = torch.zeros(x.numel(), dtype=torch.float32, device=x.device)
            r[idx] = vals.float()
            enc.recon = r.reshape(ctx.shape)
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        n = ctx.numel
        idx, vals = read_sparse(enc, n, self.expected_count(n))
        return scatter(idx, vals, ctx.shape)


@register_codec
class TopK(SparseCodec):
    """Exact top-k by magnitude per slot.

    Keeps the ``k = max(1, ceil(ratio * n))`` entries of largest ``|x|`` (or ``k``
    given directly), ties towards the lowest index. Payload bytes:
    ``4k + 4k`` (int32 / delta), ``4k + ceil(n/8)`` (bitmap), and for auto
    ``4k + min(4k, ceil(n/8))``. With ``routing.scope = "model"`` the slot is the
    whole flattened model: global top-k. Selection: :func:`topk_indices`
    (sampled threshold + exact selection on the candidates; ~20x faster than
    ``torch.topk`` on one CPU thread for 1% of 16 M floats).
    """

    codec_id = "topk"
    summary = "exact top-k by magnitude; int32/bitmap/delta indices"
    params = {"ratio": _ratio_param(), "k": _k_param(), "index": _index_param()}

    def expected_count(self, n: int) -> int | None:
        return count_for(n, self.ratio, self.k)

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        xf = x.detach().reshape(-1).float()
        k = count_for(xf.numel(), self.ratio, self.k)
        idx = topk_indices(xf, k, ctx.stage_seed("topk-sample"))
        return self.emit(xf, idx, ctx)


@register_codec
class Threshold(SparseCodec):
    """Threshold-v sparsification: keep every entry with ``|x| >= v``.

    The count k varies per message (0..n). Payload bytes: ``4k`` + the index
    part as for top-k (auto: ``min(4k, ceil(n/8))``). The decoder also checks
    that every received value satisfies ``|value| >= v``.
    """

    codec_id = "threshold"
    summary = "keep entries with |x| >= v (variable count)"
    params = {
        "v": Param(float, 1e-3, "Magnitude threshold (> 0).", min=0.0, min_open=True),
        "index": _index_param(),
    }

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        xf = x.detach().reshape(-1).float()
        return self.emit(xf, threshold_indices(xf, self.v), ctx)

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        idx, vals = read_sparse(enc, ctx.numel, None)
        if vals.size and not bool(np.all(np.abs(vals) >= np.float32(self.v))):
            raise PartError("values", f"value below the threshold v = {self.v}")
        return scatter(idx, vals, ctx.shape)


def randomk_indices(seed: int, n: int, k: int) -> np.ndarray:
    """The k distinct ascending positions random-k keeps.

    ``sort(Generator(PCG64(seed)).choice(n, k, replace=False, shuffle=False))``
    (``shuffle`` only permutes the drawn set, which is sorted anyway).
    """
    if k == 0:
        return np.empty(0, np.int64)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return np.sort(rng.choice(n, k, replace=False, shuffle=False)).astype(np.int64, copy=False)


@register_codec
class RandomK(Codec):
    """Random-k with a shared seed: the root regenerates the positions.

    The client draws a 63-bit seed from ``ctx.stage_seed("randomk")``, keeps the
    positions ``sort(Generator(PCG64(seed)).choice(n, k, replace=False))`` and
    sends parts ``seed`` (uint64[1]) and ``values`` (float32[k]): payload
    ``8 + 4k`` bytes. With ``rescale`` the values are multiplied by ``n / k`` on
    the client (in float32), which makes the codec unbiased; turn it off under
    error feedback (recipe ``randomk_ef``).
    """

    codec_id = "randomk"
    summary = "random-k with a shared seed (seed + values on the wire)"
    compressible_parts = ()
    params = {
        "ratio": _ratio_param(),
        "k": _k_param(),
        "rescale": Param(bool, True, "Scale kept values by n/k (unbiased); false for use with ef."),
    }

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return bool(self.rescale)

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("values", "seed")

    def encode(self, x: torch.Tensor, ctx: Ctx) -> Encoded:
        xf = x.detach().reshape(-1).float()
        n = xf.numel()
        k = count_for(n, self.ratio, self.k)
        seed = ctx.stage_seed("randomk")
        idx = torch.from_numpy(randomk_indices(seed, n, k)).to(xf.device)
        vals = xf[idx]
        if self.rescale and k:
            vals = vals * np.float32(n / k).item()
        enc = Encoded({"values": to_numpy(vals), "seed": np.array([seed], dtype=np.uint64)})
        if ctx.want_recon:
            r = torch.zeros(n, dtype=torch.float32, device=xf.device)
            r[idx] = vals
            enc.recon = r.reshape(ctx.shape)
        return enc

    def decode(self, enc: Encoded, ctx: Ctx) -> torch.Tensor:
        n = ctx.numel
        k = count_for(n, self.ratio, self.k)
        vals = need_part(enc, "values", np.float32, k)
        seed = need_part(enc, "seed", np.uint64, 1)
        return scatter(randomk_indices(int(seed[0]), n, k), vals, ctx.shape)


# ------------------------------------------------------------------- recipes

@register_recipe("topk_ef", "top-k with error feedback (residual memory)",
                 {"ratio": 0.01, "k": 0, "index": "auto"})
def _topk_ef(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "topk", "ratio": p["ratio"], "k": p["k"], "index": p["index"]}}


@register_recipe("topk_zstd", "top-k with delta-coded indices (uint32 gaps) compressed by zstd "
                 "(1% of 16 M: 8.0 -> ~5.4 B per kept entry)", {"ratio": 0.01, "k": 0, "level": 1})
def _topk_zstd(p: dict) -> dict:
    return {"id": "pipeline",
            "encoder": {"id": "topk", "ratio": p["ratio"], "k": p["k"], "index": "delta"},
            "bytes": [{"id": "zstd", "level": p["level"], "parts": ["gaps"]}]}


@register_recipe("randomk_ef", "random-k (no rescaling) with error feedback", {"ratio": 0.01, "k": 0})
def _randomk_ef(p: dict) -> dict:
    return {"id": "ef", "inner": {"id": "randomk", "ratio": p["ratio"], "k": p["k"], "rescale": False}}
