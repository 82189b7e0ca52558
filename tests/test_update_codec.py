"""hpcfl.codecs.update.UpdateCodec: sizes, round trips, routing, hashing, state, registry."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hpcfl.codecs import CodecState, UpdateCodec, codec_classes, expand, get_codec, recipes
from hpcfl.codecs.base import CodecParam
from hpcfl.codecs.routing import MODEL_SLOT, RoutingPolicy
from hpcfl.codecs.state import TensorState
from hpcfl.codecs.wire import FLAG_CRC, Message, header_size, pack, unpack
from hpcfl.config.load import canonical_json
from hpcfl.errors import ConfigError, UnknownCodecError, WireFormatError

PARAMS = [("conv.weight", (4, 3, 2, 2)), ("conv.bias", (4,)), ("fc.weight", (5, 16)), ("fc.bias", (5,)),
          ("scale", (1,))]
N = sum(int(np.prod(s)) for _, s in PARAMS)

FP16 = {"id": "fp16"}
CODECS = {
    "identity": {"id": "identity"},
    "fp16": FP16,
    "bf16": {"id": "bf16"},
    "zstd": {"id": "zstd"},
    "lz4": {"id": "lz4"},
    "ef_fp16": {"id": "ef", "inner": FP16},
    "fp16_zstd": {"id": "pipeline", "encoder": FP16, "bytes": [{"id": "zstd"}]},
}
LOSSLESS = {"identity", "zstd", "lz4"}


def make_update(seed: int = 0, sparse: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in PARAMS:
        x = torch.randn(s, generator=g) * 0.1
        if sparse:
            x = x * (torch.rand(s, generator=g) < 0.2)
        out[n] = x
    return out


def uc(codec=None, routing=None, params=PARAMS, **kw) -> UpdateCodec:
    return UpdateCodec(codec or {"id": "identity"}, routing or {}, params, **kw)


def pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def wire_header(data: bytes) -> int:
    """Header bytes by the documented formula, from the message's own tables."""
    m = unpack(data)
    toc = [(len(t.shape), len(t.parts)) for t in m.tensors]
    pad = sum(pad8(p.nbytes) - p.nbytes for t in m.tensors for p in t.parts)
    crc = bool(m.flags & FLAG_CRC)
    want = pad8(40 + sum(9 + 4 * nd + 11 * np_ for nd, np_ in toc)) + pad + (8 if crc else 0)
    assert header_size(toc, crc=crc) + pad == want
    return want


# -------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("checksum", [False, True])
def test_round_trip_and_sizes(name, checksum):
    c = uc(CODECS[name], checksum=checksum)
    x = make_update(1)
    res = c.encode(x, client=2, round=4, state=CodecState(), want_recon=True)
    assert res.raw_bytes == 4 * N
    assert len(res.data) == res.payload_bytes + res.header_bytes and len(res.data) % 8 == 0
    assert res.header_bytes == wire_header(res.data)
    if name == "identity":
        assert res.payload_bytes == 4 * N
    if name in ("fp16", "bf16", "ef_fp16"):
        assert res.payload_bytes == 2 * N
    dec = c.decode(res.data, client=2, round=4, state=CodecState())
    assert dec.payload_bytes == res.payload_bytes and dec.header_bytes == res.header_bytes
    assert set(dec.update) == {n for n, _ in PARAMS}
    for n, s in PARAMS:
        got, want = dec.update[n], x[n]
        assert got.shape == s and got.dtype == torch.float32
        assert torch.equal(got, res.recon[n]), n  # the client's recon is what the root decodes
        if name in LOSSLESS:
            assert torch.equal(got, want)
        elif name == "bf16":
            assert torch.all((got - want).abs() <= want.abs() * 2**-8)
        else:  # fp16 in every other variant
            assert torch.all((got - want).abs() <= torch.clamp(want.abs() * 2**-11, min=2**-25))
            assert torch.equal(got, want.half().float())


