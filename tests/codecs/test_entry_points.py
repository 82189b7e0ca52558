"""Out-of-tree codecs register through the `hpcfl.codecs` entry-point group."""

from __future__ import annotations

import importlib
import sys

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
