"""SZ3 and ZFP codecs: the error bound on real updates, exceptions, fallbacks, untrusted streams.

The shared contract (round trip, lockstep, corruption -> WireFormatError) is in
test_all_codecs.py; this file checks what is specific to error-bounded codecs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch

from common import check_roundtrip
from hpcfl.codecs import CodecState, UpdateCodec, get_codec
from hpcfl.codecs.base import Ctx, Encoded, PartError
from hpcfl.codecs.eblc import BACKENDS, FLAG_RAW, ErrorBoundViolation, abs_bound
from hpcfl.errors import WireFormatError

# FalCom's routing (methods.md §3.3): lossy only for 'weight' tensors above 1024 elements, zstd for the rest
ROUTING = {"lossy_patterns": ["*weight*"], "min_numel": 1025, "dense": {"id": "zstd", "level": 10}}


@pytest.fixture(scope="module")
def real_updates() -> tuple[list, list[dict[str, torch.Tensor]]]:
    """FedAvg model deltas of 3 clients over 2 rounds: cnn2 (5x5 convs, 2-D fc layers) on digits."""
    from hpcfl.config.load import job_from_dict
    from hpcfl.fl.client import LocalTrainer
    from hpcfl.run.setup import build_setup

    job = job_from_dict({"data": {"dataset": "digits", "n_clients": 3, "partition": "iid"},
                         "model": {"name": "cnn2", "cnn_padding": "same"},
                         "train": {"local_steps": 5, "batch_size": 16, "lr": 0.05}})
    s = build_setup(job)
    tr = LocalTrainer(s.model, job.train.to_dict(), torch.from_numpy(s.data.x_train),
                      torch.from_numpy(s.data.y_train), 0)
    flat = torch.cat([p.detach().reshape(-1) for p in s.model.parameters()])
    ups = []
    for r in range(2):
        res = [tr.train(flat, s.client_idx[c], c, r) for c in range(3)]
        ups += [x.update for x in res]
        flat = flat - sum(torch.cat([x.update[n].reshape(-1) for n, _ in s.params]) for x in res) / 3
    return s.params, ups


def _bound_of(uc: UpdateCodec, stats, slot: int) -> float:
    return next(v for i, k, v in stats if i == slot and k == "eb")


@pytest.mark.parametrize("cid", ["sz3", "zfp"])
@pytest.mark.parametrize("mode,eps", [("rel", 1e-2), ("rel", 1e-3), ("rel", 1e-4), ("abs", 1e-5)])
def test_bound_holds_on_real_updates(real_updates, cid, mode, eps):
    params, ups = real_updates
    uc = UpdateCodec({"id": cid, "mode": mode, "eps": eps}, ROUTING, params)
    lossy = [s for s in uc.slots if s.route == "lossy"]
    assert {len(s.shape) for s in lossy} == {2, 4}  # conv and fc weights
    for k, up in enumerate(ups):
        res = uc.encode(up, client=k % 3, round=k // 3, state=CodecState(), want_recon=True)
        dec = uc.decode(res.data, client=k % 3, round=k // 3, state=CodecState())
        for s in uc.slots:
            x, y = up[s.name].double(), dec.update[s.name].double()
            assert torch.equal(dec.update[s.name], res.recon[s.name])
            if s.route == "dense":
                assert torch.equal(x, y)
                continue
            eb = _bound_of(uc, res.stats, s.index)
            want = eps * (float(x.max()) - float(x.min())) if mode == "rel" else eps
            assert 0 < eb <= want and eb >= want * (1 - 2 ** -23)
            err = float((x - y).abs().max())
            assert err <= eb, f"{s.name}: {err} > {eb}"
            assert err > 0  # lossy, and the stat matches
            assert next(v for i, n, v in res.stats if i == s.index and n == "max_err_over_eb") == err / eb
        assert res.payload_bytes < res.raw_bytes / 2


def test_rel_bound_is_rounded_down_to_float32():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = (rng.standard_normal(50) * 10.0 ** rng.integers(-20, 20)).astype(np.float32)
        eps = float(rng.uniform(1e-5, 1e-1))
        eb = abs_bound(a, "rel", eps)
        exact = Fraction(eps) * (Fraction(float(a.max())) - Fraction(float(a.min())))
        assert np.float32(eb) == eb and Fraction(eb) <= exact
        assert Fraction(float(np.nextafter(np.float32(eb), np.float32(np.inf)))) > exact
    assert abs_bound(np.zeros(5, np.float32), "rel", 1e-3) == 0.0
    assert abs_bound(np.array([-3e38, 3e38], np.float32), "rel", 0.9) == np.inf


@pytest.mark.parametrize("cid", ["sz3", "zfp"])
def test_exceptions_restore_the_bound(monkeypatch, cid):
    """A compressor that slips (here: every 97th element decoded 3 eb off) is fixed by exceptions."""
    x = torch.from_numpy(np.random.default_rng(2).standard_normal(5000).astype(np.float32))
    be = BACKENDS[cid]
    orig = be.decompress

    def sloppy(s, n, eb):
        y = orig(s, n, eb)
        y[::97] += np.float32(3 * eb)
        return y

    monkeypatch.setattr(be, "decompress", sloppy)
    codec = get_codec({"id": cid, "eps": 1e-3})
    enc = codec.encode(x, Ctx("w", (5000,), want_recon=True))
    idx = enc.parts["exc_idx"]
    assert idx.dtype == np.uint32 and np.array_equal(idx, np.arange(0, 5000, 97))
    assert np.array_equal(enc.parts["exc_val"], x.numpy()[idx])
    assert enc.payload_bytes == 8 + enc.parts["stream"].size + 8 * idx.size
    assert enc.stats["exceptions"] == idx.size
    dec = codec.decode(Encoded(dict(enc.parts), enc.flags), Ctx("w", (5000,)))
    assert torch.equal(dec, enc.recon)
    assert float((dec.double() - x.double()).abs().max()) <= enc.stats["eb"]


@pytest.mark.parametrize("cid", ["sz3", "zfp"])
def test_sz3_and_zfp_streams_are_the_libraries_own(cid):
    """The stream part is exactly what pysz/zfpy produce in ABS mode for the sent bound."""
    from pysz import sz, szConfig, szErrorBoundMode
    import zfpy

    x = np.random.default_rng(3).standard_normal(3000).astype(np.float32)
    enc = get_codec({"id": cid, "eps": 1e-3}).encode(torch.from_numpy(x), Ctx("w", (3000,)))
    eb = float(enc.parts["meta"][1:2].view(np.float32)[0])
    if cid == "sz3":
        cfg = szConfig()
        cfg.errorBoundMode = szErrorBoundMode.ABS
        cfg.absErrorBound = eb
        ref = bytes(sz.compress(x, cfg)[0])
    else:
        ref = zfpy.compress_numpy(x, tolerance=eb, write_header=False)
    assert bytes(enc.parts["stream"]) == ref
    assert enc.payload_bytes == 8 + len(ref) and enc.flags == 0


@pytest.mark.parametrize("cid", ["sz3", "zfp"])
@pytest.mark.parametrize("x", [np.full(300, 0.25, np.float32), np.array([1.0, np.nan] * 150, np.float32),
                               np.random.default_rng(4).standard_normal(3).astype(np.float32),
                               np.zeros(0, np.float32)], ids=["constant", "nan", "tiny", "empty"])
def test_raw_fallback_is_exact(cid, x):
    codec = get_codec({"id": cid})
    enc = codec.encode(torch.from_numpy(x), Ctx("w", x.shape, want_recon=True))
    assert enc.flags == FLAG_RAW and set(enc.parts) == {"values"} and enc.payload_bytes == 4 * x.size
    dec = codec.decode(Encoded(dict(enc.parts), enc.flags), Ctx("w", x.shape))
    assert np.array_equal(dec.numpy().view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("cid", ["sz3", "zfp"])
def test_verify_mode_catches_a_decoder_that_breaks_the_bound(monkeypatch, cid):
    x = torch.from_numpy(np.random.default_rng(5).standard_normal(2000).astype(np.float32))
    codec = get_codec({"id": cid, "verify": True})
    codec.encode(x, Ctx("w", (2000,)))  # a correct codec passes its own check
    be, calls = BACKENDS[cid], []
    orig = be.decompress

    def second_call_drifts(s, n, eb):  # the encoder's own decode is fine; the message decodes differently
        calls.append(1)
        y = orig(s, n, eb)
        if len(calls) == 2:
            y[7] += np.float32(3 * eb)
        return y

    monkeypatch.setattr(be, "decompress", second_call_drifts)
    with pytest.raises(ErrorBoundViolation, match="'w'"):
        codec.encode(x, Ctx("w", (2000,)))


@pytest.mark.parametrize("cid", ["sz3", "zfp"])
def test_corrupt_stream_is_rejected_before_the_c_decoder(monkeypatch, cid):
    x = np.random.default_rng(6).standard_normal(4000).astype(np.float32)
    codec = get_codec({"id": cid})
    enc = codec.encode(torch.from_numpy(x), Ctx("w", (4000,)))
    called = []
    monkeypatch.setattr(BACKENDS[cid], "decompress", lambda *a: called.append(1))
    for pos in (0, 9, enc.parts["stream"].size // 2, enc.parts["stream"].size - 1):
        bad = enc.parts["stream"].copy()
        bad[pos] ^= 0x10
        with pytest.raises(PartError, match="CRC32"):
            codec.decode(Encoded({**enc.parts, "stream": bad}, 0), Ctx("w", (4000,)))
    assert not called
    for parts in ({"meta": enc.parts["meta"]}, {**enc.parts, "values": x}, {**enc.parts, "exc_val": x[:2]}):
        with pytest.raises(WireFormatError):
            codec.decode(Encoded(dict(parts), 0), Ctx("w", (4000,)))


_FUZZ = """
import numpy as np
from hpcfl.codecs.eblc import BACKENDS
from hpcfl.codecs.base import PartError
rng = np.random.default_rng(7)
n = 3000
x = rng.standard_normal(n).astype(np.float32)
for name, be in sorted(BACKENDS.items()):
    s = be.compress(x, 1e-3)
    outcomes = {"raised": 0, "decoded": 0}
    for i in range(400):
        b = s.copy()
        kind = i % 4
        if kind == 0:  # bit flips
            for p in rng.integers(0, b.size, 3):
                b[p] ^= np.uint8(1 << int(rng.integers(8)))
        elif kind == 1:  # a run of random bytes after the header
            lo = int(rng.integers(16, b.size))
            b[lo:lo + 64] = rng.integers(0, 256, b[lo:lo + 64].size)
        elif kind == 2:  # truncation (to whole words, as zfp requires)
            b = b[:max(8, int(rng.integers(8, b.size)) // 8 * 8)]
        else:  # the longest accepted stream (4n bytes) of noise or of ones (ones read many bits in zfp)
            b = rng.integers(0, 256, 4 * n).astype(np.uint8) if i % 8 == 3 else np.full(4 * n, 0xFF, np.uint8)
            if name == "sz3":
                b[:16] = s[:16]
        try:
            y = be.decompress(b, n, 1e-3)
            assert y.shape == (n,) and y.dtype == np.float32
            outcomes["decoded"] += 1
        except PartError:
            outcomes["raised"] += 1
    print(name, outcomes)
"""


def test_c_decoders_survive_malformed_streams():
    """Bypassing the CRC: malformed streams make the SZ3 and ZFP backends raise PartError or decode
    to the right shape, never crash. In a subprocess, so a segfault fails the test, not pytest."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_FUZZ)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"a C decoder died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "sz3 {'raised'" in r.stdout and "zfp {'raised'" in r.stdout, r.stdout


def test_codecs_in_the_shared_contract_with_falcom_routing(real_updates):
    """Through the full wire path with FalCom's routing: zstd tensors exact, lossy within bound."""
    params, ups = real_updates
    for cid in ("sz3", "zfp"):
        dec = check_roundtrip({"id": cid, "eps": 1e-2}, ups[0], routing=ROUTING)
        for name, t in ups[0].items():
            assert float((dec[name] - t).abs().max()) <= 1e-2 * float(t.max() - t.min())