def test_fp16_pipeline_compresses_where_it_pays():
    c = uc(CODECS["fp16_zstd"])
    x = make_update(0, sparse=True)
    res = c.encode(x, client=0, round=0, state=CodecState())
    assert res.payload_bytes < 2 * N
    m = unpack(res.data)
    assert any(p.coding == 1 for t in m.tensors for p in t.parts)
    for t in m.tensors:  # coded parts keep the logical dtype (float16) on the wire
        assert all(p.dtype == 9 for p in t.parts)
    dec = c.decode(res.data, client=0, round=0, state=CodecState())
    for n, _ in PARAMS:
        assert torch.equal(dec.update[n], x[n].half().float())
    # incompressible data: zstd is not applied
    tiny = uc(CODECS["fp16_zstd"], params=[("w", (3,))])
    r = tiny.encode({"w": torch.tensor([0.1, -2.0, 3.5])}, client=0, round=0, state=CodecState())
    assert r.payload_bytes == 6 and unpack(r.data).tensors[0].parts[0].coding == 0


def test_fp16_saturates_instead_of_inf():
    c = uc(FP16, params=[("w", (4,))])
    x = {"w": torch.tensor([1e6, -1e6, 65504.0, 1.0])}
    dec = c.decode(c.encode(x, client=0, round=0, state=CodecState()).data, client=0, round=0,
                   state=CodecState())
    assert dec.update["w"].tolist() == [65504.0, -65504.0, 65504.0, 1.0]


def test_missing_tensor_in_update():
    with pytest.raises(KeyError):
        uc().encode({"conv.weight": torch.zeros(4, 3, 2, 2)}, client=0, round=0, state=CodecState())


# ------------------------------------------------------------------ routing

def test_routing_policy_rules():
    p = RoutingPolicy.from_config({"dense_patterns": ["*.bias"], "min_ndim": 2})
    routes = {s.name: s.route for s in p.plan(PARAMS)}
    assert routes == {"conv.weight": "lossy", "conv.bias": "dense", "fc.weight": "lossy", "fc.bias": "dense",
                      "scale": "dense"}
    p = RoutingPolicy.from_config({"lossy_patterns": ["fc.*"]})
    assert {s.name: s.route for s in p.plan(PARAMS)} == {
        "conv.weight": "dense", "conv.bias": "dense", "fc.weight": "lossy", "fc.bias": "lossy", "scale": "dense"}
    p = RoutingPolicy.from_config({"min_numel": 50})
    assert [s.route for s in p.plan(PARAMS)] == ["dense", "dense", "lossy", "dense", "dense"]
    p = RoutingPolicy.from_config({"min_numel": 48})
    assert [s.route for s in p.plan(PARAMS)] == ["lossy", "dense", "lossy", "dense", "dense"]
    # dense_patterns win over lossy_patterns; fnmatch is case-sensitive and matches the whole name
    p = RoutingPolicy.from_config({"dense_patterns": ["conv.?eight"], "lossy_patterns": ["conv*"]})
    assert [s.route for s in p.plan(PARAMS)] == ["dense", "lossy", "dense", "dense", "dense"]
    p = RoutingPolicy.from_config({"dense_patterns": ["CONV*", "bias"]})
    assert all(s.route == "lossy" for s in p.plan(PARAMS))
    # every slot is indexed in model order
    assert [(s.index, s.name) for s in p.plan(PARAMS)] == [(i, n) for i, (n, _) in enumerate(PARAMS)]
    with pytest.raises(ValueError):
        p.plan(PARAMS + [("scale", (2,))])
    assert RoutingPolicy.from_config(p.to_config()) == p


def test_routing_drives_codec_choice():
    c = uc(FP16, {"dense_patterns": ["*.bias"], "min_ndim": 2})
    res = c.encode(make_update(), client=0, round=0, state=CodecState())
    lossy = 48 + 80
    assert res.payload_bytes == 2 * lossy + 4 * (N - lossy)
    dec = c.decode(res.data, client=0, round=0, state=CodecState())
    x = make_update()
    assert torch.equal(dec.update["conv.bias"], x["conv.bias"])  # dense: identity
    assert torch.equal(dec.update["fc.weight"], x["fc.weight"].half().float())
    # a lossless dense codec
    c = uc(FP16, {"min_ndim": 2, "dense": {"id": "zstd"}})
    dec = c.decode(c.encode(x, client=0, round=0, state=CodecState()).data, client=0, round=0,
                   state=CodecState())
    assert torch.equal(dec.update["fc.bias"], x["fc.bias"])
    assert c.config["dense"]["id"] == "zstd"


