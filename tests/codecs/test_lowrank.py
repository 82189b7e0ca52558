"""Low-rank codecs: powersgd (single message, warm start) and atomo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcfl.codecs.base import Ctx, Encoded
from hpcfl.codecs.lowrank import atomo_probabilities, matrix_shape
from hpcfl.codecs.registry import expand, get_codec
from hpcfl.codecs.state import CodecState
from hpcfl.codecs.update import UpdateCodec
from hpcfl.errors import ConfigError, WireFormatError
from hpcfl.seeding import derive_seed


def randn(shape, seed=0):
    """Seeded N(0, 1) sample (tests never touch the global RNG)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def make_ctx(shape, *, state=None, round=0, client=0, name="w", want_recon=True, seed=0):
    return Ctx(name, tuple(shape), seed=derive_seed(seed, round, client, name), round=round, client=client,
               want_recon=want_recon, enc_state=state if state is not None else {}, shared_state={})


def decode(codec, enc, shape):
    return codec.decode(Encoded(dict(enc.parts), enc.flags), make_ctx(shape, want_recon=False))


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def spectrum_matrix(n, m, s, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g)).Q[:, :len(s)]
    V = torch.linalg.qr(torch.randn(m, m, generator=g)).Q[:, :len(s)]
    M = (U * torch.tensor(s)) @ V.T
    return M + noise * torch.randn(n, m, generator=g)


def low_rank(n, m, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)


# ------------------------------------------------------------------- powersgd

def test_powersgd_exact_on_low_rank_after_warm_start():
    codec = get_codec({"id": "powersgd", "rank": 2})
    for r_true in (1, 2):
        M = low_rank(64, 48, r_true, seed=r_true)
        st: dict = {}
        for t in range(3):
            enc = codec.encode(M, make_ctx(M.shape, state=st, round=t))
            out = decode(codec, enc, M.shape)
            assert torch.equal(out, enc.recon)
        assert rel(out, M) < 1e-5


def test_powersgd_error_decreases_to_optimum():
    n, m, r = 60, 40, 2
    M = spectrum_matrix(n, m, [1.0, 0.9, 0.5, 0.45] + [0.02] * 30, noise=1e-3)
    sv = torch.linalg.svdvals(M)
    opt = float(torch.sqrt((sv[r:] ** 2).sum()))
    codec = get_codec({"id": "powersgd", "rank": r})
    st: dict = {}
    errs = []
    for t in range(12):
        enc = codec.encode(M, make_ctx(M.shape, state=st, round=t))
        errs.append(float(torch.linalg.norm(M - decode(codec, enc, M.shape))) / opt)
    assert errs[0] > 1.05 and errs[-1] < 1.001
    assert all(b <= a + 1e-4 for a, b in zip(errs, errs[1:]))


def test_powersgd_warm_start_state():
    codec = get_codec({"id": "powersgd", "rank": 3})
    M = randn((20, 2, 3, 5))  # n = 20, m = 30
    st: dict = {}
    enc = codec.encode(M, make_ctx(M.shape, state=st, round=4))
    q = st[""]["q"]
    assert isinstance(q, torch.Tensor) and q.shape == (30, 3)
    assert np.array_equal(q.numpy().reshape(-1), enc.parts["q"])  # Q <- Q' (warm start)
    enc2 = codec.encode(M, make_ctx(M.shape, state=st, round=5))
    assert not np.array_equal(enc2.parts["p"], enc.parts["p"])  # started from Q', not Q0

    def first(**kw):
        return codec.encode(M, make_ctx(M.shape, state={}, **kw)).parts["p"]

    # Q0 depends on (client, tensor), not on the round the client first shows up in
    base = first(round=0, client=1, name="a")
    assert np.array_equal(base, first(round=7, client=1, name="a"))
    assert np.array_equal(base, first(round=7, client=1, name="a", seed=99))
    assert not np.array_equal(base, first(round=0, client=2, name="a"))
    assert not np.array_equal(base, first(round=0, client=1, name="b"))
    assert codec.stateful and not codec.decoder_state and not codec.unbiased


@pytest.mark.parametrize("shape,rank", [((8, 3, 3, 3), 2), ((100, 50), 4), ((7, 9), 1)])
def test_powersgd_bytes(shape, rank):
    codec = get_codec({"id": "powersgd", "rank": rank})
    x = randn(shape)
    enc = codec.encode(x, make_ctx(shape))
    n, m = matrix_shape(shape)
    assert enc.flags == 0 and enc.payload_bytes == 4 * rank * (n + m)
    assert enc.parts["p"].size == n * rank and enc.parts["q"].size == m * rank


