"""What every rank builds identically from the job before round 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcfl.codecs import UpdateCodec
from hpcfl.config import Job
from hpcfl.data import Dataset, client_indices, load_dataset
from hpcfl.models import build_model, param_table

__all__ = ["Setup", "build_setup", "CLIENT_RECORD"]

# Per-client metrics a worker sends the root each round (fixed dtype: no pickling).
CLIENT_RECORD = np.dtype([("client", "i8"), ("train_s", "f8"), ("encode_s", "f8"), ("train_loss", "f8"),
                          ("raw_bytes", "i8"), ("payload_bytes", "i8"), ("header_bytes", "i8"),
                          ("recon_max_abs", "f8"), ("recon_rel_l2", "f8")])


@dataclass
class Setup:
    job: Job
    data: Dataset
    model: torch.nn.Module
    params: list[tuple[str, tuple[int, ...]]]
    codec: UpdateCodec
    client_idx: list[np.ndarray]
    n_samples: np.ndarray  # per client

    @property
    def n_params(self) -> int:
        return int(sum(int(np.prod(s)) for _, s in self.params))


def build_setup(job: Job, build_data: bool = True) -> Setup:
    seed = job.run.seed
    data = load_dataset(job.data.to_dict(), seed)
    model = build_model(job.model.to_dict(), data.input_shape, data.n_classes, seed)
    params = param_table(model)
    codec = UpdateCodec(job.codec, job.routing.to_dict(), params, seed=seed, checksum=job.run.wire_checksum)
    idx = client_indices(data, job.data.to_dict(), seed)
    n = np.array([len(i) for i in idx], dtype=np.int64)
    return Setup(job, data, model, params, codec, idx, n)
