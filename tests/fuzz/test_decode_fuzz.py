"""Hostile wire messages against every codec's decoder (issue 9, item 1).

Every registered codec and recipe (``codec_cases()``) on three tensor tables
(:data:`hpcfl.fuzz.LAYOUTS`): random bytes, structured mutations of a valid
message (bit flips, truncation, extension, re-keyed / dropped / added parts,
typed part contents with edge values, decompression bombs), lying length,
count and shape fields. The contract (:func:`hpcfl.fuzz.check_decode`): only
``WireFormatError``, bounded CPU time and bounded allocation. Plus a bounded
coverage-guided atheris run (``python -m hpcfl.fuzz``) and the command line
(``hpcfl codec decode``: exit code 2, one line, no traceback).

Budget: hypothesis draws 50 examples per codec family and test (families are
the codec modules: quantize, sparsify, pipeline, ef, lbgm, ...), atheris runs
for 15 s in a subprocess that overlaps the hypothesis tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "codecs"))
from common import codec_cases  # noqa: E402

from hpcfl import fuzz as F  # noqa: E402
from hpcfl.codecs import codec_classes, expand  # noqa: E402
from hpcfl.codecs.wire import unpack  # noqa: E402

CASES = codec_cases(strict=False)  # an uncoverable codec is a failing case here too
TSET = F.TargetSet(CASES)
INDEX = {c.name: i for i, c in enumerate(CASES)}
ATHERIS_SECONDS = 15


def family(case) -> str:
    """The module of the case's top-level codec (``pipeline`` and ``ef`` wrap others)."""
    if case.error:
        return "uncovered"
    cid = expand(dict(case.config))["id"]
    if cid in ("pipeline", "ef"):
        return cid
    return codec_classes()[cid].__module__.rsplit(".", 1)[-1]


FAMILIES: dict[str, list[int]] = {}
for _i, _c in enumerate(CASES):
    FAMILIES.setdefault(family(_c), []).append(_i)

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def target(i: int, layout: str = "tensor", crc: bool = False) -> F.Target:
    case = CASES[i]
    if case.error:
        pytest.fail(case.error)
    return TSET.get(i, layout, crc)


# ------------------------------------------------------------ atheris (background)

@pytest.fixture(scope="module")
def atheris_run(tmp_path_factory):
    """``python -m hpcfl.fuzz --seconds N`` started once, in the background, for this module."""
    pytest.importorskip("atheris")
    d = tmp_path_factory.mktemp("atheris")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "hpcfl.fuzz", "--seconds", str(ATHERIS_SECONDS),
                             "--seeds", "cases", "--corpus", str(d / "corpus")], cwd=d, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, d
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_atheris_started(atheris_run):
    """Start the coverage-guided run early, so it overlaps the hypothesis tests (2 cores)."""
    proc, _ = atheris_run
    assert proc.poll() in (None, 0)


# ---------------------------------------------------------------- valid baseline

