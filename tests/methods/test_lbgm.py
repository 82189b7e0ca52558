"""LBGM: decision maths, lockstep, bytes, plug-and-play, gradient-space analysis. The shared codec
harness runs ``lbgm`` on independent random updates (nothing recycles); here updates are correlated
across rounds, as gradients are, so both paths (scalar-only and full) run for many rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcfl.codecs import CodecState, UpdateCodec, expand, get_codec
from hpcfl.codecs.methods._lbgm_math import lookback, recycle_decision
from hpcfl.codecs.wire import unpack
from hpcfl.errors import ConfigError, WireFormatError

MODEL = (("conv.weight", (6, 2, 3, 3)), ("conv.bias", (6,)), ("fc.weight", (10, 24)), ("fc.bias", (10,)))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(params=MODEL, rounds=30, client=0, seed=0) -> list[dict[str, torch.Tensor]]:
    """Gradient-like updates: a slowly turning direction plus noise; every 7th round is noisy."""
    g = gen(1000 * seed + client)
    base = {n: torch.randn(s, generator=g) for n, s in params}
    turn = {n: torch.randn(s, generator=g) for n, s in params}
    out = []
    for t in range(rounds):
        sigma = 1.0 if t % 7 == 3 else 0.05
        out.append({n: (base[n] + 0.02 * t * turn[n]) * (1.0 + 0.3 * math.sin(t))
                    + sigma * torch.randn(s, generator=g) for n, s in params})
    return out


def codec(cfg, routing=None, params=MODEL, seed=3) -> UpdateCodec:
    return UpdateCodec(cfg, dict(routing or {}), params, seed=seed)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy().view(np.uint32)


def recycled_flags(data) -> list[bool]:
    return [bool(rec.flags & 1) for rec in unpack(data).tensors]


def pad8(n: int) -> int:
    return -(-n // 8) * 8


# ------------------------------------------------------------------- the maths

def test_lookback_matches_definition():
    g = torch.randn(500, generator=gen(1))
    lbg = torch.randn(500, generator=gen(2))
    rho, alpha = lookback(g, lbg)
    a, b = g.double().numpy(), lbg.double().numpy()
    assert rho == pytest.approx(a @ b / (b @ b), rel=1e-12)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert alpha == pytest.approx(1 - cos ** 2, rel=1e-12)
    # parallel and anti-parallel: alpha 0, rho the scale; orthogonal: alpha 1
    assert lookback(-3.0 * lbg, lbg)[0] == pytest.approx(-3.0)
    assert lookback(-3.0 * lbg, lbg)[1] == pytest.approx(0.0, abs=1e-12)
    assert lookback(torch.eye(4)[0], torch.eye(4)[1]) == (0.0, 1.0)


def test_decision_edges():
    x = torch.randn(64, generator=gen(3))
    assert recycle_decision(x, None, 0.9)[0] is False             # no LBG yet: full
    assert recycle_decision(x, torch.zeros(64), 0.9)[0] is False  # zero LBG: full (the code would divide by 0)
    assert recycle_decision(2 * x, x, 0.0)[0] is False            # delta 0: never, even exactly parallel
    ok, rho, alpha = recycle_decision(2 * x, x, 1e-9)
    assert ok and rho == np.float32(2.0) and alpha <= 1e-9
    big = x * 1e37                                                 # float64 products: no overflow
    ok, rho, _ = recycle_decision(big, x * 1e-3, 0.5)
    assert not ok and not np.isfinite(rho)                         # rho = 1e40 overflows float32: full
    ok, rho, alpha = recycle_decision(big, big * 0.5, 0.5)
    assert ok and rho == np.float32(2.0)
    assert recycle_decision(x.masked_fill(torch.arange(64) == 0, float("nan")), x, 1.0)[0] is False


# ------------------------------------------------------------ codec behaviour

@pytest.mark.parametrize("inner", [{"id": "identity"}, {"id": "topk", "ratio": 0.2}, {"id": "sign"}])
def test_delta_zero_is_the_inner_codec(inner):
    """lbgm{delta = 0} decodes exactly what its inner codec decodes, with the same payload, every round."""
    a, b = codec({"id": "lbgm", "delta": 0.0, "inner": inner}), codec(inner)
    sa, sb, ra = CodecState(), CodecState(), CodecState()
    for t, x in enumerate(correlated(rounds=12)):
        ea = a.encode(x, client=0, round=t, state=sa, want_recon=True)
        eb = b.encode(x, client=0, round=t, state=sb, want_recon=True)
        assert ea.payload_bytes == eb.payload_bytes and not any(recycled_flags(ea.data))
        da = a.decode(ea.data, client=0, round=t, state=ra)
        for n in x:
            assert np.array_equal(bits(da.update[n]), bits(eb.recon[n])), (t, n)


CONFIGS = {
    "identity": ({"id": "lbgm", "delta": 0.3}, {}),
    "model-scope": ({"id": "lbgm", "delta": 0.3}, {"scope": "model"}),
    "lbgm_ef": ({"id": "lbgm_ef", "delta": 0.3}, {}),
    "lbgm_topk_ef": ({"id": "lbgm_topk_ef", "ratio": 0.2, "delta": 0.3}, {}),
    "lbgm_sign": ({"id": "lbgm_sign", "delta": 0.3}, {}),
    "lbgm_atomo": ({"id": "lbgm_atomo", "delta": 0.3}, {}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lockstep_many_rounds(name):
    """4 clients, 30 rounds, some skipped: every root decode equals the client's recon bit for bit,
    the shared look-back state agrees after every round, and both paths are taken."""
    cfg, routing = CONFIGS[name]
    cl, root = codec(cfg, routing), codec(expand(cfg), routing)
    C, R = 4, 30
    data = [correlated(rounds=R, client=k) for k in range(C)]
    cs, rs = [CodecState() for _ in range(C)], [CodecState() for _ in range(C)]
    seen = {True: 0, False: 0}
    for t in range(R):
        for k in range(C):
            if (t + k) % 5 == 4:  # sits this round out: its state must persist on both sides
                continue
            res = cl.encode(data[k][t], client=k, round=t, state=cs[k], want_recon=True)
            for f in recycled_flags(res.data):
                seen[f] += 1
            dec = root.decode(res.data, client=k, round=t, state=rs[k])
            for n in dec.update:
                assert np.array_equal(bits(dec.update[n]), bits(res.recon[n])), (name, t, k, n)
            assert cs[k].digest("shared") == rs[k].digest("shared"), (name, t, k)
    assert seen[True] > 0 and seen[False] > 0, seen


@pytest.mark.parametrize("inner", [{"id": "identity"}, {"id": "topk", "ratio": 0.25, "index": "int32"}])
def test_bytes_equal_the_formula(inner):
    """payload = sum over slots of (4 if recycled else the inner codec's payload); the message
    length follows docs/wire.md; stats report the same per slot."""
    uc = codec({"id": "lbgm", "delta": 0.3, "inner": inner})
    plain = codec(inner)
    st = CodecState()
    for t, x in enumerate(correlated(rounds=15)):
        res = uc.encode(x, client=0, round=t, state=st, want_recon=True)
        ref = unpack(plain.encode(x, client=0, round=t, state=CodecState()).data)
        msg = unpack(res.data)
        want_payload, header, padding = 0, 40, 0
        stats = {(s, k): v for s, k, v in res.stats}
        for rec, rrec in zip(msg.tensors, ref.tensors):
            slot = uc.slots[rec.index]
            if rec.flags & 1:
                sizes = [4]
            else:
                sizes = [p.nbytes for p in rrec.parts]
                assert rec.flags == rrec.flags << 1
            want_payload += sum(sizes)
            header += 9 + 4 * len(slot.shape) + 11 * len(sizes)
            padding += sum(pad8(s) - s for s in sizes)
            assert stats[(rec.index, "recycled")] == float(rec.flags & 1)
            assert stats[(rec.index, "floats")] == sum(sizes) / 4
            if not rec.flags & 1 and inner["id"] == "identity":
                assert stats[(rec.index, "floats")] == math.prod(slot.shape)  # the authors' +numel
        assert res.payload_bytes == want_payload
        assert len(res.data) == pad8(header) + padding + want_payload


def test_recycled_update_is_rho_times_lbg_and_threshold_orders_recycling():
    x = correlated(rounds=20)
    counts = []
    for delta in (0.05, 0.3, 0.9):
        uc = codec({"id": "lbgm", "delta": delta})
        st, lbg = CodecState(), {}
        n_rec = 0
        for t, u in enumerate(x):
            res = uc.encode(u, client=0, round=t, state=st, want_recon=True)
            for rec in unpack(res.data).tensors:
                name = uc.slots[rec.index].name
                if rec.flags & 1:
                    n_rec += 1
                    rho = np.frombuffer(rec.parts[0].data, np.float32)[0]
                    assert np.array_equal(bits(res.recon[name]), bits(lbg[name] * float(rho)))
                    want_rho, alpha = lookback(u[name], lbg[name])
                    assert alpha <= delta and rho == np.float32(want_rho)
                else:
                    lbg[name] = u[name].clone()  # identity: the full update becomes the LBG
                    assert torch.equal(res.recon[name], u[name])
        counts.append(n_rec)
    assert counts[0] < counts[1] < counts[2]


def authors_lbgm(seq, delta, residual):
    """The authors' ``lbgm_approximation`` loop (FedOptim, model_op.py), in float64 numpy."""
    lbgs, res, out = {}, {}, []
    for g in seq:
        upd = {}
        for n, v in g.items():
            x = v.double().numpy().reshape(-1) + (res.get(n, 0.0) if residual else 0.0)
            err, rho = 1.0, 0.0
            if n in lbgs:
                b = lbgs[n]
                rho = x @ b / (b @ b)
                err = 1 - (x @ b / (np.linalg.norm(x) * np.linalg.norm(b))) ** 2
            if err <= delta:
                upd[n] = rho * lbgs[n]
                res[n] = x - upd[n]
            else:
                upd[n] = x
                lbgs[n] = x.copy()
                res[n] = np.zeros_like(x)
        out.append(upd)
    return out


@pytest.mark.parametrize("residual", [False, True])
def test_matches_the_authors_loop(residual):
    """Per-tensor decisions and updates of lbgm (residual off) and lbgm_ef (the code's --residual 1)."""
    seq = correlated(rounds=25, seed=4)
    ref = authors_lbgm(seq, 0.3, residual)
    uc = codec({"id": "lbgm_ef" if residual else "lbgm", "delta": 0.3})
    st = CodecState()
    for t, x in enumerate(seq):
        res = uc.encode(x, client=0, round=t, state=st, want_recon=True)
        for n in x:
            np.testing.assert_allclose(res.recon[n].double().numpy().reshape(-1), ref[t][n], rtol=2e-5, atol=2e-6)


def test_whole_model_mode_is_one_slot():
    uc = codec({"id": "lbgm", "delta": 0.3}, {"scope": "model"})
    assert [s.name for s in uc.slots] == ["@model"]
    st, flags = CodecState(), []
    for t, x in enumerate(correlated(rounds=10)):
        res = uc.encode(x, client=0, round=t, state=st)
        flags += recycled_flags(res.data)
        if flags[-1]:
            assert res.payload_bytes == 4
    assert any(flags) and not all(flags)
    assert st.nbytes("shared") == 4 * sum(math.prod(s) for _, s in MODEL)


# --------------------------------------------------------------- wire safety

def _recycled_message(uc: UpdateCodec):
    st, rs = CodecState(), CodecState()
    for t, x in enumerate(correlated(rounds=10)):
        res = uc.encode(x, client=0, round=t, state=st)
        if all(recycled_flags(res.data)) and t > 0:
            return res.data, t, rs
        uc.decode(res.data, client=0, round=t, state=rs)
    raise AssertionError("no fully recycled round")


def test_decoder_rejects_what_it_cannot_rebuild():
    uc = codec({"id": "lbgm", "delta": 0.9}, {"scope": "model"})
    data, t, rs = _recycled_message(uc)
    with pytest.raises(WireFormatError, match="no look-back gradient"):
        uc.decode(data, client=0, round=t, state=CodecState())   # a root that missed the full message
    assert uc.decode(data, client=0, round=t, state=rs).update    # the right state decodes
    buf = bytearray(bytes(data))
    buf[-8:-4] = np.array([np.inf], np.float32).tobytes()         # rho is the last 4 payload bytes (+4 pad)
    with pytest.raises(WireFormatError, match="non-finite"):
        uc.decode(bytes(buf), client=0, round=t, state=rs)


def test_config_errors():
    with pytest.raises(ConfigError, match="rho"):
        get_codec({"id": "lbgm", "inner": {"id": "lbgm"}})
    with pytest.raises(ConfigError, match="delta"):
        get_codec({"id": "lbgm", "delta": 1.5})
    with pytest.raises(ConfigError, match="transform"):
        get_codec({"id": "lbgm", "inner": {"id": "flatten"}})
    assert expand({"id": "lbgm_topk_ef"}) == {
        "id": "ef", "inner": {"id": "lbgm", "delta": 0.2, "inner": {"id": "topk", "ratio": 0.1}}}
    c = get_codec({"id": "lbgm", "delta": 0.0})
    assert c.lossless and not get_codec({"id": "lbgm"}).lossless and c.decoder_state


# ------------------------------------------------------- gradient-space analysis

def test_explained_variance_of_known_spectra():
    from hpcfl.analysis.gradient_space import components_for, explained_variance

    rng = np.random.Generator(np.random.PCG64(0))
    basis = np.linalg.qr(rng.standard_normal((400, 3)))[0].T          # 3 orthonormal directions
    coef = rng.standard_normal((50, 3)) * np.array([10.0, 3.0, 1.0])  # energies 100 : 9 : 1
    m = coef @ basis
    r = explained_variance(m, "none")
    assert r.shape == (50,) and r.sum() == pytest.approx(1.0)
    assert r[3:].max() < 1e-20 and components_for(r, 0.99) <= 3
    assert r[0] == pytest.approx(np.linalg.svd(m, compute_uv=False)[0] ** 2 / (m ** 2).sum())
    # sklearn-style PCA of the coordinates x rounds matrix (the authors') == centring each vector
    a = m.T - m.T.mean(axis=0)
    s = np.linalg.svd(a, compute_uv=False) ** 2
    np.testing.assert_allclose(explained_variance(m, "vector")[:5], (s / s.sum())[:5], rtol=1e-10, atol=1e-15)
    # a constant offset shared by all rounds is one component uncentred, none around the mean
    shifted = m + 50 * basis[0]
    assert explained_variance(shifted, "none")[0] > 0.95
    np.testing.assert_allclose(explained_variance(shifted, "rounds"), explained_variance(m, "rounds"), atol=1e-12)
    assert components_for(np.array([0.5, 0.3, 0.2]), 0.8) == 2 and components_for(np.zeros(3), 0.9) == 0
    with pytest.raises(ValueError):
        explained_variance(m, "sideways")
