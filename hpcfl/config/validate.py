"""Full validation of a job, without MPI: everything that can fail before a rank starts.

Beyond the schema (load.py) this builds the codec configs (unknown ids and
parameters), checks that the data set's files exist, builds the model for the
data set's input shape (on torch's meta device: shapes only, so an absurd model
is refused by size instead of failing in the allocator), and plans the routing
against its parameter table. It refuses a model whose copies alone cannot fit
in memory, estimates the codec state, and makes sure the training samples can
be split among the clients (the real split for digits; fixed sizes for the
on-disk sets).
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
    params = _param_table(job, shape, classes, build_model, param_table)
    if check_memory:
        _check_model_size(job, params)
    uc = UpdateCodec(job.codec, job.routing.to_dict(), params, seed=job.run.seed,
                     checksum=job.run.wire_checksum)
    _check_igc_momentum(job, uc.config)
    n_params = sum(s.numel for s in uc.slots)
    mem = None
    if check_memory:
        from hpcfl.config.memory import check_memory as _check, estimate_memory
        from hpcfl.run.memory import available_bytes

        mem = estimate_memory(job, uc, n_params)
        _check(mem, job.run.memory_limit_gb, available_bytes())
    if check_files:
        _check_partition(job, classes)
    return Validated(job, n_params, uc.slots, uc.config, mem)


def _codec_nodes(cfg):
    """Every codec config dict in an expanded config tree (wrappers hold inner configs)."""
    if isinstance(cfg, dict):
        if "id" in cfg:
            yield cfg
        for v in cfg.values():
            yield from _codec_nodes(v)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            yield from _codec_nodes(v)


def _check_igc_momentum(job: Job, codec_config: dict) -> None:
    """Time-varying IGC charges 2d floats of downlink per client (the previous period's final
    coordinates and the current ones). That rebuilds the model only if every period's movement lies
    in that period's subspace, i.e. with plain server SGD: heavy-ball momentum keeps moving the
    model along earlier periods' subspaces, and the byte count would then be a lie."""
    if job.server.momentum == 0:
        return
    for node in _codec_nodes(codec_config):
        if node.get("id") == "igc" and node.get("variant") == "timevarying":
            raise ConfigError("server.momentum", f"{job.server.momentum} with codec igc variant "
                              "'timevarying'; allowed: 0 (server momentum would keep moving the model "
                              "along earlier periods' subspaces, so the 2d download could not rebuild "
                              "it; docs/methods/igc.md)")


# Training samples of the on-disk data sets (their fixed train splits).
N_TRAIN = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}


def _model_key(job: Job) -> str:
    """The key that sets a model's size."""
    name = job.model.name
    if name == "mlp":
        return "model.hidden"
    if name == "resnet":
        return "model.resnet_width"
    return "data.synthetic_dim" if job.data.dataset == "synthetic" else "model.name"


def _param_table(job: Job, shape, classes, build_model, param_table) -> list:
    """The model's ``(name, shape)`` table, built on torch's meta device: shapes only, nothing is
    allocated, so an absurd size is refused below instead of failing in the allocator."""
    import torch

    try:
        with torch.device("meta"):
            return param_table(build_model(job.model.to_dict(), shape, classes, job.run.seed))
    except ConfigError:
        raise
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise ConfigError(_model_key(job), f"cannot build model {job.model.name!r} for samples of shape "
                          f"{tuple(shape)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _check_model_size(job: Job, params: list) -> None:
    """Refuse a model whose copies alone (4 on a worker, 5 on the root, float32) cannot fit, before
    the codec memory estimate allocates an update of its size."""
    import math

    from hpcfl.config.memory import BASELINE_RANK_BYTES
    from hpcfl.run.memory import available_bytes

    n = sum(math.prod(s) for _, s in params)
    model = 4 * n
    root, worker = BASELINE_RANK_BYTES + 5 * model, BASELINE_RANK_BYTES + 4 * model
    limit_gb = job.run.memory_limit_gb
    if limit_gb > 0:
        if max(root, worker) > limit_gb * 2**30:
            raise ConfigError(_model_key(job), f"the model has {n:,} parameters ({model / 2**30:.2f} GiB); its "
                              f"copies alone need {max(root, worker) / 2**30:.2f} GiB per rank, more than "
                              f"run.memory_limit_gb = {limit_gb}")
        return
    avail = available_bytes() or _physical_bytes()
    total = root + (job.run.ranks - 1) * worker
    if avail and job.run.ranks * BASELINE_RANK_BYTES > avail:
        raise ConfigError("run.ranks", f"{job.run.ranks} ranks need at least {BASELINE_RANK_BYTES / 2**20:.0f} MiB "
                          f"each ({job.run.ranks * BASELINE_RANK_BYTES / 2**30:.2f} GiB), but only "
                          f"{avail / 2**30:.2f} GiB are available here")
    if avail and total > avail:
        raise ConfigError(_model_key(job), f"the model has {n:,} parameters ({model / 2**30:.2f} GiB); its "
                          f"copies alone need {total / 2**30:.2f} GiB over {job.run.ranks} ranks, but only "
                          f"{avail / 2**30:.2f} GiB are available here")


def _physical_bytes() -> int:
    """Installed memory, where MemAvailable is unknown (0 if that is unknown too)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_partition(job: Job, classes: int) -> None:
    """Refuse a split of the training samples that every rank would fail to make: more clients
    than samples, shards that leave a class unowned, ... (ConfigError naming the key)."""
    d = job.data
    if d.dataset in N_TRAIN:  # on disk: sizes are fixed (every class present), the files are not read here
        if d.n_clients > N_TRAIN[d.dataset]:
            raise ConfigError("data.n_clients", f"{d.n_clients} clients but {d.dataset} has only "
                              f"{N_TRAIN[d.dataset]} training samples; every client needs at least one")
        if d.partition == "shards" and d.n_clients * d.classes_per_client < classes:
            raise ConfigError("data.classes_per_client", f"{d.n_clients} clients x {d.classes_per_client} "
                              f"classes cover only {d.n_clients * d.classes_per_client} of {classes} classes; "
                              "raise it or data.n_clients")
        return
    if d.dataset == "synthetic" and d.partition != "shards":
        return  # one device per client, each with training samples: iid, dirichlet and natural always fit
    from hpcfl.data import client_indices, load_dataset

    try:  # digits (small) and synthetic shards: make the real split, as every rank will
        client_indices(load_dataset(d.to_dict(), job.run.seed), d.to_dict(), job.run.seed)
    except MemoryError:
        raise ConfigError("data.synthetic_dim" if d.dataset == "synthetic" else "data.dataset",
                          "the data set does not fit in memory") from None
