"""hpcfl.bench: codec micro-benchmark records, break-even model, CLI output. No timing assertions."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from hpcfl.bench import bench_codecs, breakeven, make_tensor, matrix_shape, resolve_specs
from hpcfl.bench.codecs import all_specs, errors, routing_for
from hpcfl.cli import main
from hpcfl.errors import ConfigError

SIZES = [1024, 4096]
HEADER = 72  # one 2-D tensor, one part: 40 fixed + 9 + 8 shape + 11 part, padded to 8


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return bench_codecs(["identity", "fp16", "zstd", "topk", "topk_ef"], SIZES, repeat=2, warmup=1)


def by(records, codec, n=1024) -> dict:
    (r,) = [r for r in records if r["codec"] == codec and r["n"] == n]
    return r


def test_rows_and_baselines(records):
    names = {r["codec"] for r in records}
    assert names == {"memcpy", "torch.clone", "torch.topk", "identity", "fp16", "zstd", "topk", "topk_ef"}
    assert len(records) == len(names) * len(SIZES)
    for r in records:
        assert r["raw_bytes"] == 4 * r["n"]
        assert r["encode_min_s"] > 0 and r["memcpy_s"] > 0
        assert r["encode_min_s"] <= r["encode_median_s"] <= r["encode_max_s"]
        assert r["repeat"] == 2
        assert r["kind"] == ("baseline" if r["codec"] in ("memcpy", "torch.clone", "torch.topk") else "codec")
        if r["kind"] == "codec":
            assert r["message_bytes"] == r["payload_bytes"] + r["header_bytes"]
            assert r["decode_min_s"] > 0
            assert math.isclose(r["encode_MBps"], r["raw_bytes"] / r["encode_min_s"] / 1e6)
            assert math.isclose(r["encode_vs_memcpy"], r["memcpy_s"] / r["encode_min_s"])


def test_identity_and_fp16_ratios(records):
    for n in SIZES:
        ident = by(records, "identity", n)
        assert ident["header_bytes"] == HEADER
        assert ident["ratio"] == pytest.approx(4 * n / (4 * n + HEADER))
        assert ident["ratio"] < 1
        assert by(records, "fp16", n)["ratio"] == pytest.approx(2, rel=0.07)


def test_lossless_errors_are_zero(records):
    for codec in ("identity", "zstd", "memcpy"):
        r = by(records, codec)
        assert r["max_abs_error"] == 0 and r["rel_l2_error"] == 0
    fp16 = by(records, "fp16")
    assert 0 < fp16["rel_l2_error"] < 1e-3


def test_breakeven(records):
    for codec in ("identity", "zstd"):  # gaussian noise: neither shrinks
        r = by(records, codec)
        if r["ratio"] <= 1:
            assert math.isnan(r["breakeven_MBps"]) or math.isinf(r["breakeven_MBps"])
    for codec in ("topk", "torch.topk"):
        r = by(records, codec, 4096)
        assert r["ratio"] > 10
        assert 0 < r["breakeven_MBps"] < math.inf
        t = r["encode_min_s"] + r["decode_min_s"]
        assert r["breakeven_MBps"] * 1e6 == pytest.approx(r["raw_bytes"] * (1 - 1 / r["ratio"]) / t)
        assert r["breakeven_Gbps"] == pytest.approx(r["breakeven_MBps"] * 8 / 1000)
    assert math.isnan(breakeven(4096, 1.0, 1e-3)) and math.isnan(breakeven(4096, 0.5, 1e-3))
    assert breakeven(4096, 2.0, 0.0) == math.inf
    assert breakeven(1e6, 4.0, 0.5) == pytest.approx(1.5e6)


def test_topk_matches_torch_topk_selection(records):
    ours, ref = by(records, "topk", 4096), by(records, "torch.topk", 4096)
    assert ours["payload_bytes"] == ref["payload_bytes"]  # k int32 indices + k float32 values
    assert ours["rel_l2_error"] == pytest.approx(ref["rel_l2_error"], rel=1e-6)


def test_errors_helper():
    x = np.array([3.0, 4.0], np.float32)
    assert errors(x, x) == (0.0, 0.0)
    m, rel = errors(x, np.zeros(2, np.float32))
    assert m == 4.0 and rel == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "lowrank", "real"])
def test_data_deterministic(kind):
    a = make_tensor(kind, 3000)
    assert a.dtype == np.float32 and a.shape == matrix_shape(3000) == (50, 60)
    assert not a.flags.writeable and np.isfinite(a).all() and a.std() > 0
    from hpcfl.bench.data import _make

    _make.cache_clear()
    np.testing.assert_array_equal(a, make_tensor(kind, 3000))
    assert not np.array_equal(a, make_tensor(kind, 3000, seed=1)) or kind == "real"


def test_specs():
    labels = [lbl for lbl, _ in all_specs()]
    assert {"identity", "fp16", "topk", "topk_ef", "zstd"} <= set(labels)
    assert not {"ef", "pipeline", "flatten", "matrix"} & set(labels)
    assert {"sz3", "zfp", "falcom", "mwq", "altspace", "lbgm", "igc"} <= set(labels)  # lbgm: wrapper, inner identity
    assert routing_for({"id": "igc"}) == {"scope": "model"}  # igc codes the whole model
    assert routing_for({"id": "topk"}) == routing_for({"id": "lbgm"}) == {"scope": "tensor"}
    assert resolve_specs([{"id": "topk", "ratio": 0.001}])[0][0] == "topk(ratio=0.001)"
    with pytest.raises(ConfigError, match=r"codecs\[1\]"):
        resolve_specs(["fp16", "nope"])


def test_cli_h5_and_json(tmp_path, capsys):
    out = tmp_path / "b.h5"
    rc = main(["bench", "codecs", "--codecs", "fp16,topk", "--sizes", "1K", "--repeat", "1", "--quiet",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fp16" in text and "torch.topk" in text and "B* Gbit/s" in text
    with h5py.File(out, "r") as f:
        for k in ("versions_json", "git_commit", "hostname", "created", "command", "hpcfl_version"):
            assert k in f.attrs
        assert json.loads(f.attrs["versions_json"])["torch"]
        d = f["codecs"][:]
        assert [c.decode() for c in d["codec"]] == ["memcpy", "torch.clone", "torch.topk", "fp16", "topk"]
        assert json.loads(f["codecs"].attrs["units_json"])["breakeven_Gbps"] == "Gbit/s"
    rc = main(["bench", "codecs", "--codecs", "identity", "--sizes", "1024", "--repeat", "1", "--quiet",
               "--json", "--no-baselines"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    (r,) = doc["records"]
    assert r["codec"] == "identity" and r["breakeven_MBps"] is None and doc["attrs"]["data"] == "gaussian"


@pytest.mark.parametrize("argv", [["--codecs", "fp16,nope"], ["--codecs", "fp16,,topk"],
                                  ["--codecs", '{"id": "topk", "ratio": 2}'], ["--codecs", "flatten"],
                                  ["--sizes", "12X"], ["--repeat", "0"]])
def test_cli_usage_errors(argv, capsys):
    rc = main(["bench", "codecs", "--sizes", "1024", *argv] if "--sizes" not in argv else
              ["bench", "codecs", "--codecs", "fp16", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("hpcfl bench: error:")


def test_cli_refuses_existing_out(tmp_path, capsys):
    out = tmp_path / "x.h5"
    out.write_bytes(b"")
    assert main(["bench", "codecs", "--codecs", "fp16", "--sizes", "1K", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
