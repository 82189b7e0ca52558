"""altspace (Kim et al. ICML 2024): the map is lossless, both sides hold the same bases, bytes add up.

The shared harness runs altspace without ``glob``/``side`` (its plain top-k path); here the shared
reference and client moments are fed as the orchestrator feeds them, with the harness's checks."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "codecs"))
from common import assert_bitwise_equal, corruptions, make_update  # noqa: E402

from hpcfl.codecs import CodecState, UpdateCodec, get_codec  # noqa: E402
from hpcfl.codecs.base import Ctx  # noqa: E402
from hpcfl.codecs.methods._altspace_basis import (aggregate_mapped, basis_from_vectors, eff_rank,  # noqa: E402
                                                  moment_vectors, svd_vectors, truncated_svd_vectors,
                                                  uses_truncated_svd)
from hpcfl.codecs.methods.altspace import FLAG_BASES, FLAG_DENSE, FLAG_MAPPED  # noqa: E402
from hpcfl.codecs.sparsify import read_sparse  # noqa: E402
from hpcfl.codecs.update import GlobalView  # noqa: E402
from hpcfl.codecs.wire import unpack  # noqa: E402
from hpcfl.errors import WireFormatError  # noqa: E402
from hpcfl.seeding import derive_seed  # noqa: E402

PARAMS = (("conv.weight", (8, 3, 3, 3)), ("conv.bias", (8,)), ("fc.weight", (10, 72)), ("fc.bias", (10,)))
MATRICES = {"conv.weight": (8, 27), "fc.weight": (10, 72)}
DENSE_1D = {"min_ndim": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """As in runs (hpcfl sets one thread): bases are bit-reproducible and a busy host does not stall."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(*keys) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(1, *map(str, keys)) % (2**63))


