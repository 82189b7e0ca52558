"""Intrinsic gradient compression (hpcfl/codecs/methods/igc.py): transform maths, protocol, bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from hpcfl.codecs.base import Ctx, Encoded, PartError
from hpcfl.codecs.methods._srht import SRHT, ChunkedGaussian, fwht_, padded_size
from hpcfl.codecs.methods.igc import IGC
from hpcfl.codecs.registry import get_codec
from hpcfl.codecs.state import CodecState
from hpcfl.codecs.update import UpdateCodec
from hpcfl.errors import ConfigError
from hpcfl.fl.server import ServerOptimizer
from tests.codecs.common import INPUT, check_many_to_one, check_roundtrip, check_state_roundtrip


def randn(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def dense(p) -> np.ndarray:
    """The D x d matrix of a projection, built column by column through ``lift`` (tests only)."""
    return np.stack([p.lift(torch.eye(p.d)[i]).numpy() for i in range(p.d)], axis=1).astype(np.float64)


def ctx(n: int, round: int = 0, client: int = 0, seed: int = 0, want_recon: bool = True) -> Ctx:
    return Ctx("@model", (n,), round=round, client=client, job_seed=seed, want_recon=want_recon)


# ---------------------------------------------------------------- transform

@pytest.mark.parametrize("m", [0, 1, 3, 6, 10])
def test_fwht_matches_hadamard_matrix(m):
    n = 1 << m
    x = randn(n, m)
    want = hadamard(n).astype(np.float64) @ x.double().numpy()
    got = fwht_(x.clone()).double().numpy()
    assert np.allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))
    with pytest.raises(ValueError, match="power of two"):
        fwht_(torch.zeros(12))


@pytest.mark.parametrize("n", [1, 2, 5, 100, 1000, 4810])
def test_full_srht_is_orthogonal_lift_project_is_identity(n):
    """d = D': A is orthogonal (restricted to D rows), so lift(project(g)) = g to rounding."""
    p = SRHT(11, n, padded_size(n))
    g = randn(n, n)
    r = p.lift(p.project(g))
    assert r.dtype == torch.float32 and r.shape == (n,)
    assert float((r - g).norm() / g.norm()) < 3e-7
    assert float((p.project(g).norm() - g.norm()).abs() / g.norm()) < 3e-7  # isometry


@pytest.mark.parametrize("n,d", [(256, 20), (1024, 64), (32, 32)])
def test_srht_unpadded_columns_orthonormal_projection_exact(n, d):
    """D = D' (no padding): A^T A = I_d, so project(lift(z)) = z to float32 rounding, lift∘project is
    an orthogonal projection (idempotent, self-adjoint) and vectors inside span(A) survive it."""
    p = SRHT(5, n, d)
    A = dense(p)
    assert np.abs(A.T @ A - np.eye(d)).max() < 1e-6
    z = randn(d, 1)
    assert float((p.project(p.lift(z)) - z).abs().max()) < 1e-6
    g = randn(n, 2)
    pg = p.lift(p.project(g))
    assert float((p.lift(p.project(pg)) - pg).abs().max()) < 1e-6
    h = randn(n, 3)
    assert abs(float(pg @ h) - float(g @ p.lift(p.project(h)))) < 1e-5 * float(g.norm() * h.norm())


@pytest.mark.parametrize("n,d", [(100, 20), (300, 64), (1500, 100)])
def test_srht_padded_is_a_cut_orthogonal_block(n, d):
    """D < D': A is the first D rows of the unpadded D' x d projection of the same seed (signs and rows
    depend on D' only), whose columns are orthonormal; so A^T A is a contraction, mean diagonal D/D'."""
    p, q = SRHT(5, n, d), SRHT(5, padded_size(n), d)
    assert torch.equal(p.rows, q.rows) and torch.equal(p.signs, q.signs)
    A, Q = dense(p), dense(q)
    assert np.allclose(A, Q[:n], rtol=0, atol=1e-6)
    ev = np.linalg.eigvalsh(A.T @ A)
    assert ev.min() > 0 and ev.max() <= 1 + 1e-6
    assert abs(ev.mean() - n / padded_size(n)) < 0.1