@pytest.mark.parametrize("i", range(len(CASES)), ids=[c.name for c in CASES])
def test_valid_message_decodes_within_bounds(i):
    """The unmutated message of every case and layout decodes, within the time and memory bounds;
    cut short anywhere it is rejected."""
    for layout in F.LAYOUT_NAMES:
        t = target(i, layout)
        assert F.check_decode(t, t.message) == "decoded"
        for cut in (0, 8, 39, 40, len(t.message) // 2, len(t.message) - 8, len(t.message) - 1):
            assert F.check_decode(t, t.message[:cut]) == "rejected"
    t = target(i, "tensor", crc=True)
    assert F.check_decode(t, t.message) == "decoded"
    assert F.check_decode(t, F.apply_ops(t, [("flip", 8 * (len(t.message) - 9))])) == "rejected"


def test_families_cover_every_case():
    assert sum(len(v) for v in FAMILIES.values()) == len(CASES)
    assert "uncovered" not in FAMILIES, [CASES[i].error for i in FAMILIES.get("uncovered", [])]


# -------------------------------------------------------------- hypothesis

layouts = st.sampled_from(F.LAYOUT_NAMES)


def _case(fam: str):
    return st.sampled_from(FAMILIES[fam])


@pytest.mark.parametrize("fam", sorted(FAMILIES))
@FUZZ
@given(data=st.data())
def test_random_bytes(fam, data):
    """Arbitrary bytes, or a valid message's prefix followed by arbitrary bytes, decoded without
    hash/round/sender checks (so they reach as deep as they can)."""
    t = target(data.draw(_case(fam)), data.draw(layouts), data.draw(st.booleans()))
    kind = data.draw(st.sampled_from(["bytes", "prefix", "header"]))
    if kind == "bytes":
        msg = data.draw(st.binary(max_size=512))
    elif kind == "prefix":
        cut = data.draw(st.integers(0, len(t.message)))
        msg = t.message[:cut] + data.draw(st.binary(max_size=256))
    else:  # a valid fixed header + table of contents, then random payload of the right length
        head = min((p.offset for tr in unpack(t.message).tensors for p in tr.parts), default=len(t.message))
        body = data.draw(st.binary(min_size=len(t.message) - head, max_size=len(t.message) - head))
        msg = t.message[:head] + body
    F.check_decode(t, msg, strict=False)


@pytest.mark.parametrize("fam", sorted(FAMILIES))
@FUZZ
@given(data=st.data(), rnd=st.randoms(use_true_random=False))
def test_structured_mutations(fam, data, rnd):
    """Random mutation programs (hpcfl.fuzz.random_ops): typed part contents with edge values,
    re-keyed, dropped and added parts, tensor flags/index/shape, bombs, byte edits; framing
    repaired or not."""
    t = target(data.draw(_case(fam)), data.draw(layouts), data.draw(st.booleans()))
    ops = F.random_ops(rnd, t, max_ops=data.draw(st.integers(1, 4)))
    F.check_decode(t, F.apply_ops(t, ops, fix=data.draw(st.booleans())))


lie = st.one_of(st.sampled_from(F.INTERESTING), st.integers(0, 2**64 - 1))


@pytest.mark.parametrize("fam", sorted(FAMILIES))
@FUZZ
@given(data=st.data())
def test_lying_fields(fam, data):
    """One or two header fields (lengths, counts, ndim, shapes, nbytes, keys, codings, ...) set to
    an absolute or relative lie; total_len and CRC repaired or not."""
    t = target(data.draw(_case(fam)), data.draw(layouts), data.draw(st.booleans()))
    ops = []
    for _ in range(data.draw(st.integers(1, 2))):
        fi = data.draw(st.integers(0, len(t.fields) - 1))
        if data.draw(st.booleans()):
            ops.append(("field", fi, data.draw(lie)))
        else:
            ops.append(("field_rel", fi, data.draw(st.sampled_from([-64, -8, -1, 1, 8, 64]))))
    F.check_decode(t, F.apply_ops(t, ops, fix=data.draw(st.booleans())))


# ---------------------------------------------------------- targeted checks

def test_every_field_lies_on_one_case_per_family():
    """Deterministic sweep: every header field of one case per family set to 0, 2**32-1 and 2**64-1
    (masked to the field's width), framing repaired."""
    for fam, idx in sorted(FAMILIES.items()):
        t = target(idx[0], "tensor")
        for fi in range(len(t.fields)):
            for v in (0, 2**32 - 1, 2**64 - 1):
                F.check_decode(t, F.apply_ops(t, [("field", fi, v)], fix=True))


def test_huge_declared_shapes_are_rejected_by_the_table():
    """A shape the job's table does not have never reaches a decoder (ndim up to 8, dims up to
    2**32-1: nothing is allocated from it)."""
    for i in range(len(CASES)):
        t = target(i, "tensor")
        for shape in ((2**32 - 1,) * 8, (2**31, 2**31), (2**20, 2**20, 2**20), (0,), ()):
            data = F.apply_ops(t, [("tensor_shape", 0, shape)])
            assert F.check_decode(t, data) == "rejected"


def test_empty_tensor_with_factors_is_rejected():
    """Regression: low-rank codecs divided by zero on factor parts for an empty (0 x 5) tensor."""
    for cfg in ({"id": "powersgd"}, {"id": "atomo"}, {"id": "atomo", "sample": True}):
        t = F.decode_target(("lowrank", cfg), "edge")
        assert t.codec.slots[0].shape == (0, 5)
        for extra in ([], [("part_drop", 0)]):
            ops = [("tensor_meta", 0, 2, 0), ("part_add", 0, 0, 11, 0, b""), ("part_add", 0, 1, 11, 0, b"")]
            assert F.check_decode(t, F.apply_ops(t, ops + extra)) == "rejected"


def _byte_coded(case) -> bool:
    text = json.dumps(expand(dict(case.config)))
    return '"zstd"' in text or '"lz4"' in text


@pytest.mark.parametrize("i", [i for i, c in enumerate(CASES) if not c.error and _byte_coded(c)],
                         ids=[c.name for c in CASES if not c.error and _byte_coded(c)])
def test_decompression_bombs(i):
    """zstd and lz4 frames of up to 16 MiB of equal bytes (a ~1000x ratio) in every part, coded or
    not: rejected before (or while) decompressing, within the memory bound."""
    t = target(i, "tensor")
    n_parts = sum(len(tr.parts) for tr in unpack(t.message).tensors)
    for pi in range(n_parts):
        for kind in (0, 1):
            for log2 in (12, 20, 24):
                for coded in (0, 1):
                    data = F.apply_ops(t, [("part_bomb", pi, kind, log2, 0, coded)])
                    assert F.check_decode(t, data) == "rejected"


def test_memory_bound_formula():
    assert F.memory_bound(0, 0) == 64 * 1024
    assert F.memory_bound(10_000, 0) == 200_000
    assert F.memory_bound(100, 1000) == 64 * 1024 + 16_000


def test_check_decode_catches_breaches():
    """The harness itself: a decoder that raises, allocates or warns is reported."""
    t = F.decode_target(("identity", {"id": "identity"}), "tensor")

    class Broken:
        def __init__(self, how):
            self.how = how

        def __getattr__(self, name):
            return getattr(t.codec, name)

        def decode(self, *a, **k):
            if self.how == "raise":
                raise ZeroDivisionError("boom")
            if self.how == "alloc":
                return np.ones(10_000_000)  # 80 MB of numpy memory, traced
            import warnings

            warnings.warn("overflow encountered", RuntimeWarning)
            return t.codec.decode(*a, **k)

    for how, kind in (("raise", "exception"), ("alloc", "memory"), ("warn", "warning")):
        bad = F.Target(t.name, Broken(how), t.message, t.state, t.client, t.round, t.glob, t.fields)
        with pytest.raises(F.DecodeFailure) as ei:
            F.check_decode(bad, t.message)
        assert ei.value.kind == kind


def test_program_interpreter_roundtrip():
    """Seed inputs select each target and decode its valid message; the raw seed too."""
    seeds = dict(F.seed_inputs(TSET))
    assert len(seeds) == len(CASES) * (2 * len(F.LAYOUT_NAMES) + 1)
    for name in ("seed-0-tensor-0", f"seed-{len(CASES) - 1}-edge-1", "seed-1-raw"):
        assert F.run_input(seeds[name], TSET) == "decoded"
    case, layout, crc, raw, fix, body = F.parse_input(F.encode_program(3, layout="model", checksum=True,
                                                                       fix=True), len(CASES))
    assert (case, layout, crc, raw, fix, body) == (3, "model", True, False, True, [])


# ---------------------------------------------------------------------- CLI

MAY_DECODE = ("payload-flip", "shape-mismatch")
CLI_CASES = ["identity", "topk-bitmap", "qsgd-300", "powersgd", "pipeline-qsgd-zstd-lz4", "recipe-topk_zstd",
             "natural", "threshold-v0.15-delta", "lbgm", "mwq", "igc"]


def _cli(args) -> tuple[int, str, str]:
    from hpcfl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _corruptions(t: F.Target) -> dict[str, bytes]:
    n = len(t.message)
    msg = unpack(t.message)
    head = min((p.offset for tr in msg.tensors for p in tr.parts), default=n)
    nb = next(f for f in range(len(t.fields)) if t.fields[f].name.endswith(".nbytes"))
    return {
        "truncated": t.message[:n // 2],
        "extended": t.message + bytes(8),
        "payload-flip": F.apply_ops(t, [("flip", 8 * head + 3)], fix=True),
        "lying-nbytes": F.apply_ops(t, [("field", nb, 2**40)], fix=True),
        "huge-shape": F.apply_ops(t, [("tensor_shape", 0, (2**32 - 1,) * 8)]),
        "shape-mismatch": F.apply_ops(t, [("tensor_shape", 0, (5, 5))]),
        "bomb": F.apply_ops(t, [("part_bomb", 0, 0, 24, 0, 1)]),
        "garbage": bytes(range(256)) * 2,
    }


def _cli_args(t: F.Target, cfg: dict, path: Path, like: Path | None) -> list:
    args = ["codec", "decode", "--codec", json.dumps(cfg), "--routing", json.dumps(t.codec.policy.to_config()),
            "--seed", F.SEED, "--round", t.round, path, path.with_suffix(".npz")]
    return args + (["--like", like] if like else [])


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_decode_corrupted_exit_2_one_line(name, tmp_path):
    """``hpcfl codec decode`` on corrupted messages: exit 2, one stderr line, no traceback, no output
    file; with the tensor table from ``--like`` and from the message itself."""
    i = INDEX[name]
    t = target(i, "tensor")
    cfg = dict(CASES[i].config)
    params, _ = F.LAYOUTS["tensor"]
    like = tmp_path / "like.npz"
    np.savez(like, **{n: np.zeros(s, np.float32) for n, s in params})
    ok = tmp_path / "ok.hpfl"
    ok.write_bytes(t.message)
    rc, out, err = _cli(_cli_args(t, cfg, ok, like))
    if t.codec.codec.decoder_state and rc == 2:  # a fresh root state cannot decode round 2 of a stateful codec
        assert len(err.strip().splitlines()) == 1
    else:
        assert rc == 0 and err == "", err
    for label, data in _corruptions(t).items():
        p = tmp_path / f"{label}.hpfl"
        p.write_bytes(data)
        for lk in (like, None):
            rc, out, err = _cli(_cli_args(t, cfg, p, lk))
            if rc == 0 and label in MAY_DECODE and (lk is None or label == "payload-flip"):
                assert err == ""  # a flipped value bit, or a shape the message itself declares, can be valid
                for suffix in (".npz", ".npy"):
                    p.with_suffix(suffix).unlink(missing_ok=True)
                continue
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (label, lk, rc, err)
            assert lines[0].startswith("hpcfl codec: error: malformed message at byte"), (label, lines)
            assert not p.with_suffix(".npz").exists() and not p.with_suffix(".npy").exists()


def test_cli_decode_subprocess_no_traceback(tmp_path):
    """The real process: exit code 2 and exactly one line on stderr, with and without --like."""
    i = INDEX["qsgd-300"]
    t = target(i, "tensor")
    params, _ = F.LAYOUTS["tensor"]
    like = tmp_path / "like.npz"
    np.savez(like, **{n: np.zeros(s, np.float32) for n, s in params})
    bad = tmp_path / "bad.hpfl"
    nb = next(f for f in range(len(t.fields)) if t.fields[f].name.endswith(".nbytes"))
    bad.write_bytes(F.apply_ops(t, [("field", nb, 2**63)], fix=True))
    huge = tmp_path / "huge.hpfl"  # a shape of 2**40 elements taken from the message: cannot be allocated
    th = F.decode_target(("threshold", {"id": "threshold", "v": 0.1, "index": "int32"}), "tensor")
    huge.write_bytes(F.apply_ops(th, [("tensor_shape", 0, (2**20, 2**20)), ("part_data", 0, b""),
                                      ("part_data", 1, b"")]))
    runs = [_cli_args(t, dict(CASES[i].config), bad, like), _cli_args(t, dict(CASES[i].config), bad, None),
            ["codec", "decode", "--codec", json.dumps({"id": "threshold", "v": 0.1, "index": "int32"}),
             "--seed", F.SEED, huge, tmp_path / "huge.npz"]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for args in runs:
        r = subprocess.run([sys.executable, "-m", "hpcfl", *map(str, args)], capture_output=True, text=True,
                           timeout=120, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "malformed message" in lines[0]
        assert not (tmp_path / "huge.npz").exists() and not bad.with_suffix(".npz").exists()


# ---------------------------------------------------------------- atheris result

def test_atheris_bounded_run_finds_nothing(atheris_run):
    """The coverage-guided run (hpcfl code instrumented) ends by its time limit, exit 0, no crash."""
    proc, d = atheris_run
    try:
        out, _ = proc.communicate(timeout=ATHERIS_SECONDS + 240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"atheris did not stop after {ATHERIS_SECONDS} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    assert "Uncaught Python exception" not in out and "DecodeFailure" not in out, out[-5000:]
    assert "INFO: Instrumenting hpcfl.codecs.wire" in out  # coverage-guided over hpcfl's code
    m = re.search(r"stat::number_of_executed_units: (\d+)", out)
    assert m and int(m.group(1)) > 0, out[-3000:]
    assert not list(Path(d).glob("crash-*")) and not list(Path(d).glob("timeout-*"))
