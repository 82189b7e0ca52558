"""Wire format v1: pack and unpack a message of many tensors (per-tensor overhead)."""

from __future__ import annotations

import numpy as np

from .common import Benchmark, model_table


class Wire(Benchmark):
    """Two parts per tensor (int32 indices + float32 values of a 1% top-k)."""

    params = [[16, 256]]
    param_names = ["n_tensors"]

    def setup(self, n_tensors: int) -> None:
        from hpcfl.codecs.wire import Message, PartRecord, TensorRecord, dtype_code, pack

        table = model_table(n_tensors)
        rng = np.random.default_rng(n_tensors)
        tensors = []
        for i, (_, shape) in enumerate(table):
            numel = int(np.prod(shape))
            k = max(1, numel // 100)
            idx = np.sort(rng.choice(numel, k, replace=False)).astype(np.int32)
            vals = rng.standard_normal(k, dtype=np.float32)
            tensors.append(TensorRecord(i, dtype_code("float32"), shape, 0,
                                        [PartRecord(0, dtype_code("int32"), 0, idx),
                                         PartRecord(1, dtype_code("float32"), 0, vals)]))
        self.table = [s for _, s in table]
        self.msg = Message(0x1234, 3, 1, tensors)
        self.data = pack(self.msg)
        self.pack = pack

    def time_pack(self, n_tensors: int) -> None:
        self.pack(self.msg)

    def time_unpack(self, n_tensors: int) -> None:
        from hpcfl.codecs.wire import unpack

        unpack(self.data, expect_hash=0x1234, expect_round=3, expect_sender=1, table=self.table)

    def track_header_bytes(self, n_tensors: int) -> int:
        return self.msg.header_bytes

    track_header_bytes.unit = "B"


class EncodeModel(Benchmark):
    """UpdateCodec.encode/decode of a whole many-tensor model update with fp16 (per-call overhead)."""

    params = [[16, 256]]
    param_names = ["n_tensors"]

    def setup(self, n_tensors: int) -> None:
        import torch

        from hpcfl.codecs import CodecState, UpdateCodec

        self.one_thread()
        table = model_table(n_tensors)
        g = torch.Generator().manual_seed(n_tensors)
        self.update = {n: torch.randn(s, generator=g) * 1e-3 for n, s in table}
        self.uc = UpdateCodec({"id": "fp16"}, {"scope": "tensor"}, table)
        self.CodecState = CodecState
        self.data = self.uc.encode(self.update, client=0, round=0, state=CodecState()).data

    def time_encode(self, n_tensors: int) -> None:
        self.uc.encode(self.update, client=0, round=0, state=self.CodecState())

    def time_decode(self, n_tensors: int) -> None:
        self.uc.decode(self.data, client=0, round=0, state=self.CodecState())