def test_srht_unbiased_scaling():
    """normalize = unbiased: A = sqrt(D'/d) A_orth. Every |S_ri| = 1/sqrt(D'), so diag(A A^T) = 1 for
    every seed, and the off-diagonal entries average to 0 over seeds: E[A A^T] = I_D."""
    n, d = 24, 8
    acc = np.zeros((n, n))
    seeds = 300
    for s in range(seeds):
        A = dense(SRHT(s, n, d, unbiased=True))
        G = A @ A.T
        assert np.abs(np.diag(G) - 1).max() < 1e-6
        acc += G
    acc /= seeds
    assert np.abs(acc - np.eye(n)).max() < 0.12  # std of an entry ~ 1/sqrt(d * seeds) = 0.02
    A1, A0 = dense(SRHT(3, n, d, unbiased=True)), dense(SRHT(3, n, d))
    assert np.allclose(A1, A0 * np.sqrt(padded_size(n) / d), atol=1e-6)


@pytest.mark.parametrize("kind", ["srht", "gaussian"])
def test_project_and_lift_are_adjoint(kind):
    n, d = 3000, 50
    p = SRHT(2, n, d) if kind == "srht" else ChunkedGaussian(2, n, d, block_elems=4096)
    g, z = randn(n, 4), randn(d, 5)
    lhs, rhs = float(p.project(g).double() @ z.double()), float(g.double() @ p.lift(z).double())
    assert abs(lhs - rhs) <= 1e-5 * float(g.norm() * z.norm())


def test_gaussian_blocks_regenerate_identically_and_scale():
    """Blocks come from PCG64(seed, block): the block size changes memory, not A."""
    n, d = 1000, 30
    a, b = ChunkedGaussian(9, n, d, block_elems=300), ChunkedGaussian(9, n, d, block_elems=1 << 20)
    assert a.block == 10 and b.block >= n and a.nbytes == 4 * 10 * d
    A = dense(a)
    assert A.shape == (n, d) and not np.array_equal(A, dense(ChunkedGaussian(8, n, d, block_elems=300)))
    assert abs(np.mean(A * A) * n - 1) < 0.05  # entries N(0, 1/D): E[A^T A] = I_d
    assert np.abs(A.T @ A - np.eye(d)).max() < 0.3  # only approximately orthonormal


def test_srht_rng_stream_is_frozen():
    """Both sides of the wire must draw the same signs and rows from the seed. A different numpy
    Generator stream (or a change of the drawing order) would break mixed-version runs: pin it."""
    p = SRHT(1234, 3000, 100)
    h = hashlib.sha256(p.signs.numpy().tobytes() + p.rows.numpy().tobytes()).hexdigest()[:16]
    assert p.n_pad == 4096 and p.rows.numel() == 100 and bool((p.rows[1:] > p.rows[:-1]).all())
    assert h == GOLDEN_SRHT_DIGEST, h


GOLDEN_SRHT_DIGEST = "974d4125b18f53c2"  # numpy 2.x PCG64


# ---------------------------------------------------------------- protocol