@pytest.mark.parametrize("cid", ["powersgd", "atomo"])
def test_dense_fallback(cid):
    for shape in [(100,), (), (3, 2), (10, 10)]:
        codec = get_codec({"id": cid, "rank": 2, "min_compression": 3.0 if shape == (10, 10) else 1.0})
        x = randn(shape)
        enc = codec.encode(x, make_ctx(shape, state={}))
        assert enc.flags == 1 and set(enc.parts) == {"dense"}
        assert enc.payload_bytes == 4 * x.numel()
        assert torch.equal(decode(codec, enc, shape), x) and torch.equal(enc.recon, x)
    # (10, 10) at rank 2: 2 * 20 = 40 < 100 floats -> factors with the default min_compression
    enc = get_codec({"id": cid, "rank": 2}).encode(randn((10, 10)), make_ctx((10, 10), state={}))
    assert enc.flags == 0 and enc.payload_bytes == 4 * 2 * 20
    with pytest.raises(ConfigError):
        get_codec({"id": cid, "min_compression": 0.5})


def test_powersgd_ef_mass_conservation():
    assert expand({"id": "powersgd_ef", "rank": 3}) == {"id": "ef", "inner": {"id": "powersgd", "rank": 3}}
    codec = get_codec({"id": "powersgd_ef", "rank": 1})
    g = torch.Generator().manual_seed(5)
    st: dict = {}
    e = torch.zeros(30, 20)
    for t in range(6):
        x = torch.randn(30, 20, generator=g)
        enc = codec.encode(x, make_ctx(x.shape, state=st, round=t))
        e_new = st[""]["residual"]
        assert torch.allclose(x + e, enc.recon + e_new, atol=1e-5)
        assert torch.equal(decode(codec, enc, x.shape), enc.recon)
        e = e_new.clone()  # the residual buffer is updated in place next round


def test_powersgd_over_the_wire():
    g = torch.Generator().manual_seed(1)
    t = {"conv.weight": torch.randn(16, 3, 3, 3, generator=g), "conv.bias": torch.randn(16, generator=g),
         "fc.weight": torch.randn(10, 64, generator=g)}
    params = [(k, tuple(v.shape)) for k, v in t.items()]
    uc = UpdateCodec({"id": "powersgd_ef", "rank": 2}, {}, params, seed=3)
    cst, rst = CodecState(), CodecState()
    for r in range(3):
        res = uc.encode(t, client=1, round=r, state=cst, want_recon=True)
        dec = uc.decode(res.data, client=1, round=r, state=rst)
        for k in t:
            assert torch.equal(dec.update[k], res.recon[k])
        assert dec.flags == {"conv.weight": 0, "conv.bias": 1, "fc.weight": 0}
        assert res.payload_bytes == 4 * 2 * (16 + 27) + 4 * 16 + 4 * 2 * (10 + 64)
    assert len(rst.to_arrays("enc")) == len(rst)  # the root keeps no encoder state (only last_round)


# ---------------------------------------------------------------------- atomo

@pytest.mark.parametrize("svd,shape", [("full", (40, 30)), ("auto", (40, 30)), ("randomized", (300, 280)),
                                       ("auto", (300, 280))])
def test_atomo_exact_on_rank_r(svd, shape):
    codec = get_codec({"id": "atomo", "rank": 2, "svd": svd})
    for r_true in (1, 2):
        M = low_rank(*shape, r_true, seed=r_true)
        enc = codec.encode(M, make_ctx(M.shape))
        assert enc.payload_bytes == 4 * 2 * (shape[0] + shape[1])
        out = decode(codec, enc, M.shape)
        assert torch.equal(out, enc.recon)
        assert rel(out, M) < 1e-5


def test_atomo_is_optimal_truncation():
    M = spectrum_matrix(50, 70, [3.0, 2.0, 1.0, 0.5, 0.25], noise=0.01)
    sv = torch.linalg.svdvals(M)
    for svd in ("full", "randomized"):
        out = decode(get_codec({"id": "atomo", "rank": 2, "svd": svd}),
                     get_codec({"id": "atomo", "rank": 2, "svd": svd}).encode(M, make_ctx(M.shape)), M.shape)
        err = float(torch.linalg.norm(M - out))
        assert err == pytest.approx(float(torch.sqrt((sv[2:] ** 2).sum())), rel=1e-3)


