"""Sparsifiers: topk, randomk, threshold, dgc, and their recipes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hpcfl.codecs.sparsify as sp
from hpcfl.codecs.base import Ctx, Encoded
from hpcfl.codecs.registry import expand, get_codec
from hpcfl.codecs.state import CodecState
from hpcfl.codecs.update import UpdateCodec
from hpcfl.codecs.wire import unpack
from hpcfl.errors import ConfigError, WireFormatError
from hpcfl.seeding import derive_seed


def randn(shape, seed=0):
    """Seeded N(0, 1) sample (tests never touch the global RNG)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def make_ctx(shape, *, state=None, round=0, client=0, name="w", want_recon=True, seed=0):
    return Ctx(name, tuple(shape), seed=derive_seed(seed, round, client, name), round=round, client=client,
               want_recon=want_recon, enc_state=state if state is not None else {}, shared_state={})


def reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """k largest |x|, ties towards the lowest index, ascending (stable sort)."""
    order = np.argsort(-np.abs(x.reshape(-1).numpy()).astype(np.float64), kind="stable")
    return torch.from_numpy(np.sort(order[:k]))


def data(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g) * 1e-3
    if kind == "ties":  # few distinct magnitudes, both signs
        return torch.randint(-4, 5, (n,), generator=g).float() / 8
    if kind == "sparse":  # mostly zeros: top-k may have to take zeros
        x = torch.zeros(n)
        m = max(1, n // 200)
        x[torch.randperm(n, generator=g)[:m]] = torch.randn(m, generator=g)
        return x
    raise ValueError(kind)


# ------------------------------------------------------------------ selection

SIZES = [1, 2, 7, 100, 4097, 65536, 65537, 300_000, 1_000_000]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["normal", "ties", "sparse"])
def test_topk_indices_exact(n, kind):
    x = data(kind, n, seed=n)
    for k in sorted({1, max(1, n // 100), max(1, n // 5), n}):
        idx = sp.topk_indices(x, k, seed=3)
        assert idx.dtype == torch.int64 and idx.numel() == k
        ref = reference_topk(x, k)
        assert torch.equal(idx, ref)
        assert torch.equal(sp.topk_indices(x, k, seed=4, backend="torch"), ref)
        # the same magnitudes as torch.topk, as multisets
        want = torch.sort(torch.topk(x.abs(), k).values).values
        assert torch.equal(torch.sort(x.abs()[idx]).values, want)


@pytest.mark.parametrize("kind", ["normal", "ties", "sparse"])
def test_topk_backends_and_seeds_agree(kind):
    x = data(kind, 400_000, seed=1)
    k = 4000
    ref = reference_topk(x, k)
    for seed in (0, 1, 2**62 + 5):
        assert torch.equal(sp.topk_indices(x, k, seed), ref)
        assert torch.equal(sp.topk_indices(x, k, seed, backend="torch"), ref)


def test_topk_retry_and_fallback_paths(monkeypatch):
    x = data("normal", 300_000, seed=2)
    k = 3000
    ref = reference_topk(x, k)
    calls = []
    real_scan = sp._scan

    def counting_scan(*a):
        calls.append(1)
        return real_scan(*a)

    monkeypatch.setattr(sp, "_scan", counting_scan)
    monkeypatch.setattr(sp, "_MARGIN_SD", -10.0)  # threshold too high: the first pass comes up short
    assert torch.equal(sp.topk_indices(x, k, 0), ref)
    assert len(calls) >= 2
    calls.clear()
    monkeypatch.setattr(sp, "_MARGIN_SD", -1000.0)  # every pass short: exact selection over all entries
    assert torch.equal(sp.topk_indices(x, k, 0), ref)
    assert len(calls) == 3


def test_topk_ignores_nan_before_numbers():
    x = data("normal", 200_000, seed=4)
    x[::7] = float("nan")
    k = 500
    idx = sp.topk_indices(x, k, 1)
    assert not torch.isnan(x[idx]).any()
    assert torch.equal(idx, reference_topk(torch.nan_to_num(x, nan=0.0), k))


def test_count_for():
    assert sp.count_for(100, 0.07) == 7
    assert sp.count_for(1000, 0.01) == 10
    assert sp.count_for(1001, 0.01) == 11
    assert sp.count_for(5, 0.01) == 1
    assert sp.count_for(5, 1.0) == 5
    assert sp.count_for(5, 0.5, k=9) == 5
    assert sp.count_for(0, 0.5) == 0


# ---------------------------------------------------------------- topk codec

def roundtrip(codec, x, **kw):
    ctx = make_ctx(x.shape, **kw)
    enc = codec.encode(x, ctx)
    out = codec.decode(Encoded(dict(enc.parts), enc.flags), make_ctx(x.shape, want_recon=False))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert enc.recon is not None and torch.equal(out, enc.recon)
    return enc, out


@pytest.mark.parametrize("index", ["int32", "bitmap", "delta", "auto"])
@pytest.mark.parametrize("shape", [(1000,), (20, 5, 10), (3,)])
def test_topk_codec_roundtrip_and_bytes(index, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    n = x.numel()
    codec = get_codec({"id": "topk", "ratio": 0.05, "index": index})
    enc, out = roundtrip(codec, x)
    k = sp.count_for(n, 0.05)
    idx = reference_topk(x, k)
    want = torch.zeros(n)
    want[idx] = x.reshape(-1)[idx]
    assert torch.equal(out.reshape(-1), want)
    index_bytes = {"int32": 4 * k, "delta": 4 * k, "bitmap": math.ceil(n / 8),
                   "auto": min(4 * k, math.ceil(n / 8))}[index]
    assert enc.payload_bytes == 4 * k + index_bytes
    assert enc.parts["values"].dtype == np.float32 and enc.parts["values"].size == k


def test_topk_auto_picks_smaller_index():
    x = torch.randn(8000, generator=torch.Generator().manual_seed(1))
    sparse = get_codec({"id": "topk", "ratio": 0.01}).encode(x, make_ctx(x.shape))  # 320 B < 1000 B
    assert set(sparse.parts) == {"values", "indices"} and sparse.parts["indices"].dtype == np.int32
    assert sparse.payload_bytes == 4 * 80 + 4 * 80
    dense = get_codec({"id": "topk", "ratio": 0.1}).encode(x, make_ctx(x.shape))  # 3200 B > 1000 B
    assert set(dense.parts) == {"values", "bitmap"} and dense.parts["bitmap"].size == 1000
    assert dense.payload_bytes == 4 * 800 + 1000
    by_k = get_codec({"id": "topk", "k": 250}).encode(x, make_ctx(x.shape))  # 1000 B = 1000 B: int32
    assert "indices" in by_k.parts and by_k.parts["values"].size == 250


def test_topk_k_equals_n_and_k_one():
    x = randn((37,))
    enc, out = roundtrip(get_codec({"id": "topk", "k": 37}), x)
    assert torch.equal(out, x)
    enc, out = roundtrip(get_codec({"id": "topk", "k": 1}), x)
    i = int(torch.argmax(x.abs()))
    assert torch.count_nonzero(out) == 1 and out[i] == x[i]


def test_topk_params_validated():
    with pytest.raises(ConfigError):
        get_codec({"id": "topk", "ratio": 0.0})
    with pytest.raises(ConfigError):
        get_codec({"id": "topk", "ratio": 1.5})
    with pytest.raises(ConfigError):
        get_codec({"id": "topk", "index": "int16"})
    with pytest.raises(ConfigError):
        get_codec({"id": "topk", "k": -1})


def update_roundtrip(cfg, tensors: dict[str, torch.Tensor], rounds=1, routing=None):
    params = [(k, tuple(v.shape)) for k, v in tensors.items()]
    uc = UpdateCodec(cfg, routing or {}, params, seed=5)
    cst, rst = CodecState(), CodecState()
    results = []
    for r in range(rounds):
        res = uc.encode(tensors, client=2, round=r, state=cst, want_recon=True)
        dec = uc.decode(res.data, client=2, round=r, state=rst)
        for k in tensors:
            assert torch.equal(dec.update[k], res.recon[k])
        assert dec.payload_bytes == res.payload_bytes
        results.append((res, dec))
    return results


def test_topk_over_the_wire_and_global_scope():
    g = torch.Generator().manual_seed(3)
    t = {"a.weight": torch.randn(30, 40, generator=g), "a.bias": torch.randn(30, generator=g),
         "b.weight": torch.randn(10, 30, generator=g) * 5}
    ((res, dec),) = update_roundtrip({"id": "topk", "ratio": 0.02}, t, routing={"scope": "model"})
    flat = torch.cat([v.reshape(-1) for v in t.values()])
    k = sp.count_for(flat.numel(), 0.02)
    got = torch.cat([dec.update[n].reshape(-1) for n in t])
    want = torch.zeros_like(flat)
    idx = reference_topk(flat, k)
    want[idx] = flat[idx]
    assert torch.equal(got, want)
    assert res.payload_bytes == 8 * k


def test_topk_ef_recipe():
    assert expand({"id": "topk_ef", "ratio": 0.1}) == {
        "id": "ef", "inner": {"id": "topk", "ratio": 0.1, "k": 0, "index": "auto"}}
    x = {"w": torch.randn(50, 20, generator=torch.Generator().manual_seed(0))}
    update_roundtrip({"id": "topk_ef", "ratio": 0.05}, x, rounds=3)


def test_topk_zstd_recipe_shrinks_indices():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(6))
    codec = get_codec({"id": "topk_zstd"})
    enc = codec.encode(x, make_ctx(x.shape))
    k = sp.count_for(x.numel(), 0.01)
    assert "gaps" in enc.coding and enc.parts["gaps"].nbytes < 0.5 * 4 * k
    assert enc.payload_bytes < 8 * k
    out = codec.decode(Encoded(dict(enc.parts), enc.flags, coding=dict(enc.coding)), make_ctx(x.shape))
    idx = reference_topk(x, k)
    assert torch.equal(torch.nonzero(out).squeeze(1), idx)
    update_roundtrip({"id": "topk_zstd", "ratio": 0.01}, {"w": x.reshape(400, 500)})


# ------------------------------------------------------------------ random-k

def test_randomk_seed_not_indices():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    codec = get_codec({"id": "randomk", "ratio": 0.05})
    enc, out = roundtrip(codec, x)
    k = 50
    assert set(enc.parts) == {"values", "seed"}
    assert enc.parts["seed"].dtype == np.uint64 and enc.parts["seed"].size == 1
    assert enc.payload_bytes == 8 + 4 * k
    # the root regenerates the client's positions from the seed alone
    pos = torch.nonzero(enc.recon).squeeze(1)
    assert torch.equal(torch.nonzero(out).squeeze(1), pos) and pos.numel() == k
    assert torch.equal(pos, torch.from_numpy(sp.randomk_indices(int(enc.parts["seed"][0]), 1000, k)))
    assert torch.allclose(out[pos], x[pos] * (1000 / k))
    # different rounds draw different positions
    enc2 = codec.encode(x, make_ctx(x.shape, round=1))
    assert enc2.parts["seed"][0] != enc.parts["seed"][0]


def test_randomk_no_rescale_and_recipe():
    x = randn((300,))
    enc, out = roundtrip(get_codec({"id": "randomk", "k": 30, "rescale": False}), x)
    pos = torch.nonzero(out).squeeze(1)
    assert pos.numel() == 30 and torch.equal(out[pos], x[pos])
    cfg = expand({"id": "randomk_ef", "ratio": 0.1})
    assert cfg["id"] == "ef" and cfg["inner"]["rescale"] is False
    assert get_codec("randomk").unbiased and not get_codec(cfg).unbiased
    update_roundtrip({"id": "randomk_ef", "ratio": 0.1}, {"w": randn((40, 10))}, rounds=3)


def test_randomk_unbiased():
    n, k, trials = 40, 8, 3000
    x = torch.randn(n, generator=torch.Generator().manual_seed(9))
    codec = get_codec({"id": "randomk", "k": k})
    acc = torch.zeros(n, dtype=torch.float64)
    for t in range(trials):
        acc += codec.encode(x, make_ctx(x.shape, round=t)).recon.double()
    mean = acc / trials
    sd = x.double().abs() * math.sqrt((n / k - 1) / trials)  # per-entry sd of the mean
    z = (mean - x.double()).abs() / sd
    assert float(z.max()) < 5.0


# ----------------------------------------------------------------- threshold

@pytest.mark.parametrize("n", [1, 50, 70_000, 500_000])
def test_threshold_keeps_exactly_above_v(n):
    x = data("normal", n, seed=n) * 1e3
    v = 1.5
    want = torch.nonzero(x.abs() >= v).squeeze(1)
    for backend in ("numpy", "torch"):
        assert torch.equal(sp.threshold_indices(x, v, backend=backend), want)
    codec = get_codec({"id": "threshold", "v": v})
    enc, out = roundtrip(codec, x)
    assert torch.equal(torch.nonzero(out).squeeze(1), want)
    assert torch.equal(out[want], x[want])
    k = want.numel()
    assert enc.payload_bytes == 4 * k + min(4 * k, math.ceil(n / 8))


def test_threshold_ties_and_empty():
    x = torch.tensor([0.5, -0.5, 0.25, -1.0, 0.0])
    enc, out = roundtrip(get_codec({"id": "threshold", "v": 0.5, "index": "int32"}), x)
    assert out.tolist() == [0.5, -0.5, 0.0, -1.0, 0.0]
    enc, out = roundtrip(get_codec({"id": "threshold", "v": 10.0}), x)
    assert enc.parts["values"].size == 0 and torch.count_nonzero(out) == 0
    update_roundtrip({"id": "threshold", "v": 10.0}, {"w": randn((6, 4))})
    with pytest.raises(ConfigError):
        get_codec({"id": "threshold", "v": 0.0})


# ------------------------------------------------------------------------ dgc

def test_dgc_momentum_zero_is_topk_ef():
    dgc = get_codec({"id": "dgc", "ratio": 0.05, "momentum": 0.0})
    ef = get_codec({"id": "topk_ef", "ratio": 0.05})
    g = torch.Generator().manual_seed(11)
    s_dgc, s_ef = {}, {}
    for r in range(6):
        x = torch.randn(30, 40, generator=g)
        a = dgc.encode(x, make_ctx(x.shape, state=s_dgc, round=r))
        b = ef.encode(x, make_ctx(x.shape, state=s_ef, round=r))
        assert a.parts.keys() == b.parts.keys()
        for name in a.parts:
            np.testing.assert_array_equal(a.parts[name], b.parts[name])
        assert torch.equal(a.recon, b.recon)
        assert torch.equal(s_dgc[""]["v"].reshape(x.shape), s_ef[""]["residual"])


def test_dgc_momentum_correction_and_masking():
    m, ratio = 0.9, 0.1
    codec = get_codec({"id": "dgc", "ratio": ratio, "momentum": m, "index": "bitmap"})
    g = torch.Generator().manual_seed(12)
    st: dict = {}
    u = torch.zeros(500)
    v = torch.zeros(500)
    for r in range(5):
        x = torch.randn(500, generator=g)
        u = m * u + x
        v = v + u
        enc = codec.encode(x, make_ctx(x.shape, state=st, round=r))
        k = sp.count_for(500, ratio)
        idx = reference_topk(v, k)
        want = torch.zeros(500)
        want[idx] = v[idx]
        assert torch.allclose(enc.recon, want, rtol=1e-6, atol=1e-6)
        out = codec.decode(Encoded(dict(enc.parts)), make_ctx(x.shape))
        assert torch.equal(out, enc.recon)
        # momentum factor masking: u and v are zero where entries were sent
        sent = torch.nonzero(enc.recon).squeeze(1)
        assert torch.count_nonzero(st[""]["u"][sent]) == 0 and torch.count_nonzero(st[""]["v"][sent]) == 0
        u[idx] = 0
        v[idx] = 0
        assert torch.allclose(st[""]["u"], u, atol=1e-5) and torch.allclose(st[""]["v"], v, atol=1e-5)


def test_dgc_clip():
    codec = get_codec({"id": "dgc", "k": 1000, "momentum": 0.5, "clip": 1.0})
    x = randn((1000,)) * 10
    enc = codec.encode(x, make_ctx(x.shape, state={}))
    assert torch.allclose(enc.recon, x / torch.linalg.vector_norm(x), atol=1e-6)
    assert codec.stateful and not codec.decoder_state
    update_roundtrip({"id": "dgc", "ratio": 0.05}, {"w": randn((20, 20))}, rounds=3)


# ------------------------------------------------------------ malformed parts

N = 100


def good_parts(index: str):
    x = torch.randn(N, generator=torch.Generator().manual_seed(0))
    codec = get_codec({"id": "topk", "k": 10, "index": index})
    return codec, dict(codec.encode(x, make_ctx(x.shape)).parts)


def bad(codec, parts, flags=0, shape=(N,)):
    with pytest.raises(WireFormatError):
        codec.decode(Encoded(parts, flags), make_ctx(shape, want_recon=False))


def test_malformed_int32_indices():
    codec, p = good_parts("int32")
    i = p["indices"]
    for idx in (np.r_[i[:-1], N], np.r_[-1, i[1:]], i[::-1], np.r_[i[:1], i[:-1]],
                np.r_[i[:5], i[4:9]], i[:-1], np.r_[i, N - 1]):
        bad(codec, {**p, "indices": np.ascontiguousarray(idx, dtype=np.int32)})
    bad(codec, {**p, "indices": i.astype(np.int64)})
    bad(codec, {**p, "values": p["values"][:-1]})
    bad(codec, {**p, "values": p["values"].astype(np.float64)})
    bad(codec, {"indices": i})
    bad(codec, {"values": p["values"]})
    bad(codec, {**p, "gaps": i.astype(np.uint32)})
    # threshold (any count) still needs matching counts, and values within n
    th = get_codec({"id": "threshold", "v": 1e-9})
    bad(th, {**p, "values": p["values"][:-1]})
    bad(th, {"values": np.zeros(N + 1, np.float32), "indices": np.arange(N + 1, dtype=np.int32)})
    bad(th, {**p, "values": np.zeros(10, np.float32)})  # below v


def test_malformed_bitmap():
    codec, p = good_parts("bitmap")
    assert "bitmap" in p
    b = p["bitmap"].copy()
    first = int(np.flatnonzero(b)[0])
    b[first] = 0
    bad(codec, {**p, "bitmap": b})  # popcount 9 != 10
    b = p["bitmap"].copy()
    b[-1] |= 0x80  # bit 103 of a 100-element tensor
    bad(codec, {**p, "values": np.r_[p["values"], np.float32(1)].astype(np.float32), "bitmap": b})
    bad(codec, {**p, "bitmap": p["bitmap"][:-1]})
    bad(get_codec({"id": "threshold", "v": 1e-9}), {**p, "values": p["values"][:-1]})


def test_malformed_gaps():
    codec, p = good_parts("delta")
    gaps = p["gaps"]
    g0 = gaps.copy()
    g0[3] = 0
    bad(codec, {**p, "gaps": g0})  # duplicate
    g1 = gaps.copy()
    g1[-1] += N
    bad(codec, {**p, "gaps": g1})  # beyond n
    bad(codec, {**p, "gaps": np.full(10, 2**32 - 1, np.uint32)})
    bad(codec, {**p, "gaps": gaps.view(np.int32)})


def test_malformed_randomk():
    codec = get_codec({"id": "randomk", "k": 10})
    x = randn((N,))
    p = dict(codec.encode(x, make_ctx(x.shape)).parts)
    bad(codec, {**p, "seed": p["seed"].astype(np.int64)})
    bad(codec, {**p, "seed": np.r_[p["seed"], p["seed"]]})
    bad(codec, {**p, "values": p["values"][:-1]})
    bad(codec, {"values": p["values"]})


def test_malformed_over_the_wire_is_wire_error():
    uc = UpdateCodec({"id": "topk", "k": 5, "index": "int32"}, {}, [("w", (50,))])
    res = uc.encode({"w": randn((50,))}, client=0, round=0, state=CodecState())
    data = bytearray(res.data)
    off = unpack(res.data).tensors[0].parts[1].offset  # part 1 = indices, 5 x int32
    data[off + 16:off + 20] = np.int32(50).tobytes()  # last index out of range
    with pytest.raises(WireFormatError):
        uc.decode(bytes(data), client=0, round=0, state=CodecState())
