"""The contract every registered codec and recipe honours, through real wire bytes.

Cases come from :func:`common.codec_cases`, which enumerates the registry:
a codec registered later is covered here without editing this file, and one
that ``codec_cases`` cannot run is a failing test. Family-specific behaviour
(selection exactness, error bounds, payload formulas) lives in the per-family
test files.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil

import pytest
import torch

import hpcfl.codecs
from common import (INPUT, INPUTS, Case, CaseError, check_config, check_corruption, check_error_feedback,
                    check_many_to_one, check_repr, check_roundtrip, check_state_roundtrip, codec_cases, codec_ids_in,
                    update_codec)
from hpcfl.codecs import CodecState, codec_classes, get_codec
from hpcfl.codecs.base import Codec
from hpcfl.errors import WireFormatError

CASES = codec_cases(strict=False)  # an uncoverable codec becomes a failing case; see test_cases_cover_registry
CASE_PARAMS = [pytest.param(c, id=c.name) for c in CASES]
INPUT_PARAMS = [pytest.param(i, id=i.name) for i in INPUTS]
MODEL_INPUTS = [pytest.param(INPUT[n], id=n) for n in ("model", "model_scope")]


def _is_plain_lossy(case: Case) -> bool:
    """A lossy codec with no wrapper anywhere in it (what ef may wrap)."""
    if case.error:
        return False
    c = case.build()
    classes = codec_classes()
    return (c.kind in ("encoder", "pipeline") and not c.lossless
            and all(classes[i].kind != "wrapper" for i in codec_ids_in(case.expanded)))


EF_PARAMS = [pytest.param(c, id=c.name) for c in CASES if _is_plain_lossy(c)]


@functools.lru_cache(maxsize=None)
def _codec_for(case_name: str, input_name: str):
    case = next(c for c in CASES if c.name == case_name)
    return update_codec(case.config, INPUT[input_name])


def _sub_codecs(c: Codec):
    """``c`` and every codec nested in it (wrapper inners, pipeline stages)."""
    yield c
    for v in vars(c).values():
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, Codec):
                yield from _sub_codecs(x)


def _walk_subclasses(cls: type):
    for sub in cls.__subclasses__():
        yield sub
        yield from _walk_subclasses(sub)


# ------------------------------------------------------------ the registry

def test_cases_cover_registry():
    """Every registered id and recipe has a runnable case (strict: raises otherwise)."""
    cases = codec_cases(strict=True)
    covered = set().union(*(codec_ids_in(c.expanded) for c in cases))
    assert covered == set(codec_classes())
    assert {c.config["id"] for c in cases if c.name.startswith("recipe-")} == set(hpcfl.codecs.recipes())
    assert len(cases) == len({c.name for c in cases})


def test_every_codec_subclass_is_registered():
    """Every concrete Codec subclass in hpcfl.codecs.* is registered under its own id.
    Abstract bases (ByteCodec, Transform, SparseCodec, LowRankCodec, ...) have no codec_id."""
    for m in pkgutil.iter_modules(hpcfl.codecs.__path__):
        importlib.import_module(f"hpcfl.codecs.{m.name}")
    registered = codec_classes()
    seen, problems = 0, []
    for cls in set(_walk_subclasses(Codec)):
        if not cls.__module__.startswith("hpcfl.codecs."):
            continue  # test doubles and out-of-tree codecs
        seen += 1
        own = cls.__dict__.get("codec_id", "")
        if not own:
            if cls.codec_id:
                problems.append(f"{cls.__module__}.{cls.__name__} inherits codec_id {cls.codec_id!r} "
                                "instead of declaring its own")
            continue
        if registered.get(own) is not cls:
            problems.append(f"{cls.__module__}.{cls.__name__} (codec_id {own!r}) is not registered"
                            + (f"; the id belongs to {registered[own].__name__}" if own in registered else ""))
    assert seen >= len(registered)
    assert not problems, "\n".join(problems)
    for cid, cls in registered.items():
        assert issubclass(cls, Codec) and cls.codec_id == cid and cls.kind in ("encoder", "transform", "bytes",
                                                                               "wrapper", "pipeline")


@pytest.mark.parametrize("cid", sorted(codec_classes()))
def test_describe_every_registered_class(cid):
    cls = codec_classes()[cid]
    case = next(c for c in CASES if not c.error and cid in codec_ids_in(c.expanded))
    found = next(c for c in _sub_codecs(case.build()) if type(c) is cls)
    assert found is not None
    d = found.describe()
    json.dumps(d)
    assert d["id"] == cid and d["kind"] == cls.kind and set(d["params"]) == set(cls.params)
    assert isinstance(d["summary"], str) and d["summary"], f"{cid}: no summary"
    assert cls.__doc__ or d["summary"]


# ------------------------------------------------------------- every case

@pytest.mark.parametrize("inp", INPUT_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_roundtrip_one_to_many(case, inp):
    """Bytes round trip; the root (fresh codec from the logged config) decodes the client's recon."""
    codec = case.build()
    update = inp.update(client=2, round=1)
    check_roundtrip(codec, update, routing=inp.routing, seed=9, client=2, round=1)
    # the same codec built from the config gives the same bytes
    a = update_codec(case.config, inp, seed=9).encode(update, client=2, round=1, state=CodecState())
    b = update_codec(codec.get_config(), inp, seed=9).encode(update, client=2, round=1, state=CodecState())
    assert a.data == b.data