def test_atomo_probabilities():
    s = torch.tensor([10.0, 5.0, 3.0, 1.0, 0.5, 0.0])
    for budget in (0.5, 1.0, 2.0, 2.5, 3.0, 4.9):
        p = atomo_probabilities(s, budget)
        assert float(p.sum()) == pytest.approx(budget)
        assert float(p.max()) <= 1.0 and float(p[-1]) == 0.0
        assert torch.all(p[:-1] > 0) and torch.all(p[1:] <= p[:-1])
    assert torch.equal(atomo_probabilities(s, 7.0), torch.tensor([1.0, 1, 1, 1, 1, 0], dtype=torch.float64))


def test_atomo_sampled_unbiased_and_bytes():
    n, m, r = 12, 10, 2
    M = spectrum_matrix(n, m, [2.0, 1.5, 1.0, 0.6, 0.3])
    codec = get_codec({"id": "atomo", "rank": r, "sample": True})
    assert codec.unbiased and not get_codec("atomo").unbiased
    trials = 4000
    acc = torch.zeros(n, m, dtype=torch.float64)
    sq = torch.zeros(n, m, dtype=torch.float64)
    ks = []
    for t in range(trials):
        enc = codec.encode(M, make_ctx(M.shape, round=t))
        out = decode(codec, enc, M.shape)
        assert torch.allclose(out, enc.recon, atol=1e-6)
        if enc.flags == 0:
            k = enc.parts["p"].size // n
            assert enc.payload_bytes == 4 * k * (n + m)
            ks.append(k)
        acc += out.double()
        sq += out.double() ** 2
    mean = acc / trials
    sd = torch.sqrt((sq / trials - mean ** 2).clamp_min(1e-12) / trials)
    assert float(((mean - M.double()).abs() / sd).max()) < 5.0
    assert abs(np.mean(ks) - r) < 0.1  # E[k] = r (rare dense draws aside)
    # at most r non-zero singular values: every atom kept, exact
    L = low_rank(n, m, 2, seed=4)
    enc = codec.encode(L, make_ctx(L.shape))
    assert rel(decode(codec, enc, L.shape), L) < 1e-5


# ----------------------------------------------------------- malformed parts

@pytest.mark.parametrize("cid", ["powersgd", "atomo"])
def test_lowrank_malformed(cid):
    codec = get_codec({"id": cid, "rank": 2})
    shape = (12, 5)
    p = dict(codec.encode(randn(shape), make_ctx(shape, state={})).parts)
    for parts, flags in [
        ({**p, "p": p["p"][:-1]}, 0),
        ({**p, "q": p["q"][:-1]}, 0),
        ({**p, "p": np.r_[p["p"], p["p"][:12]].astype(np.float32)}, 0),  # rank 3 instead of 2
        ({**p, "p": p["p"].astype(np.float64)}, 0),
        ({"p": p["p"]}, 0),
        ({**p, "dense": np.zeros(60, np.float32)}, 0),
        (p, 2),
        (p, 1),  # dense flag without a dense part
        ({"dense": np.zeros(59, np.float32)}, 1),
        ({"dense": np.zeros(60, np.float16)}, 1),
    ]:
        with pytest.raises(WireFormatError):
            codec.decode(Encoded(parts, flags), make_ctx(shape, want_recon=False))


def test_atomo_sampled_malformed():
    codec = get_codec({"id": "atomo", "rank": 2, "sample": True})
    shape = (12, 5)
    ok = {"p": np.zeros(12 * 3, np.float32), "q": np.zeros(5 * 3, np.float32)}
    codec.decode(Encoded(ok), make_ctx(shape))  # k = 3 atoms: fine when sampling
    for parts in [{"p": np.zeros(13, np.float32), "q": np.zeros(5, np.float32)},
                  {"p": np.zeros(12 * 6, np.float32), "q": np.zeros(5 * 6, np.float32)},  # k > min(n, m)
                  {"p": np.zeros(24, np.float32), "q": np.zeros(15, np.float32)}]:
        with pytest.raises(WireFormatError):
            codec.decode(Encoded(parts), make_ctx(shape))
    assert math.isclose(0.0, float(codec.decode(Encoded({"p": np.zeros(0, np.float32), "q": np.zeros(
        0, np.float32)}), make_ctx(shape)).abs().sum()))
