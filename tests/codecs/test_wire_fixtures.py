"""Golden wire messages: the committed bytes freeze wire format v1 and each codec's output.

Fixtures live in ``tests/fixtures/wire/v<VERSION>/<name>/`` and are written once
by ``tests/fixtures/wire/make_fixtures.py`` (see its docstring for the rules).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from common import FIXTURE_ROOT, check_wire_fixture, codec_ids_in
from hpcfl.codecs import get_codec
from hpcfl.codecs.wire import FLAG_CRC, VERSION, unpack

MAKER = FIXTURE_ROOT.parent / "make_fixtures.py"


def _maker():
    spec = importlib.util.spec_from_file_location("hpcfl_make_wire_fixtures", MAKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PRESENT = sorted(p.name for p in FIXTURE_ROOT.iterdir() if p.is_dir()) if FIXTURE_ROOT.is_dir() else []


def test_every_declared_fixture_exists():
    missing = sorted(set(_maker().FIXTURES) - set(PRESENT))
    assert not missing, f"missing wire fixtures {missing}: run {MAKER.relative_to(MAKER.parents[3])}"


def test_fixture_tree_is_small():
    total = sum(f.stat().st_size for f in FIXTURE_ROOT.parent.rglob("*") if f.is_file())
    assert total < 200_000, f"wire fixtures take {total} bytes; keep inputs tiny"


def test_maker_never_overwrites(tmp_path):
    mod = _maker()
    name = "identity"
    assert mod.main(["--root", str(tmp_path), name]) == 0
    first = (tmp_path / name / "message.hpfl").read_bytes()
    stamp = (tmp_path / name / "input.npz").stat().st_mtime_ns
    assert mod.main(["--root", str(tmp_path), name]) == 0  # second run keeps it
    assert (tmp_path / name / "input.npz").stat().st_mtime_ns == stamp
    assert (tmp_path / name / "message.hpfl").read_bytes() == first
    with pytest.raises(FileExistsError):
        mod.write_wire_fixture(tmp_path / name, **{**mod.DEFAULTS, **mod.FIXTURES[name]})


@pytest.mark.parametrize("name", PRESENT)
def test_wire_fixture(name):
    """Stored input + config -> stored bytes, and stored bytes -> decoded.npz, exactly.

    Every codec draws its randomness from numpy's PCG64 (same bits on every CPU);
    torch.randn was avoided because its bits depend on the CPU's vector ISA.
    """
    check_wire_fixture(FIXTURE_ROOT / name)


@pytest.mark.parametrize("name", PRESENT)
def test_wire_fixture_is_meaningful(name):
    """Each fixture is a valid v1 message that exercises what its config says."""
    d = FIXTURE_ROOT / name
    cfg = json.loads((d / "config.json").read_text())
    data = (d / "message.hpfl").read_bytes()
    msg = unpack(data)
    assert msg.total_len == len(data) == cfg["message_bytes"]
    assert data[:4] == b"HPFL" and int.from_bytes(data[4:6], "little") == VERSION
    assert msg.round == cfg["round"] == cfg["rounds"][-1] and msg.sender == cfg["client"]
    assert bool(msg.flags & FLAG_CRC) == cfg["checksum"]
    codec = get_codec(cfg["codec"])
    assert codec.get_config() == cfg["codec"], "config.json must hold the expanded, fully defaulted config"
    if cfg["codec"]["id"] == "pipeline" and cfg["codec"]["bytes"]:
        assert any(p.coding for t in msg.tensors for p in t.parts), f"{name}: no part went through a byte codec"
