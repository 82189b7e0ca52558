"""Out-of-tree codecs register through the `hpcfl.codecs` entry-point group."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys

import pytest
import torch

from hpcfl.codecs import registry


def test_entry_point_codec_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "fakecodec_hpcfl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from hpcfl.codecs.basic import Identity\n"
        "class Doubler(Identity):\n"
        "    '''identity, registered from outside the package'''\n"
        "    codec_id = 'fake_ep_doubler'\n"
    )
    dist = tmp_path / "fakecodec_hpcfl-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakecodec-hpcfl\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hpcfl.codecs]\ndoubler = fakecodec_hpcfl:Doubler\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        codec = registry.get_codec({"id": "fake_ep_doubler"})
        assert codec.codec_id == "fake_ep_doubler"
        assert "fake_ep_doubler" in registry.codec_classes()
        from hpcfl.codecs import CodecState, UpdateCodec

        uc = UpdateCodec({"id": "fake_ep_doubler"}, {}, [("w", (3,))])
        x = torch.tensor([1.0, 2.0, 3.0])
        data = uc.encode({"w": x}, client=0, round=0, state=CodecState()).data
        assert torch.equal(uc.decode(data, client=0, round=0, state=CodecState()).update["w"], x)
    finally:
        registry._codecs.pop("fake_ep_doubler", None)
        sys.modules.pop("fakecodec_hpcfl", None)


def test_broken_entry_point_warns_and_the_rest_load(tmp_path, monkeypatch):
    """An entry point whose import fails is skipped with a warning naming it (issue 3);
    the other plugins still register and `hpcfl codecs` still lists everything."""
    pkg = tmp_path / "fakecodec2_hpcfl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from hpcfl.codecs.basic import Identity\n"
        "class Good(Identity):\n"
        "    '''identity, registered next to a broken plugin'''\n"
        "    codec_id = 'fake_ep_good'\n"
    )
    (tmp_path / "fakecodec2_broken.py").write_text("import no_such_module_hpcfl_test\n")
    dist = tmp_path / "fakecodec2_hpcfl-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakecodec2-hpcfl\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hpcfl.codecs]\nbroken = fakecodec2_broken:Codec\n"
                                           "notacodec = fakecodec2_hpcfl:__doc__\ngood = fakecodec2_hpcfl:Good\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        with pytest.warns(registry.PluginWarning) as rec:
            classes = registry.codec_classes()
        msgs = sorted(str(w.message) for w in rec)
        assert len(msgs) == 2, msgs
        assert "'broken' (fakecodec2_broken:Codec)" in msgs[0] and "ModuleNotFoundError" in msgs[0]
        assert "'notacodec'" in msgs[1] and "TypeError" in msgs[1]
        assert "fake_ep_good" in classes and "topk" in classes

        monkeypatch.setattr(registry, "_entry_points_loaded", False)
        registry._codecs.pop("fake_ep_good")
        out, err = io.StringIO(), io.StringIO()
        from hpcfl.cli import main

        with pytest.warns(registry.PluginWarning) as rec, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            rc = main(["codecs"])
        assert len(rec) == 2 and any("'broken'" in str(w.message) for w in rec)
        assert rc == 0 and "fake_ep_good" in out.getvalue() and "topk" in out.getvalue()
        assert "Traceback" not in err.getvalue()
    finally:
        registry._codecs.pop("fake_ep_good", None)
        for m in ("fakecodec2_hpcfl", "fakecodec2_broken"):
            sys.modules.pop(m, None)