def test_model_scope():
    c = uc(FP16, {"scope": "model", "dense_patterns": ["*.bias"]})
    slots = c.slots
    assert slots[0].name == MODEL_SLOT and slots[0].index == 0 and slots[0].route == "lossy"
    assert slots[0].shape == (48 + 80 + 1,)
    assert [(m.name, m.offset, m.numel) for m in slots[0].members] == [
        ("conv.weight", 0, 48), ("fc.weight", 48, 80), ("scale", 128, 1)]
    assert [(s.index, s.name, s.route) for s in slots[1:]] == [(1, "conv.bias", "dense"), (2, "fc.bias", "dense")]
    x = make_update(3)
    res = c.encode(x, client=1, round=2, state=CodecState(), want_recon=True)
    assert len(unpack(res.data).tensors) == 3
    assert res.header_bytes == wire_header(res.data)
    dec = c.decode(res.data, client=1, round=2, state=CodecState())
    for n, s in PARAMS:
        want = x[n] if n.endswith("bias") else x[n].half().float()
        assert dec.update[n].shape == s and torch.equal(dec.update[n], want), n
        assert torch.equal(res.recon[n], want)
    # lossless model scope round-trips exactly; the hash differs from tensor scope
    ci = uc({"id": "identity"}, {"scope": "model"})
    assert [s.name for s in ci.slots] == [MODEL_SLOT]
    dec = ci.decode(ci.encode(x, client=0, round=0, state=CodecState()).data, client=0, round=0,
                    state=CodecState())
    assert all(torch.equal(dec.update[n], x[n]) for n, _ in PARAMS)
    assert ci.hash != uc({"id": "identity"}).hash
    # everything dense: no @model slot
    cd = uc(FP16, {"scope": "model", "min_numel": 10**6})
    assert MODEL_SLOT not in [s.name for s in cd.slots] and len(cd.slots) == len(PARAMS)


def test_transform_or_stateful_codec_rejected_where_not_allowed():
    with pytest.raises(ConfigError) as ei:
        uc({"id": "flatten"})
    assert ei.value.key == "codec.id"
    with pytest.raises(ConfigError) as ei:
        uc(FP16, {"dense": {"id": "ef", "inner": FP16}})
    assert ei.value.key == "routing.dense.id"
    with pytest.raises(UnknownCodecError):
        uc({"id": "nope"})


# ------------------------------------------------------------------ hashing

def test_hash_changes_with_config():
    base = uc(FP16)
    assert uc(FP16).hash == base.hash and uc(FP16).config == base.config
    assert uc(get_codec(FP16)).hash == base.hash  # a Codec instance or its config: same hash
    others = [
        uc({"id": "identity"}),
        uc({"id": "bf16"}),
        uc(FP16, {"min_ndim": 2}),
        uc(FP16, {"scope": "model"}),
        uc(FP16, {"dense": {"id": "zstd"}}),
        uc(FP16, params=PARAMS[:-1]),
        uc(FP16, params=PARAMS[:-1] + [("scale", (2,))]),
        uc(FP16, params=[("Scale" if n == "scale" else n, s) for n, s in PARAMS]),
        uc(FP16, params=list(reversed(PARAMS))),
    ]
    hashes = {c.hash for c in others}
    assert base.hash not in hashes and len(hashes) == len(others)
    z3, z9 = uc({"id": "zstd", "level": 3}), uc({"id": "zstd", "level": 9})
    assert z3.hash != z9.hash and uc({"id": "zstd"}).hash == z3.hash  # defaults are filled in