def test_subspace_index_per_variant():
    assert {IGC(variant="static").subspace(r, c, 0) for r in range(20) for c in range(5)} == {0}
    k = IGC(variant="ksubspace", k=4)
    assert [k.subspace(r, 7, 0) for r in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    kc = IGC(variant="ksubspace", k=4, assign="client")
    got = [kc.subspace(r, c, 3) for r in range(10) for c in range(10)]
    assert set(got) == {0, 1, 2, 3} and got == [kc.subspace(r, c, 3) for r in range(10) for c in range(10)]
    assert got != [kc.subspace(r, c, 4) for r in range(10) for c in range(10)]  # the job seed matters
    t = IGC(variant="timevarying", period=10)
    assert [t.subspace(r, 0, 0) for r in (0, 9, 10, 19, 20, 35)] == [0, 0, 1, 1, 2, 3]


@pytest.mark.parametrize("cfg", [{"variant": "static"}, {"variant": "ksubspace", "k": 3},
                                 {"variant": "timevarying", "period": 2}, {"transform": "gaussian"},
                                 {"normalize": "unbiased"}])
@pytest.mark.parametrize("dim,n", [(250, 4810), (5000, 4810), (9000, 4810), (64, 0)])
def test_upload_bytes_equal_the_formula(cfg, dim, n):
    """Payload = 4 * min(dim, D') for every variant; d_eff = D' when dim >= D' (8192 for D = 4810)."""
    c = IGC(dim=dim, **cfg)
    uc = UpdateCodec(c, {"scope": "model"}, [("a", (n,)), ("b", (0,))] if n else [("a", (0,))], seed=3)
    want = 0 if n == 0 else 4 * min(dim, padded_size(n))
    if cfg.get("transform") == "gaussian" and want > 4 * 1000:
        return  # the dense Gaussian costs D x d normals per call; small d only
    for r in range(3):
        res = uc.encode({"a": randn(n, r), "b": torch.zeros(0)} if n else {"a": torch.zeros(0)},
                        client=r, round=r, state=CodecState())
        assert res.payload_bytes == want
        assert res.raw_bytes == 4 * n


def test_downlink_bytes_per_variant():
    D = 4810
    d = 500
    assert IGC(dim=d).downlink_bytes(D, 7, -1) == 4 * d
    assert IGC(dim=d, variant="ksubspace", k=4).downlink_bytes(D, 7, 3) == 16 * d
    assert IGC(dim=20000).downlink_bytes(D, 0, -1) == 4 * 8192  # d capped at D'
    t = IGC(dim=d, variant="timevarying", period=10)
    assert t.downlink_bytes(D, 5, -1) == 4 * d          # period 0: Σ_0 on top of θ₀
    assert t.downlink_bytes(D, 12, -1) == 8 * d         # period 1: θ₀ is the base of period 0
    assert t.downlink_bytes(D, 25, -1) == 4 * D         # stale: never took part, two periods on
    assert t.downlink_bytes(D, 25, 19) == 8 * d         # took part in period 1: holds θ_1⁰
    assert t.downlink_bytes(D, 25, 21) == 8 * d         # took part in period 2 (the current one)
    assert t.downlink_bytes(D, 35, 19) == 4 * D         # last seen in period 1, now period 3
    uc = UpdateCodec(t, {"scope": "model"}, [("w", (70, 70)), ("b", (10,))])
    assert uc.downlink_bytes(25, -1) == 4 * 4910 and uc.downlink_bytes(12, -1) == 8 * d


def test_requires_model_scope():
    with pytest.raises(ConfigError, match="routing.scope"):
        UpdateCodec({"id": "igc"}, {}, [("w", (10, 10))])
    with pytest.raises(ConfigError, match="routing.scope"):  # through error feedback too
        UpdateCodec({"id": "ef", "inner": {"id": "igc"}}, {"scope": "tensor"}, [("w", (10, 10))])
    with pytest.raises(ConfigError, match="codec.variant"):
        get_codec({"id": "igc", "variant": "kvarying"})


@pytest.mark.parametrize("wrapped", [False, True])
def test_timevarying_refuses_server_momentum(wrapped):
    """The 2d download of time-varying IGC rebuilds the model only under plain server SGD, so a job
    with server momentum is refused before launch, naming the key; static and K-subspace keep it."""
    from hpcfl.config import job_from_dict
    from hpcfl.config.validate import validate_job

    igc = {"id": "igc", "dim": 64, "variant": "timevarying"}
    raw = {"data": {"dataset": "digits", "n_clients": 6}, "model": {"name": "logreg"},
           "routing": {"scope": "model"}, "server": {"momentum": 0.9},
           "codec": {"id": "ef", "inner": igc} if wrapped else igc}
    with pytest.raises(ConfigError, match=r"server\.momentum.*timevarying"):
        validate_job(job_from_dict(raw), check_memory=False)
    raw["server"]["momentum"] = 0.0
    validate_job(job_from_dict(raw), check_memory=False)
    raw["server"]["momentum"] = 0.9
    igc["variant"] = "ksubspace"
    validate_job(job_from_dict(raw), check_memory=False)


def test_both_sides_regenerate_the_same_subspace_without_sharing_objects():
    """A fresh codec (no cache) decodes the client's z to the client's recon bit for bit; a different
    subspace index gives a different reconstruction."""
    n = 5000
    g = randn(n, 1)
    a, b = IGC(dim=300, variant="timevarying", period=2), IGC(dim=300, variant="timevarying", period=2)
    enc = a.encode(g, ctx(n, round=3, client=4, seed=8))
    dec = b.decode(Encoded(dict(enc.parts)), ctx(n, round=3, client=9, seed=8, want_recon=False))
    assert torch.equal(enc.recon, dec)
    other = b.decode(Encoded(dict(enc.parts)), ctx(n, round=4, client=9, seed=8, want_recon=False))
    assert not torch.allclose(other, dec)
    assert enc.stats["subspace"] == 1.0 and 0.02 < enc.stats["zshare"] < 0.06  # ~ d / D' = 0.037
    with pytest.raises(PartError):
        b.decode(Encoded({"z": np.zeros(299, np.float32)}), ctx(n, round=3))
    with pytest.raises(PartError):
        b.decode(Encoded({"z": np.zeros(300, np.float64)}), ctx(n, round=3))


def test_zshare_stat_is_normalisation_free():
    """zshare = |A^T g|^2 / |g|^2 at the orthogonal scale: 1 for the full transform, ~d/D' else."""
    n = 4000
    g = randn(n, 3)
    assert abs(IGC(dim=4096).encode(g, ctx(n)).stats["zshare"] - 1) < 1e-5
    a, b = (IGC(dim=400, normalize=m).encode(g, ctx(n)) for m in ("orthogonal", "unbiased"))
    assert 0.06 < a.stats["zshare"] < 0.14  # E = d / D' ~ 0.098
    assert abs(a.stats["zshare"] - b.stats["zshare"]) < 1e-5 * a.stats["zshare"]
    want = a.parts["z"] * np.sqrt(4096 / 400)
    assert np.abs(b.parts["z"] - want).max() < 1e-5 * np.abs(want).max()


def test_cache_is_bounded_and_keyed_by_subspace():
    c = IGC(dim=50, variant="timevarying", period=1)
    for r in range(10):
        c.encode(randn(300, r), ctx(300, round=r))
    assert len(c._cache) == 6  # max(4, K + 2)
    kc = IGC(dim=50, variant="ksubspace", k=8)
    for r in range(16):
        kc.encode(randn(300, r), ctx(300, round=r))
    assert len(kc._cache) == 8  # every one of the K subspaces stays cached


VARIANT_CASES = [
    {"id": "igc", "dim": 40, "variant": "ksubspace", "k": 3, "assign": "client"},
    {"id": "igc", "dim": 40, "variant": "timevarying", "period": 1},
    {"id": "igc", "dim": 40, "transform": "gaussian", "normalize": "unbiased"},
    {"id": "ef", "inner": {"id": "igc", "dim": 40}},
]


@pytest.mark.parametrize("cfg", VARIANT_CASES, ids=lambda c: c.get("variant", c.get("transform", c["id"])))
def test_variants_pass_the_shared_contract(cfg):
    """The shared harness runs the default igc; the variants get the same contract checks here."""
    inp = INPUT["model_scope_all"]
    check_roundtrip(cfg, inp.update(1, 2), routing={"scope": "model"}, seed=4, client=1, round=2)
    check_many_to_one(cfg, inp, clients=4, rounds=3, skip={1: [3]})
    check_state_roundtrip(cfg, inp, rounds=3)


# ------------------------------------------------- server optimizer in d-space

def _rounds(T: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    return [randn(d, 100 + seed * 1000 + t) for t in range(T)]


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_static_server_sgd_in_theta_space_equals_d_space(mu):
    """Root: v <- mu v + A z̄, θ <- θ - η v (θ-space). Paper: Σ <- Σ - η v_Σ with v_Σ <- mu v_Σ + z̄.
    For one A, θ_T = θ₀ + A Σ_T to float rounding (the lift is linear; A need not be orthonormal)."""
    n, d, eta, T = 3000, 64, 0.3, 25
    igc = IGC(dim=d)
    p = igc.projection(0, "@model", 0, n)
    theta0 = randn(n, 77)
    theta, opt = theta0.clone(), ServerOptimizer(eta, mu)
    sig, v = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for zbar in _rounds(T, d):
        opt.step(theta, p.lift(zbar))
        v = mu * v + zbar.double()
        sig -= eta * v
    want = theta0.double() + p.lift(sig.float()).double()
    err = float((theta.double() - want).norm() / (theta - theta0).norm())
    assert err < 1e-5
    # and the model never left θ₀ + span(A)
    off = (theta - theta0).double().numpy()
    A = dense(p)
    coef = np.linalg.lstsq(A, off, rcond=None)[0]
    assert np.linalg.norm(A @ coef - off) < 1e-5 * np.linalg.norm(off)
    assert np.allclose(coef, sig.numpy(), rtol=0, atol=1e-4 * np.abs(sig.numpy()).max())


def test_ksubspace_momentum_is_per_subspace_with_a_global_clock():
    """K subspaces, round-robin: θ-space momentum equals K d-space momenta that all decay (and all
    move their Σ_j) every round, z̄ entering only the active one -- not 'lazy' per-subspace momenta
    that are touched only when their subspace is active (those give a different model)."""
    n, d, K, eta, mu, T = 2000, 32, 3, 0.2, 0.8, 12
    igc = IGC(dim=d, variant="ksubspace", k=K)
    P = [igc.projection(0, "@model", j, n) for j in range(K)]
    theta, opt = torch.zeros(n), ServerOptimizer(eta, mu)
    sig = torch.zeros(K, d, dtype=torch.float64)
    v = torch.zeros(K, d, dtype=torch.float64)
    lazy_sig, lazy_v = sig.clone(), v.clone()
    for t, zbar in enumerate(_rounds(T, d, 1)):
        j = igc.subspace(t, 0, 0)
        opt.step(theta, P[j].lift(zbar))
        v *= mu
        v[j] += zbar.double()
        sig -= eta * v
        lazy_v[j] = mu * lazy_v[j] + zbar.double()
        lazy_sig[j] -= eta * lazy_v[j]

    def model(s):
        return sum(P[j].lift(s[j].float()).double() for j in range(K))

    scale = float(theta.norm())
    assert float((theta.double() - model(sig)).norm()) / scale < 1e-5
    assert float((theta.double() - model(lazy_sig)).norm()) / scale > 1e-2


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_timevarying_bases(mu):
    """Time-varying: with plain SGD (mu = 0) θ-space equals the paper's recursion
    θ_{e+1}⁰ = θ_e⁰ + A_e Σ_e(final), Σ_{e+1} = 0. With momentum the θ-space velocity carries the
    old subspaces' directions into the next period (a d-space momentum reset at the boundary
    would not): the two differ."""
    n, d, period, eta, T = 2000, 32, 4, 0.2, 12
    igc = IGC(dim=d, variant="timevarying", period=period)
    theta, opt = torch.zeros(n), ServerOptimizer(eta, mu)
    base = torch.zeros(n, dtype=torch.float64)
    sig, v = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for t, zbar in enumerate(_rounds(T, d, 2)):
        e = igc.subspace(t, 0, 0)
        p = igc.projection(0, "@model", e, n)
        if t and t % period == 0:  # period boundary: fold Σ into the base, restart in the new subspace
            base += igc.projection(0, "@model", e - 1, n).lift(sig.float()).double()
            sig.zero_()
            v.zero_()
        opt.step(theta, p.lift(zbar))
        v = mu * v + zbar.double()
        sig -= eta * v
    paper = base + igc.projection(0, "@model", (T - 1) // period, n).lift(sig.float()).double()
    rel = float((theta.double() - paper).norm() / theta.norm())
    assert (rel < 1e-5) if mu == 0 else (rel > 1e-2)
