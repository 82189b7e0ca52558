"""`hpcfl codecs` and `hpcfl codec roundtrip|encode|decode`: outputs, files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def hpcfl(*args):
    """Run the CLI in-process (fast); returns an object shaped like CompletedProcess."""
    import contextlib
    import io
    import types

    from hpcfl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcfl", "codec", "roundtrip", "--codec", "nope",
                        str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], capture_output=True, text=True,
                       timeout=120)
    assert one_error_line(r), r.stderr


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "g.npy", (rng.standard_normal(5000) * 1e-3).astype(np.float32))
    np.savez(tmp_path / "u.npz", w=rng.standard_normal((32, 16)).astype(np.float32),
             b=rng.standard_normal(16).astype(np.float32))
    return tmp_path


def one_error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr


def test_codecs_lists_everything():
    from hpcfl.codecs import codec_classes, recipes

    r = hpcfl("codecs", "--json")
    assert r.returncode == 0
    ids = {row["id"] for row in json.loads(r.stdout)}
    assert ids == set(codec_classes()) | set(recipes())
    text = hpcfl("codecs").stdout
    assert "topk" in text and "ratio = 0.01" in text


def test_roundtrip_npy_lossless_and_rounds(files):
    r = hpcfl("codec", "roundtrip", "--codec", "zstd", files / "g.npy", files / "o.npy", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["max_abs_error"] == 0 and rec["rel_l2_error"] == 0 and rec["cosine"] == pytest.approx(1.0)
    assert rec["raw_bytes"] == 20000 and rec["message_bytes"] == rec["payload_bytes"] + rec["header_bytes"]
    np.testing.assert_array_equal(np.load(files / "o.npy"), np.load(files / "g.npy"))
    r = hpcfl("codec", "roundtrip", "--codec", '{"id": "topk_ef", "ratio": 0.1}', files / "g.npy",
              files / "o.npy", "--rounds", "3", "--json")
    recs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [x["round"] for x in recs] == [0, 1, 2]
    assert recs[0]["codec"] == {"id": "ef", "beta": 1.0, "gamma": 1.0,
                                "inner": {"id": "topk", "ratio": 0.1, "k": 0, "index": "auto"}}
    # 500 float32 values + a bitmap of 5000 bits (smaller than 500 int32 indices)
    assert all(x["payload_bytes"] == 500 * 4 + 5000 // 8 for x in recs)


def test_roundtrip_npz_keeps_names(files):
    r = hpcfl("codec", "roundtrip", "--codec", "fp16", files / "u.npz", files / "o.npz")
    assert r.returncode == 0, r.stderr
    with np.load(files / "o.npz") as z, np.load(files / "u.npz") as u:
        assert set(z.files) == {"w", "b"}
        np.testing.assert_allclose(z["w"], u["w"], atol=2e-3)


def test_encode_decode_halves(files):
    assert hpcfl("codec", "encode", "--codec", "qsgd", files / "u.npz", files / "m.hpfl").returncode == 0
    r = hpcfl("codec", "decode", "--codec", "qsgd", files / "m.hpfl", files / "d.npz", "--like", files / "u.npz",
              "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["message_bytes"] == (files / "m.hpfl").stat().st_size
    with np.load(files / "d.npz") as z:
        assert z["w"].shape == (32, 16)
    # without --like the names come from the message's own table
    assert hpcfl("codec", "decode", "--codec", "qsgd", files / "m.hpfl", files / "e.npz").returncode == 0


@pytest.mark.parametrize("args", [
    ("roundtrip", "--codec", "nope", "{d}/g.npy", "{d}/o.npy"),
    ("roundtrip", "--codec", "{not json", "{d}/g.npy", "{d}/o.npy"),
    ("roundtrip", "--codec", '{"id": "topk", "ratio": 2}', "{d}/g.npy", "{d}/o.npy"),
    ("roundtrip", "--codec", '{"id": "topk", "bogus": 1}', "{d}/g.npy", "{d}/o.npy"),
    ("roundtrip", "--codec", "topk", "{d}/missing.npy", "{d}/o.npy"),
    ("roundtrip", "--codec", "topk", "{d}/bad.npy", "{d}/o.npy"),
    ("roundtrip", "--codec", "topk", "{d}/ints.npy", "{d}/o.npy"),
    ("roundtrip", "--codec", "topk", "{d}/g.npy", "{d}/o.npy", "--rounds", "0"),
    ("decode", "--codec", "fp16", "{d}/trunc.hpfl", "{d}/o.npz"),
    ("decode", "--codec", "fp16", "{d}/garbage.hpfl", "{d}/o.npz"),
    ("decode", "--codec", "qsgd", "{d}/m.hpfl", "{d}/o.npz", "--like", "{d}/u.npz"),  # wrong codec
    # integers outside the wire's u32 fields / the signed 64-bit seed (were struct.error tracebacks)
    ("roundtrip", "--codec", "topk", "{d}/g.npy", "{d}/o.npy", "--client", "-1"),
    ("encode", "--codec", "fp16", "{d}/u.npz", "{d}/o.hpfl", "--round", "-1"),
    ("encode", "--codec", "fp16", "{d}/u.npz", "{d}/o.hpfl", "--client", str(2**32)),
    ("decode", "--codec", "fp16", "{d}/m.hpfl", "{d}/o.npz", "--round", "-1"),
    ("roundtrip", "--codec", "topk", "{d}/g.npy", "{d}/o.npy", "--seed", str(2**63)),
    ("roundtrip", "--codec", "topk", "{d}/g.npy", "{d}/o.npy", "--rounds", "x"),
    ("decode", "--codec", "fp16", "{d}/m.hpfl", "{d}/o.npz", "--max-elements", "0"),
    ("roundtrip",),  # argparse's own errors are one line too
    (),
    # unwritable outputs, a directory as the message
    ("roundtrip", "--codec", "topk", "{d}/g.npy", "/nonexist/o.npy"),
    ("roundtrip", "--codec", "topk", "{d}/g.npy", "{d}/odir.npy"),
    ("encode", "--codec", "fp16", "{d}/u.npz", "/nonexist/o.hpfl"),
    ("encode", "--codec", "fp16", "{d}/u.npz", "{d}/odir.npy"),
    ("decode", "--codec", "fp16", "{d}/m.hpfl", "/nonexist/o.npz"),
    ("decode", "--codec", "fp16", "{d}/m.hpfl", "/nonexist/o.npz", "--like", "{d}/u.npz"),
    ("decode", "--codec", "fp16", "{d}", "{d}/o.npz"),
    # an output suffix that is not the input's format (was silently renamed)
    ("roundtrip", "--codec", "fp16", "{d}/u.npz", "{d}/o2.npy"),
    ("roundtrip", "--codec", "fp16", "{d}/g.npy", "{d}/o.txt"),
    ("roundtrip", "--codec", "fp16", "{d}/g.npy", "{d}/o.npz"),
    ("decode", "--codec", "fp16", "{d}/m.hpfl", "{d}/o.npy", "--like", "{d}/u.npz"),
    ("decode", "--codec", "fp16", "{d}/m.hpfl", "{d}/o.npy"),  # two tensors in the message: .npz only
    ("decode", "--codec", "fp16", "{d}/m.hpfl", "{d}/o.txt"),
])
def test_usage_errors_exit_2_with_one_line(files, args):
    (files / "bad.npy").write_bytes(b"not numpy at all")
    np.save(files / "ints.npy", np.arange(10))
    (files / "odir.npy").mkdir()
    hpcfl("codec", "encode", "--codec", "fp16", files / "u.npz", files / "m.hpfl")
    data = (files / "m.hpfl").read_bytes()
    (files / "trunc.hpfl").write_bytes(data[:50])
    (files / "garbage.hpfl").write_bytes(b"\x00" * 64)
    r = hpcfl("codec", *[a.replace("{d}", str(files)) for a in args])
    assert one_error_line(r), (r.returncode, r.stderr)
    assert sorted(p.name for p in files.glob("o*")) == ["odir.npy"], "an output was written"
    assert not any(files.glob("odir.npy/*"))


def _threshold_message(files, shape_bytes: bytes | None = None) -> bytes:
    """An all-dropped threshold message for a 4 x 4 tensor (80 bytes), optionally with patched shape."""
    np.save(files / "small.npy", np.full((4, 4), 1e-3, np.float32))
    spec = '{"id": "threshold", "v": 0.5, "index": "int32"}'
    assert hpcfl("codec", "encode", "--codec", spec, files / "small.npy", files / "t.hpfl").returncode == 0
    data = bytearray((files / "t.hpfl").read_bytes())
    assert len(data) == 80 and data[49:57] == np.array([4, 4], "<u4").tobytes()  # 40 B header + 9 B, then shape
    if shape_bytes is not None:
        data[49:57] = shape_bytes
    (files / "t.hpfl").write_bytes(bytes(data))
    return bytes(data)


def test_decode_caps_elements_declared_by_the_message(files):
    """Without --like/--run the shapes come from the message: their total is capped by --max-elements
    (default 2**28) before anything is allocated; 80 bytes must not make it allocate 16 GiB."""
    spec = '{"id": "threshold", "v": 0.5, "index": "int32"}'
    _threshold_message(files, np.array([65536, 65536], "<u4").tobytes())
    r = hpcfl("codec", "decode", "--codec", spec, files / "t.hpfl", files / "o.npz")
    assert one_error_line(r), r.stderr
    assert "malformed message at byte 49 (tensor[0].shape)" in r.stderr and "--max-elements 268435456" in r.stderr
    assert not (files / "o.npz").exists()
    _threshold_message(files, np.array([100, 100], "<u4").tobytes())  # 10,000 elements: a valid, empty message
    assert one_error_line(hpcfl("codec", "decode", "--codec", spec, files / "t.hpfl", files / "o.npz",
                                "--max-elements", "9999"))
    r = hpcfl("codec", "decode", "--codec", spec, files / "t.hpfl", files / "o.npz", "--max-elements", "10000")
    assert r.returncode == 0, r.stderr
    with np.load(files / "o.npz") as z:
        assert z.files == ["t0"] and z["t0"].shape == (100, 100) and not z["t0"].any()
    r = hpcfl("codec", "decode", "--codec", spec, files / "t.hpfl", files / "o.npy")  # one tensor: .npy allowed
    assert r.returncode == 0 and np.load(files / "o.npy").shape == (100, 100)