def test_decode_with_other_config_fails_on_hash():
    x = make_update()
    data = uc(FP16).encode(x, client=0, round=0, state=CodecState()).data
    for other in (uc(FP16, {"min_ndim": 2}), uc({"id": "bf16"}), uc(FP16, params=PARAMS[:-1] + [("scale", (2,))])):
        with pytest.raises(WireFormatError) as ei:
            other.decode(data, client=0, round=0, state=CodecState())
        assert ei.value.field == "codec_hash"


def test_payload_revision_enters_the_hash(monkeypatch):
    """A codec whose part layout changed (payload_revision) gets a new hash, through wrappers too,
    so a message of the old layout fails the hash check; codecs without one keep their hashes."""
    from hpcfl.codecs.quantize import QSGD

    assert QSGD.payload_revision >= 1
    new = uc({"id": "ef", "inner": {"id": "qsgd"}})
    assert new.config["payload_revisions"] == {"qsgd": QSGD.payload_revision}
    assert "payload_revisions" not in uc(FP16).config
    data = new.encode(make_update(), client=0, round=0, state=CodecState()).data
    monkeypatch.setattr(QSGD, "payload_revision", QSGD.payload_revision - 1)
    old = uc({"id": "ef", "inner": {"id": "qsgd"}})
    assert old.hash != new.hash
    with pytest.raises(WireFormatError) as ei:
        old.decode(data, client=0, round=0, state=CodecState())
    assert ei.value.field == "codec_hash"


def test_wrong_client_or_round():
    c = uc()
    data = c.encode(make_update(), client=3, round=5, state=CodecState()).data
    with pytest.raises(WireFormatError) as ei:
        c.decode(data, client=4, round=5, state=CodecState())
    assert ei.value.field == "sender"
    with pytest.raises(WireFormatError) as ei:
        c.decode(data, client=3, round=6, state=CodecState())
    assert ei.value.field == "round"
    # None skips the check
    assert c.decode(data, client=None, round=None, state=CodecState()).payload_bytes == 4 * N


def _repack(c: UpdateCodec, data: bytes, edit) -> bytes:
    m = unpack(data)
    m = Message(m.codec_hash, m.round, m.sender, copy.deepcopy(m.tensors), m.flags)
    edit(m)
    return pack(m)


def test_part_key_beyond_part_names():
    c = uc()
    data = c.encode(make_update(), client=0, round=0, state=CodecState()).data

    def bump(m):
        m.tensors[1].parts[0].key = 1  # identity has one part, "values"

    with pytest.raises(WireFormatError) as ei:
        c.decode(_repack(c, data, bump), client=0, round=0, state=CodecState())
    assert "part key" in ei.value.field and "conv.bias" in ei.value.field


