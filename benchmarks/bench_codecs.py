"""Codec speed and size through UpdateCodec (one tensor, one thread), with memcpy as the baseline.

The default grid is small on purpose (8 codecs x 2 sizes); ``hpcfl bench codecs``
covers every codec and size. Times include packing into / validating the wire
message, as in a run.
"""

from __future__ import annotations

import numpy as np

from .common import Benchmark, gradient, matrix_shape

CODECS = ["identity", "fp16", "uniform", "sign", "qsgd", "topk", "topk_ef", "powersgd"]
SIZES = [1024, 1048576]


class Codec(Benchmark):
    params = (CODECS, SIZES)
    param_names = ["codec", "n"]

    def setup(self, codec: str, n: int) -> None:
        import torch

        from hpcfl.codecs import CodecState, UpdateCodec

        self.one_thread()
        self.CodecState = CodecState
        shape = matrix_shape(n)
        self.uc = UpdateCodec({"id": codec}, {"scope": "tensor"}, [("x", shape)])
        self.update = {"x": torch.from_numpy(gradient(n).copy())}
        self.state = CodecState()  # persistent client state: the steady state of stateful codecs
        self.enc = self.uc.encode(self.update, client=0, round=0, state=CodecState())

    def time_encode(self, codec: str, n: int) -> None:
        self.uc.encode(self.update, client=0, round=0, state=self.state)

    def time_decode(self, codec: str, n: int) -> None:
        self.uc.decode(self.enc.data, client=0, round=0, state=self.CodecState())

    def track_compression_ratio(self, codec: str, n: int) -> float:
        return self.enc.raw_bytes / len(self.enc.data)

    track_compression_ratio.unit = "x"

    def track_payload_bytes(self, codec: str, n: int) -> int:
        return self.enc.payload_bytes

    track_payload_bytes.unit = "B"

    def peakmem_encode(self, codec: str, n: int) -> None:
        self.uc.encode(self.update, client=0, round=0, state=self.CodecState())


class Memcpy(Benchmark):
    """The reference every codec time is read against: copy the same tensor."""

    params = [SIZES + [16777216]]
    param_names = ["n"]

    def setup(self, n: int) -> None:
        import torch

        self.one_thread()
        self.a = gradient(n)
        self.dst = np.empty_like(self.a)
        np.copyto(self.dst, self.a)  # fault the pages in outside the timed region
        self.x = torch.from_numpy(self.a.copy())

    def time_copyto(self, n: int) -> None:
        np.copyto(self.dst, self.a)

    def time_torch_clone(self, n: int) -> None:
        self.x.clone()


class TopKSelect(Benchmark):
    """hpcfl's exact top-k selection against torch.topk (aim: >= 10x faster at 16 M, 1%)."""

    params = ([1048576, 16777216], [0.01])
    param_names = ["n", "ratio"]

    def setup(self, n: int, ratio: float) -> None:
        import torch

        self.one_thread()
        self.x = torch.from_numpy(gradient(n).copy()).reshape(-1)
        self.k = max(1, round(ratio * n))

    def time_topk_indices(self, n: int, ratio: float) -> None:
        from hpcfl.codecs.sparsify import topk_indices

        topk_indices(self.x, self.k)

    def time_torch_topk(self, n: int, ratio: float) -> None:
        import torch

        torch.topk(self.x.abs(), self.k, sorted=False)