@pytest.mark.parametrize("inp", MODEL_INPUTS + [pytest.param(INPUT["mat64x33"], id="mat64x33")])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_many_to_one(case, inp):
    """4 clients, own states, 3 rounds (client 3 skips round 1); one root, a decoder state per client."""
    check_many_to_one(case.build().get_config(), inp, clients=4, rounds=3, skip={1: [3]})


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_config_repr_describe(case):
    codec = case.build()
    check_config(codec)
    check_repr(codec)
    d = codec.describe()
    json.dumps(d)
    assert d["id"] == codec.codec_id and d["lossless"] == codec.lossless
    assert isinstance(codec.part_names, tuple) and len(set(codec.part_names)) == len(codec.part_names)
    assert 0 < len(codec.part_names) <= 255


@pytest.mark.parametrize("inp", MODEL_INPUTS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_roundtrip(case, inp):
    check_state_roundtrip(case.build().get_config(), inp, rounds=3)


@pytest.mark.parametrize("inp", MODEL_INPUTS + [pytest.param(INPUT["conv8x3x5x5"], id="conv8x3x5x5")])
@pytest.mark.parametrize("case", EF_PARAMS)
def test_error_feedback_conserves_mass(case, inp):
    """ef around every lossy non-wrapper codec: x + e_old == recon + e_new over 3 rounds."""
    check_error_feedback(case.build().get_config(), inp, rounds=3)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_wrong_codec_decode(case):
    """Another job's codec refuses the message (hash); without the hash check, every other
    case's codec either raises WireFormatError or decodes to the right shapes."""
    case.build()
    inp = INPUT["model"]
    mine = _codec_for(case.name, inp.name)
    data = mine.encode(inp.update(0, 0), client=0, round=0, state=CodecState()).data
    others = [c for c in CASES if not c.error and _codec_for(c.name, inp.name).hash != mine.hash]
    assert others
    with pytest.raises(WireFormatError, match="codec_hash"):
        _codec_for(others[0].name, inp.name).decode(data, client=0, round=0, state=CodecState())
    with pytest.raises(WireFormatError, match="round"):
        mine.decode(data, client=0, round=1, state=CodecState())
    with pytest.raises(WireFormatError, match="sender"):
        mine.decode(data, client=1, round=0, state=CodecState())
    for other in others:
        uc = _codec_for(other.name, inp.name)
        try:
            dec = uc.decode(data, client=0, round=0, state=CodecState(), verify_hash=False)
        except WireFormatError:
            continue
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{case.name} decoded as {other.name}: {type(e).__name__}: {e}") from e
        for name, shape in inp.params:
            assert tuple(dec.update[name].shape) == shape


@pytest.mark.parametrize("inp", [pytest.param(INPUT["model"], id="model"),
                                 pytest.param(INPUT["mat64x33"], id="mat64x33")])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_corruption_raises_only_wire_errors(case, inp):
    case.build()
    uc = _codec_for(case.name, inp.name)
    data = uc.encode(inp.update(0, 0), client=0, round=0, state=CodecState()).data
    counts = check_corruption(uc, data, f"{case.name}/{inp.name}")
    assert counts["rejected"] >= 5  # truncations and the extension at least


def test_inputs_are_deterministic_and_distinct():
    a, b = INPUT["model"].update(1, 2), INPUT["model"].update(1, 2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = INPUT["model"].update(2, 2)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_codec_built_from_case_is_shared_and_stateless():
    """Codecs hold no per-client state: encoding leaves the codec object's config unchanged."""
    for case in CASES:
        if case.error:
            continue
        codec = case.build()
        before = codec.get_config()
        inp = INPUT["mat64x33"]
        uc = update_codec(codec, inp)
        for r in range(2):
            uc.encode(inp.update(0, r), client=0, round=r, state=CodecState())
        assert codec.get_config() == before and codec == get_codec(before), case.name


@pytest.mark.parametrize("scale", [1e37, 1e20, 1e-25])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_extreme_magnitudes(case, scale):
    """Finite inputs far from 1 decode finite, and unbiased codecs do not flush them to zero
    (regressions: qsgd's l2 norm overflowed to inf above ~1.8e19 and underflowed to 0 below ~1e-19;
    onebit's class sums overflowed for entries near 1e37)."""
    codec = case.build()
    x = INPUT["vec1000"].update(0, 0)["w"] * scale
    dec = check_roundtrip(codec, x)["w"]
    if codec.unbiased:
        assert bool(dec.abs().max() > 0), "an unbiased codec decoded a non-zero input as all zeros"


# ------------------------------------------------- the helpers themselves

class _Predictor(Codec):
    """Test double with shared state: sends fp16(x - ref); both sides set ref <- recon."""

    codec_id = "test_predictor"
    decoder_state = True
    summary = "test double"
    drift = False  # the bug the lockstep check must catch: the client updates ref from x

    @property
    def part_names(self):
        return ("values",)

    def _ref(self, ctx):
        ref = ctx.shared.get("ref")
        return torch.zeros(ctx.shape) if ref is None else ref

    def encode(self, x, ctx):
        from hpcfl.codecs.base import Encoded

        r = (x.float() - self._ref(ctx)).to(torch.float16)
        recon = self._ref(ctx) + r.float()
        ctx.shared["ref"] = x.float().clone() if self.drift else recon
        return Encoded({"values": r.numpy().reshape(-1)}, recon=recon if ctx.want_recon else None)

    def decode(self, enc, ctx):
        v = torch.from_numpy(enc.parts["values"].copy()).float().reshape(ctx.shape)
        out = self._ref(ctx) + v
        ctx.shared["ref"] = out
        return out


class _Drifting(_Predictor):
    codec_id = "test_predictor_drift"
    drift = True


def test_many_to_one_detects_shared_state_drift(monkeypatch):
    from hpcfl.codecs import registry

    monkeypatch.setitem(registry._codecs, _Predictor.codec_id, _Predictor)
    monkeypatch.setitem(registry._codecs, _Drifting.codec_id, _Drifting)
    for inp in (INPUT["model"], INPUT["model_scope"]):
        check_many_to_one({"id": "test_predictor"}, inp)  # closed loop: lockstep
        check_state_roundtrip({"id": "test_predictor"}, inp)
        with pytest.raises(AssertionError, match="drift apart|differ"):
            check_many_to_one({"id": "test_predictor_drift"}, inp)


def test_codec_cases_fail_on_an_uncoverable_codec(monkeypatch):
    """A registered id codec_cases() cannot run is an error, never a silent skip."""
    from hpcfl.codecs import registry

    class Sidecar(_Predictor):
        codec_id = "test_sidecar"
        kind = "sidecar"  # a kind codec_cases() does not know

    monkeypatch.setitem(registry._codecs, Sidecar.codec_id, Sidecar)
    monkeypatch.setitem(registry._codecs, _Predictor.codec_id, _Predictor)
    with pytest.raises(CaseError, match="test_sidecar"):
        codec_cases(strict=True)
    cases = codec_cases(strict=False)
    bad = [c for c in cases if c.error]
    assert [c.name for c in bad] == ["test_sidecar-UNCOVERED"]
    with pytest.raises(pytest.fail.Exception, match="sidecar"):
        bad[0].build()
    # a new codec of a known kind is picked up with no edit to the tests
    assert any(c.name == "test_predictor" and c.config == {"id": "test_predictor"} for c in cases)
