"""MWQ (hpcfl/codecs/methods/mwq.py, _lloyd.py): known Lloyd–Max results, the M-weighted
design's properties, the fit-as-side-information protocol, bytes and strict decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hpcfl.codecs.base import Ctx, Encoded, PartError
from hpcfl.codecs.bitpack import packed_size
from hpcfl.codecs.methods import _lloyd
from hpcfl.codecs.methods._lloyd import (beta_key, center_key, fit_gennorm, levels_from_fit, unit_distortion,
                                         unit_levels)
from hpcfl.codecs.methods.mwq import FLAG_DENSE, FLAG_ZSTD, MWQ
from hpcfl.codecs.registry import expand, get_codec
from hpcfl.codecs.state import CodecState
from hpcfl.codecs.update import UpdateCodec
from tests.codecs.common import Input, check_corruption, check_many_to_one, check_roundtrip

SIGMA = 1 / math.sqrt(2)  # std of the unit Gaussian density ~ exp(-u^2) (beta = 2)

# Max (1960) / Lloyd (1982): optimal positive levels of the unit-variance Gaussian, and the MSE
MAX_LEVELS = {1: [0.7979], 2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152],
              4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]}
MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def gennorm_sample(n: int, beta: float, seed: int, scale: float = 1.0, loc: float = 0.0) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(stats.gennorm.rvs(beta, loc=loc, scale=scale, size=n, random_state=rng)
                            .astype(np.float32))


def ctx(n: int, want_recon: bool = True, seed: int = 0) -> Ctx:
    return Ctx("w", (n,), seed=seed, want_recon=want_recon)


def code(x: torch.Tensor, **cfg) -> tuple[MWQ, Encoded, torch.Tensor]:
    """Encode with the codec, decode with a *fresh* codec (the root), return both."""
    c = get_codec({"id": "mwq", **cfg})
    enc = c.encode(x, ctx(x.numel()))
    root = get_codec(c.get_config())
    dec = root.decode(Encoded(dict(enc.parts), enc.flags), ctx(x.numel(), False))
    assert torch.equal(enc.recon.view(torch.int32), dec.view(torch.int32)), "client recon != root decode"
    return c, enc, dec


# ------------------------------------------------------------ known results

@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_m0_gaussian_design_is_lloyd_max(bits):
    lv = unit_levels(200, 0.0, bits) / SIGMA
    half = lv[1 << (bits - 1):]
    np.testing.assert_allclose(half, MAX_LEVELS[bits], rtol=6e-4)
    np.testing.assert_array_equal(lv, -lv[::-1])  # symmetric
    assert unit_distortion(200, 0.0, bits) / SIGMA ** 2 == pytest.approx(MAX_MSE[bits], rel=1e-3)


def test_r1_is_the_half_mean_of_the_weighted_density():
    """R = 1: one level per side, the weighted centroid of u > 0: Gamma((m+2)/b) / Gamma((m+1)/b)."""
    for k, m in ((100, 0.0), (150, 2.0), (70, 4.0)):
        b = k / 100
        want = math.gamma((m + 2) / b) / math.gamma((m + 1) / b)
        assert unit_levels(k, m, 1)[1] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("k,m", [(200, 0.0), (100, 0.0), (60, 2.0), (150, 4.0), (30, 1.0)])
def test_distortion_falls_with_rate(k, m):
    d = [unit_distortion(k, m, r) for r in range(1, 9)]
    assert all(a > b for a, b in zip(d, d[1:])), d
    assert d[-1] < 1e-3 * d[0]


def test_m_moves_levels_outward():
    for k in (60, 100, 200):
        for bits in (1, 2, 3, 4):
            outer = [unit_levels(k, m, bits)[-1] for m in (0.0, 1.0, 2.0, 4.0)]
            inner = [unit_levels(k, m, bits)[1 << (bits - 1)] for m in (0.0, 1.0, 2.0, 4.0)]
            assert all(a < b for a, b in zip(outer, outer[1:])), (k, bits, outer)
            assert all(a < b for a, b in zip(inner, inner[1:])), (k, bits, inner)


def test_design_matches_monte_carlo_weighted_distortion():
    """The closed-form distortion equals a sample estimate, and each design wins on its own M."""
    rng = np.random.Generator(np.random.PCG64(3))
    u = stats.gennorm.rvs(1.2, size=400_000, random_state=rng)
    for m in (0.0, 2.0):
        lv = unit_levels(120, m, 2)
        q = lv[np.searchsorted(0.5 * (lv[:-1] + lv[1:]), u)]
        mc = float(np.mean(np.abs(u) ** m * (u - q) ** 2))
        assert mc == pytest.approx(unit_distortion(120, m, 2), rel=0.03)

    def dist(design_m: float, eval_m: float) -> float:
        lv = unit_levels(120, design_m, 2)
        q = lv[np.searchsorted(0.5 * (lv[:-1] + lv[1:]), u)]
        return float(np.mean(np.abs(u) ** eval_m * (u - q) ** 2))

    assert dist(0.0, 0.0) < dist(2.0, 0.0)
    assert dist(2.0, 2.0) < dist(0.0, 2.0)


def test_design_is_deterministic_and_cached():
    a = unit_levels(137, 1.5, 3, 100)
    _lloyd._unit_half.cache_clear()
    b = unit_levels(137, 1.5, 3, 100)
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(a.astype(np.float32).astype(np.float64), a)  # rounded to float32
    assert unit_levels(137, 1.5, 3, 100) is not unit_levels(137, 1.5, 3, 100)  # callers get copies


# ---------------------------------------------------------------- the fit

@pytest.mark.parametrize("beta", [0.8, 1.2, 2.0])
def test_fit_recovers_gennorm_shape(beta):
    x = gennorm_sample(50_000, beta, seed=int(beta * 10)).double().numpy()
    z = (x - x.mean()) / x.std()
    b, alpha = fit_gennorm(z)
    assert beta_key(b) is not None and abs(b - beta) < 0.08
    ref = stats.gennorm.fit(z[:20000], floc=0)[0]  # the same estimator, scipy's generic optimiser
    assert abs(fit_gennorm(z[:20000])[0] - ref) <= 0.011
    # for the fitted beta, alpha makes the density unit variance (std of z is 1)
    assert alpha ** 2 * math.gamma(3 / b) / math.gamma(1 / b) == pytest.approx(1.0, rel=0.05)


def test_beta_grid_is_strict():
    assert beta_key(np.float32(1.37)) == 137
    assert beta_key(np.float32(0.2)) == 20 and beta_key(np.float32(5.0)) == 500
    for bad in (1.375, 0.19, 5.01, float("nan"), float("inf"), 1.37):  # 1.37 as float64 is not the float32 value
        assert beta_key(bad) is None, bad


def test_gaussian_tensor_gets_lloyd_max_levels():
    sd, mu = 0.02, 0.003
    x = gennorm_sample(200_000, 2.0, seed=1, scale=sd * math.sqrt(2), loc=mu)
    for bits in (1, 2):
        c, enc, dec = code(x, bits=bits, side="codebook")
        assert enc.flags == 0
        lv = enc.parts["codebook"].astype(np.float64)
        xs = x.double()
        std = float(xs.std(unbiased=False))
        np.testing.assert_allclose((lv[1 << (bits - 1):] - float(xs.mean())) / std, MAX_LEVELS[bits], rtol=0.02)


# -------------------------------------------------------------- the codec

def test_r1_is_a_scaled_sign_quantizer():
    x = gennorm_sample(5000, 1.0, seed=4, scale=0.1)
    c, enc, dec = code(x, bits=1, m=1.0)
    mu = float(enc.parts["fit"][0])
    vals = torch.unique(dec)
    assert vals.numel() == 2 and float(vals[0]) < mu < float(vals[1])
    assert float(vals[0] + vals[1]) / 2 == pytest.approx(mu, abs=1e-7)
    assert torch.equal(dec > mu, x > mu)  # the sign of x - mu decides
    corr = torch.corrcoef(torch.stack([torch.sign(x - mu), dec]))[0, 1]
    assert float(corr) > 0.9999


@pytest.mark.parametrize("bits", range(1, 9))
def test_payload_bytes_formula(bits):
    n = 3001
    x = gennorm_sample(n, 1.3, seed=bits)
    for side, side_bytes in (("fit", 16), ("codebook", 4 << bits)):
        c, enc, dec = code(x, bits=bits, side=side)
        assert enc.payload_bytes == side_bytes + packed_size(n, bits)
        assert set(enc.parts) == {side, "codes"}
        assert torch.unique(dec).numel() <= 1 << bits


def test_empirical_distortion_falls_with_rate_and_m_weights_tails():
    x = gennorm_sample(60_000, 1.0, seed=9, scale=0.05)
    mse = [float(((code(x, bits=b)[2] - x) ** 2).mean()) for b in (1, 2, 3, 4)]
    assert all(a > 2 * b for a, b in zip(mse, mse[1:])), mse

    def d_m(dec: torch.Tensor, m: float) -> float:
        return float((x.abs() ** m * (dec - x) ** 2).mean())

    d0 = code(x, bits=2, m=0.0)[2]
    d2 = code(x, bits=2, m=2.0)[2]
    assert d_m(d0, 0.0) < d_m(d2, 0.0) and d_m(d2, 2.0) < d_m(d0, 2.0)


def test_fit_and_codebook_sides_decode_identically():
    x = gennorm_sample(10_000, 0.9, seed=5)
    _, ef, df = code(x, bits=3, m=2.0, side="fit")
    _, ec, dc = code(x, bits=3, m=2.0, side="codebook")
    assert torch.equal(df, dc)
    assert np.array_equal(ef.parts["codes"], ec.parts["codes"])
    assert np.array_equal(levels_from_fit(ef.parts["fit"], 2.0, 3, 100), ec.parts["codebook"])


def test_entropy_coding_pays_when_levels_are_skewed():
    x = gennorm_sample(50_000, 1.0, seed=6)
    _, plain, dp = code(x, bits=4, m=4.0)
    _, coded, dc = code(x, bits=4, m=4.0, entropy=True)
    assert coded.flags == FLAG_ZSTD and coded.parts["codes"].nbytes < 0.8 * plain.parts["codes"].nbytes
    assert coded.stats["entropy_bits"] < 3.2
    assert torch.equal(dp, dc)
    _, r1, _ = code(x, bits=1, entropy=True)  # 1 bit of entropy per byte: packing wins
    assert r1.flags == 0


def test_dense_fallbacks():
    small = gennorm_sample(100, 1.0, seed=7)
    _, enc, dec = code(small)  # min_numel = 256
    assert enc.flags == FLAG_DENSE and torch.equal(dec, small) and enc.payload_bytes == 400
    const = torch.full((500,), 0.25)
    _, enc, dec = code(const)
    assert enc.flags == FLAG_DENSE and torch.equal(dec, const)
    nan = gennorm_sample(500, 1.0, seed=8)
    nan[3] = float("nan")
    c = get_codec({"id": "mwq"})
    enc = c.encode(nan, ctx(500))
    assert enc.flags == FLAG_DENSE and torch.isnan(enc.recon[3])
    _, enc, _ = code(small, min_numel=0)
    assert enc.flags == 0 and enc.payload_bytes == 16 + 25


def test_subsample_is_seeded():
    x = gennorm_sample(50_000, 1.5, seed=10)
    c = get_codec({"id": "mwq", "sample": 1000})
    a = c.encode(x, ctx(x.numel(), seed=1)).parts["fit"]
    b = c.encode(x, ctx(x.numel(), seed=1)).parts["fit"]
    assert a.tobytes() == b.tobytes()
    fits = {c.encode(x, ctx(x.numel(), seed=s)).parts["fit"][3].item() for s in range(4)}
    assert len(fits) > 1  # another round or client draws another subsample


def _enc(x, **cfg):
    c = get_codec({"id": "mwq", **cfg})
    e = c.encode(x, ctx(x.numel(), False))
    return c, Encoded(dict(e.parts), e.flags)


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p.__setitem__("fit", np.array([0, 1, 1.375, 1], np.float32)), "fit"),
    (lambda p: p.__setitem__("fit", np.array([0, 0, 1.5, 1], np.float32)), "fit"),
    (lambda p: p.__setitem__("fit", np.array([0, 1, 1.5, -1], np.float32)), "fit"),
    (lambda p: p.__setitem__("fit", np.array([np.nan, 1, 1.5, 1], np.float32)), "fit"),
    (lambda p: p.__setitem__("fit", np.array([0, 3e38, 1.5, 3e38], np.float32)), "fit"),
    (lambda p: p.__setitem__("fit", np.zeros(3, np.float32)), "fit"),
    (lambda p: p.pop("fit"), "fit"),
    (lambda p: p.__setitem__("codebook", np.zeros(4, np.float32)), "codebook"),
    (lambda p: p.__setitem__("dense", np.zeros(1000, np.float32)), "dense"),
    (lambda p: p.__setitem__("codes", p["codes"][:-1]), "codes"),
])
def test_decode_rejects_bad_parts(mutate, match):
    c, enc = _enc(gennorm_sample(1000, 1.0, seed=11))
    mutate(enc.parts)
    with pytest.raises(PartError, match=match):
        c.decode(enc, ctx(1000, False))


def test_decode_rejects_bad_codebooks_and_flags():
    c, enc = _enc(gennorm_sample(1000, 1.0, seed=12), side="codebook")
    for bad in (np.array([0, 2, 1, 3], np.float32), np.array([0, 1, np.inf, 3], np.float32)):
        e = Encoded({**enc.parts, "codebook": bad}, 0)
        with pytest.raises(PartError, match="codebook"):
            c.decode(e, ctx(1000, False))
    with pytest.raises(PartError, match="flags"):
        c.decode(Encoded(dict(enc.parts), 4), ctx(1000, False))
    with pytest.raises(PartError, match="zstd|codes"):  # packed codes labelled as a zstd frame
        c.decode(Encoded(dict(enc.parts), FLAG_ZSTD), ctx(1000, False))
    with pytest.raises(PartError, match="dense"):  # a tensor this size is never sent dense
        c.decode(Encoded({"dense": np.zeros(100, np.float32)}, FLAG_DENSE), ctx(1000, False))
    with pytest.raises(PartError, match="codes"):  # ... and a small one never quantised
        c.decode(Encoded(dict(enc.parts), 0), ctx(100, False))


def test_decode_rejects_a_zstd_frame_that_does_not_pay():
    c = get_codec({"id": "mwq", "bits": 4, "m": 4.0, "entropy": True})
    x = gennorm_sample(5000, 1.0, seed=13)
    enc = c.encode(x, ctx(5000, False))
    assert enc.flags == FLAG_ZSTD
    big = c._zstd().compress(np.full(5000, 16, np.uint8))  # an index out of range
    with pytest.raises(PartError, match="range"):
        c.decode(Encoded({**enc.parts, "codes": big}, FLAG_ZSTD), ctx(5000, False))
    pad = np.concatenate([enc.parts["codes"], np.zeros(packed_size(5000, 4), np.uint8)])
    with pytest.raises(PartError, match="no smaller"):
        c.decode(Encoded({**enc.parts, "codes": pad}, FLAG_ZSTD), ctx(5000, False))


# --------------------------------------------------- through real messages

VARIANTS = [{"bits": 1, "m": 2.0}, {"bits": 3, "side": "codebook", "min_numel": 0},
            {"bits": 4, "m": 4.0, "entropy": True}, {"bits": 8, "m": 1.0, "side": "codebook", "entropy": True},
            {"bits": 3, "m": 2.0, "weight_center": "zero"}]
MODEL = Input("mwq-model", (("conv.weight", (8, 3, 5, 5)), ("conv.bias", (8,)), ("fc.weight", (10, 300))))


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_variants_through_the_wire(cfg):
    full = {"id": "mwq", **cfg}
    dec = check_roundtrip(full, MODEL.update(0, 0))
    assert set(dec) == {"conv.weight", "conv.bias", "fc.weight"}
    check_many_to_one(full, MODEL, clients=3, rounds=2)
    uc = UpdateCodec(full, {}, MODEL.params)
    data = uc.encode(MODEL.update(1, 0), client=0, round=0, state=CodecState()).data
    assert check_corruption(uc, data, f"mwq-{cfg}")["rejected"] >= 5


def test_recipe_mwq_ef():
    cfg = expand({"id": "mwq_ef", "bits": 3, "m": 2, "decay": 0.7})
    assert cfg == {"id": "ef", "beta": 0.7, "inner": {"id": "mwq", "bits": 3, "m": 2, "side": "fit",
                                                      "entropy": False, "weight_center": "mean"}}
    assert expand({"id": "mwq_ef", "weight_center": "zero"})["inner"]["weight_center"] == "zero"
    c = get_codec(cfg)
    assert c.inner.m == 2.0 and c.beta == 0.7 and c.gamma == 1.0


def test_stats_gain_is_the_norm_ratio_and_grows_with_m():
    x = gennorm_sample(20_000, 0.8, seed=14, scale=0.01)
    gains = []
    for m in (0.0, 1.0, 2.0):
        c, enc, dec = code(x, bits=2, m=m)
        assert enc.stats["gain"] == pytest.approx(float(dec.double().norm() / x.double().norm()), rel=1e-5)
        assert 0.0 < enc.stats["entropy_bits"] <= 2.0 and enc.stats["beta"] == float(enc.parts["fit"][2])
        gains.append(enc.stats["gain"])
    assert gains[0] < 1.0 < gains[1] < gains[2]  # Lloyd-Max shrinks (MSE-optimal), M > 0 inflates


# ------------------------------------------- weight centre: |x - mu|^M (default) or |x|^M

def test_weight_center_zero_equals_mean_when_m_is_0():
    x = gennorm_sample(20_000, 1.3, seed=20, scale=0.05, loc=0.03)
    for bits in (1, 3):
        _, em, dm = code(x, bits=bits, m=0.0)
        _, ez, dz = code(x, bits=bits, m=0.0, weight_center="zero")
        assert em.parts["fit"].tobytes() == ez.parts["fit"].tobytes()
        assert em.parts["codes"].tobytes() == ez.parts["codes"].tobytes() and torch.equal(dm, dz)
    for k in (60, 200):
        assert unit_levels(k, 0.0, 3, 100, 250).tobytes() == unit_levels(k, 0.0, 3).tobytes()
    fit = np.array([0.0, 1.0, 1.5, 0.9], np.float32)  # mean 0: the offset is 0, the design the same
    assert center_key(fit) == 0
    assert levels_from_fit(fit, 2.0, 3, 100, "zero").tobytes() == levels_from_fit(fit, 2.0, 3, 100).tobytes()


def test_weight_center_zero_design_differs_is_deterministic_and_matches_the_root():
    x = gennorm_sample(30_000, 1.0, seed=21, scale=0.05, loc=0.02)
    _, em, dm = code(x, bits=2, m=2.0)
    _, ez, dz = code(x, bits=2, m=2.0, weight_center="zero")  # code() checks client recon == root decode
    fit = ez.parts["fit"]
    assert fit.tobytes() == em.parts["fit"].tobytes()  # the same fit, another codebook
    k_c = center_key(fit)
    mu, sd, _, alpha = (float(v) for v in fit)
    assert k_c == round(100 * mu / (sd * alpha)) and k_c != 0
    zero, mean = levels_from_fit(fit, 2.0, 2, 100, "zero"), levels_from_fit(fit, 2.0, 2, 100, "mean")
    assert not np.array_equal(zero, mean) and not torch.equal(dm, dz)
    assert set(torch.unique(dz).tolist()) == set(zero.tolist())
    # |x|^M is centred at 0: the levels sit nearly symmetric about 0, not about the mean
    assert abs(zero[0] + zero[-1]) < 0.2 * abs(mean[0] + mean[-1])
    # deterministic: a cleared cache gives the same bytes; the codebook side sends exactly these levels
    _lloyd._unit_full.cache_clear()
    _lloyd._grid.cache_clear()
    assert levels_from_fit(fit, 2.0, 2, 100, "zero").tobytes() == zero.tobytes()
    _, ec, dc = code(x, bits=2, m=2.0, weight_center="zero", side="codebook")
    assert ec.parts["codebook"].tobytes() == zero.tobytes() and torch.equal(dc, dz)
    # a fit whose offset is not representable is invalid with the zero centre only
    c = get_codec({"id": "mwq", "bits": 2, "m": 2.0, "weight_center": "zero"})
    bad = Encoded({"fit": np.array([1e30, 1e-30, 1.5, 1e-10], np.float32), "codes": ez.parts["codes"]}, 0)
    with pytest.raises(PartError, match="fit"):
        c.decode(bad, ctx(x.numel(), False))
    assert get_codec({"id": "mwq", "bits": 2, "m": 2.0})._levels(bad) is not None


def test_weight_center_zero_wins_on_the_raw_magnitude_distortion():
    x = gennorm_sample(60_000, 1.0, seed=22, scale=0.05, loc=0.03)
    mu = x.mean()

    def d(dec: torch.Tensor, centre: torch.Tensor, m: float) -> float:
        return float(((x - centre).abs() ** m * (dec - x) ** 2).mean())

    for m in (1.0, 2.0):
        dm = code(x, bits=2, m=m)[2]
        dz = code(x, bits=2, m=m, weight_center="zero")[2]
        assert d(dz, torch.tensor(0.0), m) < d(dm, torch.tensor(0.0), m)  # |x|^M: the zero design wins
        assert d(dm, mu, m) < d(dz, mu, m)  # |x - mu|^M: the mean design wins


def test_grid_design_matches_the_closed_form_at_zero_offset():
    """The k_c != 0 path (Gauss-Legendre on a fixed grid) forced to c = 0 reproduces the closed form."""
    for k in (30, 100, 200):
        for m in (1.0, 4.0):
            for bits in (1, 2, 3):
                grid = np.array(_lloyd._unit_full(k, m, bits, 100, 0))
                np.testing.assert_allclose(grid, unit_levels(k, m, bits), rtol=1e-6)
            lv = unit_levels(k, m, 4)
            assert unit_distortion(k, m, 4, levels=lv) == pytest.approx(unit_distortion(k, m, 4), rel=1e-5)


def test_grid_design_levels_are_weighted_centroids():
    """R = 1 and 2 with |u + c|^M: each level is the centroid of its cell under the weight (scipy quad)."""
    from scipy import integrate

    for k, m, k_c, bits in ((100, 2.0, 150, 1), (150, 1.0, -40, 2), (70, 4.0, 300, 2)):
        b, c = k / 100, k_c / 100
        lv = unit_levels(k, m, bits, 100, k_c)
        assert np.all(np.diff(lv) > 0)
        edges = [-np.inf, *(0.5 * (lv[:-1] + lv[1:])), np.inf]

        def w(u, p):
            return u ** p * abs(u + c) ** m * math.exp(-abs(u) ** b)

        for j in range(lv.size):
            pts = [p for p in (0.0, -c) if edges[j] < p < edges[j + 1]] or None
            lo, hi = max(edges[j], -400.0), min(edges[j + 1], 400.0)
            num = integrate.quad(w, lo, hi, args=(1,), points=pts, limit=200, epsabs=0)[0]
            den = integrate.quad(w, lo, hi, args=(0,), points=pts, limit=200, epsabs=0)[0]
            assert lv[j] == pytest.approx(num / den, rel=2e-5, abs=1e-6), (k, m, k_c, bits, j)
        # the zero-centre design beats the symmetric one on its own distortion
        sym = unit_levels(k, m, bits)
        assert unit_distortion(k, m, bits, 100, k_c) < unit_distortion(k, m, bits, 100, k_c, levels=sym)
