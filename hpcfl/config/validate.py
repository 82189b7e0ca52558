"""Full validation of a job, without MPI: everything that can fail before a rank starts.

Beyond the schema (load.py) this builds the codec configs (unknown ids and
parameters), checks that the data set's files exist, builds the model for the
data set's input shape, and plans the routing against its parameter table.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcfl.config.load import Job
from hpcfl.errors import ConfigError

__all__ = ["validate_job", "Validated", "INPUT_SHAPES"]

INPUT_SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
                "cifar10": ((3, 32, 32), 10)}


@dataclass
class Validated:
    job: Job
    n_params: int
    slots: list  # routing plan
    codec_config: dict
    memory: object = None  # MemoryEstimate


def validate_job(job: Job, check_files: bool = True, check_memory: bool = True) -> Validated:
    from hpcfl.codecs import UpdateCodec
    from hpcfl.models import build_model, param_table

    d = job.data
    if d.dataset == "synthetic":
        shape, classes = (d.synthetic_dim,), d.synthetic_classes
        if d.partition == "shards" and job.data.classes_per_client > classes:
            raise ConfigError("data.classes_per_client", f"{job.data.classes_per_client} > "
                              f"{classes} classes of the data set")
    else:
        shape, classes = INPUT_SHAPES[d.dataset]
        if d.partition == "shards" and d.classes_per_client > classes:
            raise ConfigError("data.classes_per_client", f"{d.classes_per_client} > {classes} classes "
                              f"of {d.dataset}")
    if check_files and d.dataset in ("mnist", "fashion_mnist", "cifar10"):
        from hpcfl.data import check_files as _check

        _check(d.dataset, d.path)
    if job.link.mode != "off" and job.link.trace:
        from hpcfl.fl.link import load_trace

        load_trace(job.link.trace)
    model = build_model(job.model.to_dict(), shape, classes, job.run.seed)
    params = param_table(model)
    uc = UpdateCodec(job.codec, job.routing.to_dict(), params, seed=job.run.seed,
                     checksum=job.run.wire_checksum)
    n_params = sum(s.numel for s in uc.slots)
    mem = None
    if check_memory:
        from hpcfl.config.memory import check_memory as _check, estimate_memory
        from hpcfl.run.memory import available_bytes

        mem = estimate_memory(job, uc, n_params)
        _check(mem, job.run.memory_limit_gb, available_bytes())
    return Validated(job, n_params, uc.slots, uc.config, mem)
