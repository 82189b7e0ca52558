"""What every rank builds identically from the job before round 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcfl.codecs import UpdateCodec
from hpcfl.config import Job
from hpcfl.data import Dataset, client_indices, load_dataset
from hpcfl.models import build_model, param_table
from hpcfl.seeding import numpy_rng

__all__ = ["Setup", "build_setup"]



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

    def update_dims(self) -> np.ndarray | None:
        """Coordinates of saved raw updates (log.save_updates), the same on every rank."""
        log = self.job.log
        if log.save_updates <= 0:
            return None
        D = self.n_params
        k = log.save_update_dims
        if k <= 0 or k >= D:
            return np.arange(D, dtype=np.int64)
        rng = numpy_rng(self.job.run.seed, "saved-update-dims")
        return np.sort(rng.choice(D, size=k, replace=False)).astype(np.int64)

    def saved_clients(self, sampled: np.ndarray) -> np.ndarray:
        """The sampled clients whose raw updates are saved this round (the first ones by id)."""
        return sampled[:self.job.log.save_updates]


def build_setup(job: Job, build_data: bool = True) -> Setup:
    seed = job.run.seed
    data = load_dataset(job.data.to_dict(), seed)
    model = build_model(job.model.to_dict(), data.input_shape, data.n_classes, seed)
    params = param_table(model)
    codec = UpdateCodec(job.codec, job.routing.to_dict(), params, seed=seed, checksum=job.run.wire_checksum)
    idx = client_indices(data, job.data.to_dict(), seed)
    n = np.array([len(i) for i in idx], dtype=np.int64)
    return Setup(job, data, model, params, codec, idx, n)