def test_structurally_valid_but_wrong_messages():
    c = uc(CODECS["fp16_zstd"])
    data = c.encode(make_update(0, sparse=True), client=0, round=0, state=CodecState()).data

    def drop_tensor(m):
        del m.tensors[-1]

    def drop_part(m):
        m.tensors[0].parts = []

    def wrong_dtype(m):
        p = m.tensors[0].parts[0]
        p.data = np.zeros(p.data.nbytes // 4, dtype=np.float32) if p.coding == 0 else p.data
        p.dtype = 11

    def garbage_zstd(m):
        for t in m.tensors:
            for p in t.parts:
                if p.coding:
                    p.data = np.full(p.data.size, 7, dtype=np.uint8)

    def wrong_coding(m):
        for t in m.tensors:
            for p in t.parts:
                if p.coding:
                    p.coding = 2

    for edit in (drop_tensor, drop_part, wrong_dtype, garbage_zstd, wrong_coding):
        with pytest.raises(WireFormatError):
            c.decode(_repack(c, data, edit), client=0, round=0, state=CodecState())


def test_decode_buffers_and_aliasing():
    """What the root may rely on: read-only input is copied, a writable buffer is viewed.

    With ``identity`` (float32 on the wire) a decode from a writable numpy buffer returns
    tensors that *alias* the buffer: changing the buffer afterwards changes the decoded
    update. The root therefore uses a fresh receive buffer every round. Codecs that convert
    (fp16 -> float32) always produce new memory.
    """
    c = uc()
    x = make_update(2)
    data = c.encode(x, client=0, round=0, state=CodecState()).data
    dec_bytes = c.decode(data, client=0, round=0, state=CodecState())
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    dec_np = c.decode(buf, client=0, round=0, state=CodecState())
    for n, _ in PARAMS:
        assert torch.equal(dec_bytes.update[n], x[n]) and torch.equal(dec_np.update[n], x[n])
        assert np.shares_memory(dec_np.update[n].numpy(), buf)  # zero copy
    buf[:] = 0
    assert torch.count_nonzero(dec_np.update["fc.weight"]) == 0  # aliased: now zeros
    assert torch.equal(dec_bytes.update["fc.weight"], x["fc.weight"])  # copied from read-only bytes
    # fp16 decodes into fresh memory even from a writable buffer
    c16 = uc(FP16)
    buf16 = np.frombuffer(c16.encode(x, client=0, round=0, state=CodecState()).data, dtype=np.uint8).copy()
    d16 = c16.decode(buf16, client=0, round=0, state=CodecState())
    before = d16.update["fc.weight"].clone()
    buf16[:] = 0
    assert torch.equal(d16.update["fc.weight"], before)


# -------------------------------------------------------------------- state

def _residuals(state: CodecState, name: str) -> torch.Tensor:
    enc = state.for_tensor(name).enc
    (vals,) = [d["residual"] for d in enc.values() if "residual" in d]
    return vals.clone()  # ef updates its residual buffer in place


def test_error_feedback_mass_conservation():
    c = uc(CODECS["ef_fp16"])
    cs, rs = CodecState(), CodecState()
    e_old = {n: torch.zeros(s) for n, s in PARAMS}
    for r in range(5):
        x = {n: v * 100 + 1e-3 for n, v in make_update(10 + r).items()}  # values where fp16 rounds visibly
        res = c.encode(x, client=1, round=r, state=cs, want_recon=True)
        dec = c.decode(res.data, client=1, round=r, state=rs)
        for n, _ in PARAMS:
            e_new = _residuals(cs, n)
            assert torch.equal(dec.update[n], res.recon[n])
            torch.testing.assert_close(x[n] + e_old[n], dec.update[n] + e_new, rtol=0, atol=1e-5)
            assert torch.equal(dec.update[n], (x[n] + e_old[n]).half().float())
            if r:
                assert e_new.abs().max() > 0
            e_old[n] = e_new.clone()
        assert cs.for_tensor("fc.weight").last_round == r == rs.for_tensor("fc.weight").last_round
    # the root keeps no encoder state for ef
    assert rs.nbytes("enc") == 0 and cs.nbytes("enc") == 4 * N


def test_state_serialisation_and_digest():
    c = uc(CODECS["ef_fp16"])
    a, b, d = CodecState(), CodecState(), CodecState()
    for r in range(3):
        c.encode(make_update(r), client=1, round=r, state=a)
        c.encode(make_update(r), client=1, round=r, state=b)
        c.encode(make_update(r + 100), client=1, round=r, state=d)
    assert a.digest("enc") == b.digest("enc") != d.digest("enc")
    assert a.digest("shared") == CodecState().digest("shared")  # ef shares nothing
    arrays = a.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    restored = CodecState.from_arrays(arrays)
    assert restored.digest("enc") == a.digest("enc")
    assert set(restored) == set(a) and len(restored) == len(PARAMS)
    for n, _ in PARAMS:
        assert restored.for_tensor(n).last_round == 2
        assert torch.equal(_residuals(restored, n), _residuals(a, n))
    again = restored.to_arrays()
    assert set(again) == set(arrays) and all(np.array_equal(again[k], arrays[k]) for k in arrays)
    # the restored state continues exactly like the original
    x = make_update(7)
    assert c.encode(x, client=1, round=3, state=restored).data == c.encode(x, client=1, round=3, state=a).data
    assert restored.digest("enc") == a.digest("enc")
    # only one side
    assert all("\x1fshared\x1f" not in k for k in a.to_arrays("enc"))


def test_state_scalars_and_digest_keys():
    s = CodecState()
    ts = s.for_tensor("w")
    ts.shared["p"] = {"step": 3, "lr": 0.5, "flag": True, "norm": torch.tensor(2.5), "q": np.arange(3.0),
                      "last_round": torch.ones(2)}
    ts.last_round = 4
    r = CodecState.from_arrays(s.to_arrays())
    assert r.digest() == s.digest()
    got = r.for_tensor("w").shared["p"]
    assert got["step"] == 3 and type(got["step"]) is int
    assert got["lr"] == 0.5 and got["flag"] is True
    assert float(got["norm"]) == 2.5 and torch.equal(torch.as_tensor(got["q"]), torch.arange(3.0, dtype=torch.float64))
    assert r.for_tensor("w").last_round == 4
    # a state entry that happens to be called "last_round" is still part of the digest
    s2 = CodecState.from_arrays(s.to_arrays())
    s2.for_tensor("w").shared["p"]["last_round"] = torch.zeros(2)
    assert s2.digest() != s.digest()
    # the round bookkeeping itself is not
    s2 = CodecState.from_arrays(s.to_arrays())
    s2.for_tensor("w").last_round = 9
    assert s2.digest() == s.digest()


def test_tensor_state_defaults():
    ts = TensorState()
    assert ts.enc == {} and ts.shared == {} and ts.last_round == -1


# ----------------------------------------------------------------- registry

def test_expand_recipe():
    full = {"id": "pipeline", "encoder": {"id": "fp16"}, "bytes": [{"id": "zstd", "level": 3}]}
    assert expand({"id": "fp16_zstd"}) == full
    assert expand({"id": "fp16_zstd", "level": 9})["bytes"][0]["level"] == 9
    # nested recipes expand too
    assert expand({"id": "ef", "inner": {"id": "fp16_zstd"}}) == {"id": "ef", "inner": full}
    with pytest.raises(ConfigError) as ei:
        expand({"id": "fp16_zstd", "lvl": 1})
    assert ei.value.key == "codec.lvl"
    assert "fp16_zstd" in recipes()
    # the built codec's config is fully defaulted, and that is what the update codec records
    c = get_codec("fp16_zstd")
    assert c.get_config() == {"id": "pipeline", "transforms": [], "encoder": {"id": "fp16"},
                              "bytes": [{"id": "zstd", "parts": [], "level": 3}]}
    assert uc({"id": "fp16_zstd"}).config["codec"] == c.get_config()
    assert uc({"id": "fp16_zstd"}).hash == uc(CODECS["fp16_zstd"]).hash


def _sample_config(cid: str, cls) -> dict:
    cfg: dict = {"id": cid}
    if cid == "pipeline":
        return {"id": "pipeline", "transforms": [{"id": "flatten"}], "encoder": FP16,
                "bytes": [{"id": "zstd", "level": 5}, {"id": "lz4"}]}
    for name, p in cls.params.items():
        if isinstance(p, CodecParam) and p.required:
            cfg[name] = [FP16] if p.many else FP16
    return cfg


def test_every_codec_config_round_trips():
    classes = codec_classes()
    assert {"identity", "fp16", "bf16", "zstd", "lz4", "ef", "pipeline", "flatten", "matrix"} <= set(classes)
    for cid, cls in sorted(classes.items()):
        c = get_codec(_sample_config(cid, cls))
        assert type(c) is cls and c.codec_id == cid
        cfg = c.get_config()
        assert cfg["id"] == cid and set(cfg) == {"id"} | set(cls.params), cid
        canonical_json(cfg)  # JSON-able
        c2 = get_codec(copy.deepcopy(cfg))
        assert c2 == c and c2.get_config() == cfg, cid
        assert hash(c2) == hash(c)
        d = c.describe()
        assert d["id"] == cid and set(d["params"]) == set(cls.params)
        # unknown parameters are refused, naming the key
        with pytest.raises(ConfigError) as ei:
            get_codec({**cfg, "no_such_param": 1})
        assert ei.value.key == "codec.no_such_param", cid


def test_get_codec_errors():
    with pytest.raises(ConfigError) as ei:
        get_codec({"ratio": 0.1})
    assert ei.value.key == "codec.id"
    with pytest.raises(ConfigError) as ei:
        get_codec({"id": "pipeline", "encoder": {"id": "zstd"}})
    assert ei.value.key == "codec.encoder"
    with pytest.raises(ConfigError) as ei:
        get_codec({"id": "pipeline", "encoder": FP16, "transforms": [FP16]})
    assert ei.value.key == "codec.transforms[0]"
    with pytest.raises(ConfigError) as ei:
        get_codec({"id": "pipeline", "encoder": FP16, "bytes": [{"id": "zstd", "parts": ["indices"]}]})
    assert ei.value.key == "codec.bytes[0].parts"
    with pytest.raises(ConfigError) as ei:
        get_codec({"id": "ef", "inner": FP16, "gamma": 0})
    assert ei.value.key == "codec.gamma"


# ------------------------------------------------------- per-slot ratios

EB_PARAMS = [("conv.weight", (8, 4, 3, 3)), ("conv.bias", (8,)), ("fc.weight", (5, 64)), ("fc.bias", (5,)),
             ("scale", (1,)), ("const.weight", (10, 10))]
EB_ROUTING = {"lossy_patterns": ["*weight*"], "min_numel": 100, "dense": {"id": "zstd", "level": 10}}


@pytest.mark.parametrize("codec", [{"id": "falcom", "eps": 1e-3}, {"id": "sz3", "eps": 1e-3},
                                   {"id": "zfp", "eps": 1e-3}])
def test_every_slot_logs_its_ratio_for_error_bounded_codecs(codec):
    """Dense-route (zstd) slots and raw fallbacks log ``ratio`` like the lossy ones: 4n / the slot's
    parts, so the slots' payloads (4n / ratio) add up to the message's payload bytes, and raw over that
    is the message's payload ratio (the per-round ratio of /rounds adds the header)."""
    c = uc(codec, EB_ROUTING, params=EB_PARAMS)
    routes = {s.name: s.route for s in c.slots}
    assert routes == {"conv.weight": "lossy", "conv.bias": "dense", "fc.weight": "lossy", "fc.bias": "dense",
                      "scale": "dense", "const.weight": "lossy"}
    st = CodecState()
    g = torch.Generator().manual_seed(3)
    for r in range(3):  # FalCom: direct in round 0, predictive for the conv slot afterwards
        x = {n: torch.randn(s, generator=g) * 0.01 for n, s in EB_PARAMS}
        x["const.weight"] = torch.full((10, 10), 0.5)  # constant: the raw fallback of the lossy codec
        res = c.encode(x, client=1, round=r, state=st)
        ratio = {i: v for i, k, v in res.stats if k == "ratio"}
        assert sorted(ratio) == [s.index for s in c.slots]
        assert sum(1 for _, k, _ in res.stats if k == "ratio") == len(c.slots)  # exactly one per slot
        msg = unpack(res.data)
        for t in msg.tensors:
            slot = c.slots[t.index]
            assert ratio[t.index] == 4.0 * slot.numel / sum(p.nbytes for p in t.parts), slot.name
        assert ratio[c.slots[-1].index] == 1.0  # raw float32
        payload = sum(4.0 * s.numel / ratio[s.index] for s in c.slots)
        assert payload == pytest.approx(res.payload_bytes, rel=1e-12)
        assert res.raw_bytes / payload == pytest.approx(res.raw_bytes / res.payload_bytes, rel=1e-12)
        assert res.raw_bytes == 4 * sum(s.numel for s in c.slots)


def test_codecs_without_a_per_tensor_ratio_log_none():
    """The dense-route ratio rides only with codecs that log one per tensor (others keep their stat sets)."""
    for codec in (CODECS["identity"], FP16, {"id": "topk", "ratio": 0.1}):
        res = uc(codec, EB_ROUTING, params=EB_PARAMS).encode(
            {n: torch.randn(s) for n, s in EB_PARAMS}, client=0, round=0, state=CodecState())
        assert not [k for _, k, _ in res.stats if k == "ratio"], codec