@functools.lru_cache(maxsize=None)
def structured(m: int, n: int, rows: int = 40, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """A gradient-like ``G = D^T A`` with decaying activation/gradient spectra, and its moments
    (cached: callers must not modify them)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, n, generator=g) * torch.logspace(0, -3, n)[torch.randperm(n, generator=g)]
    d = torch.randn(rows, m, generator=g) * torch.logspace(0, -2, m)[torch.randperm(m, generator=g)]
    side = {"act_cov": (a.T @ a).double(), "grad_cov": (d.T @ d).double(), "count": torch.tensor([rows])}
    return d.T @ a, side


def glob_for(uc: UpdateCodec, r: int) -> dict | None:
    """A per-round global view both sides share (the previous step: a structured matrix)."""
    theta = torch.randn(sum(math.prod(s) for _, s in PARAMS), generator=_gen("theta", r))
    if r == 0:
        return uc.global_slots(GlobalView(theta, None))
    flat = torch.cat([structured(*MATRICES[n], seed=100 + r)[0].reshape(-1) if n in MATRICES
                      else torch.randn(math.prod(s), generator=_gen(n, r)) for n, s in PARAMS])
    return uc.global_slots(GlobalView(theta, flat))


def update(client: int, r: int) -> dict[str, torch.Tensor]:
    out = make_update(PARAMS, client=client, round=r)
    for n, (m, k) in MATRICES.items():  # close to last step's structure, plus client noise
        out[n] = (structured(m, k, seed=100 + r)[0] + 0.3 * structured(m, k, seed=7 * client + r)[0]) \
            .reshape(dict(PARAMS)[n])
    return out


def side_for(client: int, r: int) -> dict:
    return {n: structured(m, k, seed=7 * client + r)[1] for n, (m, k) in MATRICES.items()}


def codec(cfg: dict, routing: dict | None = None, seed: int = 3) -> tuple[UpdateCodec, UpdateCodec]:
    cl = UpdateCodec(cfg, dict(routing or {}), PARAMS, seed=seed)
    root = UpdateCodec(cl.config["codec"], cl.config["routing"], PARAMS, dense=cl.config["dense"], seed=seed)
    return cl, root


def run_lockstep(cfg: dict, *, clients: int = 3, rounds: int = 4, skip=None, routing=None, with_side=True):
    """Many clients -> one root with glob/side; returns per-(client, round) flags per slot."""
    skip = skip or {}
    cl, root = codec(cfg, routing)
    cs = [CodecState() for _ in range(clients)]
    rs = [CodecState() for _ in range(clients)]
    flags = {}
    for r in range(rounds):
        g_cl, g_root = glob_for(cl, r), glob_for(root, r)  # each side builds its own view
        for k in range(clients):
            if k in skip.get(r, ()):
                continue
            res = cl.encode(update(k, r), client=k, round=r, state=cs[k], want_recon=True,
                            side=side_for(k, r) if with_side else None, glob=g_cl)
            dec = root.decode(res.data, client=k, round=r, state=rs[k], glob=g_root)
            for name in res.recon:
                assert_bitwise_equal(res.recon[name], dec.update[name], f"client {k} round {r} {name}")
            assert cs[k].digest("shared") == rs[k].digest("shared"), f"client {k} round {r}: drift"
            flags[k, r] = dec.flags
    return flags, cs, rs


# ------------------------------------------------------------------ the map

@pytest.mark.parametrize("shape,rank", [((64, 33), 0), ((8, 75), 0), ((8, 75), 3), ((300, 200), 5)])
def test_bases_orthogonal_and_map_lossless(shape, rank):
    m, n = shape
    ref, side = structured(m, n, seed=1)
    r = eff_rank(rank, m, n)
    for vecs in (svd_vectors(ref, m, n, r), moment_vectors(side, m, n, r)):
        b = basis_from_vectors(*vecs)
        for s, data in ((b.u, vecs[0]), (b.v, vecs[1])):
            q = s.matrix()
            assert float((q.T @ q - torch.eye(s.dim, dtype=torch.float64)).abs().max()) < 1e-12
            # the leading columns are the data vectors (up to sign): a truncated basis + its complement
            assert float((q[:, :r].abs() - data.abs()).abs().max()) < 1e-10
        x = torch.randn(m, n, dtype=torch.float64, generator=_gen(shape, rank))
        y = b.forward(x)
        assert abs(float(y.norm()) - float(x.norm())) < 1e-12 * float(x.norm())
        assert float((b.inverse(y) - x).abs().max()) < 1e-12 * float(x.abs().max())


def _gapped(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    """An m x n matrix whose singular values drop 100x after the r-th (known top-r subspace)."""
    g = torch.Generator().manual_seed(seed)
    d = min(m, n)
    u = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q
    sv = torch.cat([torch.linspace(10, 5, r, dtype=torch.float64), torch.linspace(0.05, 0.001, d - r,
                                                                                  dtype=torch.float64)])
    return (u * sv) @ v.T


def _max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spans of orthonormal a and b."""
    return float(torch.arccos(torch.linalg.svdvals(a.T @ b).clamp(max=1.0)).max())


@pytest.mark.parametrize("shape,r", [((300, 200), 8), ((120, 400), 20)])
def test_truncated_svd_orthonormal_lossless_and_matches_full_subspace(shape, r):
    """Small rank: the randomized solver (not the full SVD) gives orthonormal vectors spanning the
    full SVD's top-r subspace (spectral gap), completed to a lossless map; same seed, same bits."""
    m, n = shape
    assert uses_truncated_svd(m, n, r) and not uses_truncated_svd(m, n, min(m, n))
    x = _gapped(m, n, r).float()
    u, v = svd_vectors(x, m, n, r, seed=5)
    assert u.shape == (m, r) and v.shape == (n, r)
    for t in (u, v):
        assert float((t.T @ t - torch.eye(r, dtype=torch.float64)).abs().max()) < 1e-12
    uf, _, vhf = torch.linalg.svd(x.double(), full_matrices=False)
    assert _max_angle(u, uf[:, :r]) < 1e-6 and _max_angle(v, vhf[:r].T) < 1e-6
    b = basis_from_vectors(u, v)
    for side in (b.u, b.v):
        q = side.matrix()
        assert float((q.T @ q - torch.eye(side.dim, dtype=torch.float64)).abs().max()) < 1e-12
    y = torch.randn(m, n, dtype=torch.float64, generator=_gen("trunc", shape))
    assert float((b.inverse(b.forward(y)) - y).abs().max()) < 1e-12 * float(y.abs().max())
    assert float((b.forward(b.inverse(y)) - y).abs().max()) < 1e-12 * float(y.abs().max())
    # deterministic: the same input and seed give the same bits (client and root both build it)
    u2, v2 = svd_vectors(x.clone(), m, n, r, seed=5)
    assert torch.equal(u, u2) and torch.equal(v, v2)
    assert basis_from_vectors(u2, v2).crc == b.crc
    assert not torch.equal(truncated_svd_vectors(x.double(), r, 6)[0], u)  # the seed is the start block


def test_max_full_rank_caps_rank_zero():
    assert eff_rank(0, 500, 200) == 200 and eff_rank(0, 500, 200, 256) == 200
    assert eff_rank(0, 1200, 1000, 256) == 256 and eff_rank(0, 1200, 1000, 0) == 1000
    assert eff_rank(300, 1200, 1000, 256) == 300  # an explicit rank wins over the cap
    assert get_codec({"id": "altspace"}).max_full_rank == 256


def test_truncated_shared_bases_identical_on_client_and_root_and_lossless():
    """A layer above max_full_rank takes the randomized truncated basis: client and root build the
    same bits (the 13-bit check passes, the lockstep CRC agrees, recon == decode bit for bit), and
    at ratio 1 the decode is the update to float tolerance (the complement keeps the map lossless)."""
    m, n = 120, 90
    params = (("fc.weight", (m, n)),)
    for ratio in (0.05, 1.0):
        cfg = {"id": "ef", "inner": {"id": "altspace", "ratio": ratio, "max_full_rank": 4}}
        cl = UpdateCodec(cfg, {}, params, seed=11)
        root = UpdateCodec(cl.config["codec"], cl.config["routing"], params, dense=cl.config["dense"], seed=11)
        assert uses_truncated_svd(m, n, eff_rank(0, m, n, 4))
        cs, rs = CodecState(), CodecState()
        for r in range(3):
            ref = _gapped(m, n, 4, seed=r).float()
            glob = [u.global_slots(GlobalView(torch.zeros(m * n), None if r == 0 else ref.reshape(-1)))
                    for u in (cl, root)]
            x = {"fc.weight": ref + 0.1 * torch.randn(m, n, generator=_gen("x", r))}
            res = cl.encode(x, client=0, round=r, state=cs, want_recon=True, glob=glob[0])
            dec = root.decode(res.data, client=0, round=r, state=rs, glob=glob[1])
            assert bool(dec.flags["fc.weight"] & FLAG_MAPPED) == (r > 0)
            assert_bitwise_equal(res.recon["fc.weight"], dec.update["fc.weight"], f"round {r}")
            assert cs.digest("shared") == rs.digest("shared")
            if ratio == 1.0:
                assert float((dec.update["fc.weight"] - x["fc.weight"]).abs().max()) \
                    <= 1e-6 * float(x["fc.weight"].abs().max())
        st = rs.tensors["fc.weight"].shared["inner"]
        assert st["crc"] == cs.tensors["fc.weight"].shared["inner"]["crc"]


def test_map_concentrates_structured_energy():
    """The mechanism: top-1% of G = D^T A in the moments' eigenbasis holds far more energy."""
    m, n = 50, 500
    g, side = structured(m, n, seed=3)
    b = basis_from_vectors(*moment_vectors(side, m, n, eff_rank(0, m, n)))
    k = math.ceil(0.01 * m * n)

    def share(x):
        e = x.reshape(-1).double().pow(2)
        return float(e.topk(k).values.sum() / e.sum())
    assert share(b.forward(g.double())) > share(g) + 0.2


# ---------------------------------------------------------- codec vs topk

@pytest.mark.parametrize("index", ["int32", "bitmap", "delta", "auto"])
@pytest.mark.parametrize("cfg", [{"basis": "identity"}, {"basis": "shared"}, {"basis": "client"}])
def test_identity_basis_equals_topk_part_for_part(cfg, index):
    """basis = identity (and shared/client with nothing to build from) sends topk's message: same
    parts, keys, flags and size (only the header's codec hash differs); with ef over rounds too."""
    for wrap in (False, True):
        inner_a = {"id": "altspace", "ratio": 0.05, "index": index, **cfg}
        inner_t = {"id": "topk", "ratio": 0.05, "index": index}
        a_cfg = {"id": "ef", "inner": inner_a} if wrap else inner_a
        t_cfg = {"id": "ef", "inner": inner_t} if wrap else inner_t
        ua, ut = UpdateCodec(a_cfg, DENSE_1D, PARAMS), UpdateCodec(t_cfg, DENSE_1D, PARAMS)
        sa, st = CodecState(), CodecState()
        for r in range(3 if wrap else 1):
            x = update(0, r)
            ma = unpack(ua.encode(x, client=0, round=r, state=sa).data)
            mt = unpack(ut.encode(x, client=0, round=r, state=st).data)
            assert ma.payload_bytes == mt.payload_bytes and ma.header_bytes == mt.header_bytes
            for ta, tt in zip(ma.tensors, mt.tensors):
                assert ta.flags == tt.flags == 0
                assert [(p.key, p.dtype, p.data.tobytes()) for p in ta.parts] == \
                       [(p.key, p.dtype, p.data.tobytes()) for p in tt.parts]


@pytest.mark.parametrize("basis", ["shared", "weights", "client"])
def test_ratio_one_is_uncompressed(basis):
    cl, root = codec({"id": "altspace", "basis": basis, "ratio": 1.0}, DENSE_1D)
    x = update(1, 2)
    res = cl.encode(x, client=1, round=2, state=CodecState(), side=side_for(1, 2), glob=glob_for(cl, 2))
    dec = root.decode(res.data, client=1, round=2, state=CodecState(), glob=glob_for(root, 2))
    for name, t in x.items():
        if name in MATRICES:
            assert dec.flags[name] & FLAG_MAPPED
        assert float((dec.update[name] - t).abs().max()) <= 1e-6 * float(t.abs().max())


# --------------------------------------------------------------- lockstep

@pytest.mark.parametrize("cfg", [
    {"basis": "shared"}, {"basis": "shared", "refresh": 2, "rank": 3}, {"basis": "weights", "verify": "off"},
    {"basis": "client", "rank": 2}, {"basis": "client", "refresh": 3},
    {"basis": "shared", "budget": "bytes", "verify": "crc32"},
])
def test_client_and_root_hold_the_same_bases(cfg):
    flags, cs, rs = run_lockstep({"id": "ef", "inner": {"id": "altspace", "ratio": 0.1, **cfg}},
                                 skip={2: [1]}, routing=DENSE_1D)
    for (k, r), f in flags.items():
        mapped = r > 0 or cfg["basis"] in ("client", "weights")  # shared: no step before round 1
        assert (f["conv.weight"] & FLAG_MAPPED) == (FLAG_MAPPED if mapped else 0), (k, r, f)
        if cfg["basis"] == "client":  # bases sent when none are stored, or `refresh` rounds old
            assert bool(f["fc.weight"] & FLAG_BASES) == (r == 0 or cfg.get("refresh", 1) == 1 or r == 3), (k, r)
    st = rs[0].tensors["fc.weight"].shared["inner"]
    assert ("u" in st) == (cfg["basis"] == "client") and ("crc" in st) == (cfg["basis"] != "client")


@pytest.mark.parametrize("verify", ["flags", "crc32"])
def test_root_detects_different_bases(verify):
    """A root whose reference differs (stands in for other LAPACK rounding) rejects the message."""
    cl, root = codec({"id": "altspace", "ratio": 0.1, "verify": verify}, DENSE_1D)
    res = cl.encode(update(0, 1), client=0, round=1, state=CodecState(), glob=glob_for(cl, 1))
    with pytest.raises(WireFormatError, match="differ from the root"):
        root.decode(res.data, client=0, round=1, state=CodecState(), glob=glob_for(root, 2))
    with pytest.raises(WireFormatError, match="no shared reference"):
        root.decode(res.data, client=0, round=1, state=CodecState(), glob=None)


@pytest.mark.parametrize("cfg", [{"basis": "shared"}, {"basis": "shared", "verify": "crc32"},
                                 {"basis": "client", "rank": 2}])
def test_corrupt_mapped_messages_raise_only_wire_errors(cfg):
    cl, root = codec({"id": "altspace", "ratio": 0.1, **cfg})
    res = cl.encode(update(0, 1), client=0, round=1, state=CodecState(), side=side_for(0, 1), glob=glob_for(cl, 1))
    rejected = 0
    for label, bad in corruptions(res.data, f"altspace-{sorted(cfg.items())}", flips=40):
        try:
            dec = root.decode(bad, client=0, round=1, state=CodecState(), glob=glob_for(root, 1))
        except WireFormatError:
            rejected += 1
            continue
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{label}: {type(e).__name__}: {e}") from e
        assert all(tuple(dec.update[n].shape) == s for n, s in PARAMS)
    assert rejected >= 10


# ------------------------------------------------------------------ bytes

def _values(res) -> list[int]:
    return [next(p for p in t.parts if p.key == 0).data.size for t in unpack(res.data).tensors]


@pytest.mark.parametrize("ratio,index", [(0.1, "int32"), (0.1, "auto"), (0.5, "bitmap"), (0.02, "delta")])
def test_payload_bytes_formula_and_byte_budget(ratio, index):
    """Payload = topk's (+4 B crc32 | +4r(m+n) B bases) per matrix; budget = "bytes" never makes a
    message larger than topk's, whole message included (records, padding)."""
    x, side = update(0, 1), side_for(0, 1)
    topk = UpdateCodec({"id": "topk", "ratio": ratio, "index": index}, DENSE_1D, PARAMS)
    want = topk.encode(x, client=0, round=1, state=CodecState())
    cases = (({"basis": "shared"}, 0), ({"basis": "shared", "verify": "crc32"}, 4 * 2),
             ({"basis": "client", "rank": 1}, 4 * (8 + 27 + 10 + 72)))
    for cfg, extra in cases:
        kw = {"id": "altspace", "ratio": ratio, "index": index, **cfg}
        uc = UpdateCodec(kw, DENSE_1D, PARAMS)
        g = glob_for(uc, 1)
        res = uc.encode(x, client=0, round=1, state=CodecState(), side=side, glob=g)
        assert all(f & FLAG_MAPPED for f in [t.flags for t in unpack(res.data).tensors][::2])
        assert res.payload_bytes == want.payload_bytes + extra, cfg  # budget = entries: k as topk's
        ub = UpdateCodec({**kw, "budget": "bytes"}, DENSE_1D, PARAMS)
        rb = ub.encode(x, client=0, round=1, state=CodecState(), side=side, glob=g)
        kb, kt = _values(rb), _values(want)
        if not extra:
            assert rb.data == ub.encode(x, client=0, round=1, state=CodecState(), glob=g).data
            assert kb == kt
        elif all(a > 1 for a in kb[::2]):  # the bases fit: the message is no larger than topk's
            assert len(rb.data) <= len(want.data) and kb[::2] < kt[::2], (cfg, kb, kt)
        else:  # bases alone above the budget: one entry, and the message says so by its size
            assert 1 in kb[::2] and len(rb.data) > len(want.data)
    vec = UpdateCodec({"id": "altspace", "ratio": ratio}, {}, PARAMS).encode(x, client=0, round=0, state=CodecState())
    assert [t.flags for t in unpack(vec.data).tensors] == [0, FLAG_DENSE, 0, FLAG_DENSE]


def test_stats_logged_per_matrix_slot():
    cl, _ = codec({"id": "altspace", "ratio": 0.02}, DENSE_1D)
    res = cl.encode(update(0, 1), client=0, round=1, state=CodecState(), glob=glob_for(cl, 1))
    stats = {(s, n): v for s, n, v in res.stats}
    names = {"energy_topk_orig", "energy_topk_mapped", "basis_s", "map_s", "basis_bytes"}
    assert {n for _, n in stats} == names and {s for s, _ in stats} == {0, 2}
    for s in (0, 2):
        assert 0 < stats[s, "energy_topk_orig"] < stats[s, "energy_topk_mapped"] <= 1.0
        assert stats[s, "basis_s"] > 0 and stats[s, "basis_bytes"] == 0  # the check rides in the flags


# ----------------------------------------------------- mapped aggregation

def test_aggregate_in_mapped_space_equals_sum_of_decodes():
    """One inversion per layer (decode_sum / aggregate_mapped) == sum of per-client decodes
    (the time it saves is measured in docs/methods/altspace.md)."""
    m, n = 50, 500
    cfg = {"id": "altspace", "ratio": 0.05}
    ac = get_codec(cfg)
    clients = 12
    ref = structured(m, n, seed=9)[0]
    glob = {"delta": ref, "theta": ref}
    encs, ctxs_c, ws = [], [], []
    for k in range(clients):
        x = structured(m, n, seed=200 + k)[0] + ref
        ctx = Ctx("w", (m, n), round=1, client=k, glob=glob)
        encs.append(ac.encode(x, ctx))
        ws.append(1.0 / (k + 2))
    root = get_codec(cfg)
    per = sum(w * root.decode(e, Ctx("w", (m, n), round=1, client=k, glob=glob)) for k, (e, w) in
              enumerate(zip(encs, ws)))
    fast = root.decode_sum(encs, ws, [Ctx("w", (m, n), round=1, client=k, glob=glob) for k in range(clients)])
    assert float((fast - per).abs().max()) <= 1e-5 * float(per.abs().max())
    basis = root._shared_basis(Ctx("w", (m, n), round=1, glob=glob), m, n)[0]
    items = [read_sparse(e, m * n) for e in encs]
    again = aggregate_mapped(items, ws, basis, (m, n))
    assert float((again - fast).abs().max()) <= 1e-6 * float(per.abs().max())
