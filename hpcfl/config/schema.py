"""The job-file schema as data: sections, keys, types, defaults, ranges, docs.

Every key a job file may hold is declared here, so validation, ``hpcfl
validate`` messages and the docs (docs/jobs.md) all come from one table.
Rounds are 0-based everywhere (round 0 is the first round).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "SCHEMA", "FREEFORM_SECTIONS", "CODEC_FIELDS"]


@dataclass(frozen=True)
class Field:
    """One key of a job section."""

    type: type
    default: Any
    doc: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # True: value must be > min, not >= min
    max_open: bool = False
    item_type: type | None = None  # element type for lists

    def describe_allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_open else '<='} {self.max}")
        kind = self.type.__name__
        if self.type is list and self.item_type is not None:
            kind = f"list of {self.item_type.__name__}"
        return kind + (" " + " and ".join(parts) if parts else "")


DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10")
MODELS = ("logreg", "mlp", "cnn2", "resnet")

SCHEMA: dict[str, dict[str, Field]] = {
    "run": {
        "name": Field(str, "hpcfl", "Run name, used in the default output path."),
        "rounds": Field(int, 10, "Number of FL rounds.", min=1),
        "ranks": Field(int, 4, "World size when hpcfl launches mpiexec itself (rank 0 + workers).", min=2),
        "seed": Field(int, 0, "Job seed; every other seed is derived from it.", min=0),
        "eval_every": Field(int, 1, "Evaluate the global model every k rounds (and on the last).", min=1),
        "poll_interval": Field(
            float, 0.0002,
            "Longest sleep between polls of a pending MPI request; waits back off from 20 us to this "
            "(0 = block inside MPI, which busy-polls and steals CPU from training ranks, and disables the "
            "run.timeout watchdog).",
            min=0.0, max=1.0),
        "wire_checksum": Field(bool, False, "Append a CRC32 trailer to every message."),
        "timeout": Field(float, 600.0, "Seconds any rank may wait for another (in a collective) before the job "
                         "is declared hung and ended, naming the rank and round.", min=0.0, min_open=True),
        "nonfinite": Field(str, "stop", "A client update holding NaN/Inf: stop the job, or drop the client for "
                           "that round (logged).", choices=("stop", "drop")),
        "checkpoint_every": Field(int, 1, "Write a checkpoint (model, optimizer, all codec state) every k "
                                  "rounds for hpcfl run --resume (0: never).", min=0),
        "memory_limit_gb": Field(float, 0.0, "Refuse a job whose estimated codec-state memory on one rank "
                                 "exceeds this (0: the machine's available memory).", min=0.0),
        "calibrate": Field(str, "auto", "Measure the MPI path (ping-pong latency and bandwidth from rank 0 to "
                           "up to 8 workers, a Gather) once before round 0 and store it in /calibration of the run "
                           "file. auto: on in batch jobs (Slurm, PBS, LSF, Flux job ids in the environment), off "
                           "otherwise.", choices=("auto", "on", "off")),
        "calibrate_s": Field(float, 0.5, "Time budget of that measurement, seconds (it overruns by a probe "
                             "per point at most).", min=0.05, max=1.0),
    },
    "data": {
        "dataset": Field(str, "digits", "Data set.", choices=DATASETS),
        "path": Field(str, "", "Directory holding the files of mnist, fashion_mnist or cifar10."),
        "n_clients": Field(int, 10, "Number of virtual clients (independent of ranks).", min=1),
        "partition": Field(str, "iid", "How samples are split among clients (natural: the synthetic "
                           "data set's own devices).", choices=("iid", "dirichlet", "shards", "natural")),
        "alpha": Field(float, 0.5, "Dirichlet concentration (partition = dirichlet).", min=0.0, min_open=True),
        "classes_per_client": Field(int, 2, "Classes per client (partition = shards).", min=1),
        "test_fraction": Field(float, 0.2, "Held-out share for data sets without a test split.",
                               min=0.0, max=1.0, min_open=True, max_open=True),
        "synthetic_alpha": Field(float, 1.0, "LEAF synthetic(alpha, beta): model heterogeneity.", min=0.0),
        "synthetic_beta": Field(float, 1.0, "LEAF synthetic(alpha, beta): feature heterogeneity.", min=0.0),
        "synthetic_dim": Field(int, 60, "Feature dimension of the synthetic data set.", min=1),
        "synthetic_classes": Field(int, 10, "Classes of the synthetic data set.", min=2),
        "synthetic_sigma": Field(float, 1.0, "Lognormal sigma of samples per synthetic client (LEAF uses 2).",
                                 min=0.0),
    },
    "model": {
        "name": Field(str, "mlp", "Model.", choices=MODELS),
        "hidden": Field(list, [64], "Hidden layer widths of the MLP.", item_type=int),
        "cnn_padding": Field(str, "valid", "cnn2 convolution padding ('same' for images under 28x28).",
                             choices=("valid", "same")),
        "resnet_width": Field(int, 16, "Channels of the first resnet stage.", min=1),
        "resnet_stages": Field(int, 3, "Residual stages of the resnet (width doubles per stage).", min=1, max=4),
    },
    "train": {
        "algorithm": Field(str, "fedavg", "fedavg: update = model delta after local steps; "
                           "fedsgd: update = one gradient.", choices=("fedavg", "fedsgd")),
        "local_steps": Field(int, 10, "Local SGD steps per round (fedavg).", min=1),
        "local_epochs": Field(float, 0.0, "If > 0, local passes over the client's data instead of local_steps.",
                              min=0.0),
        "batch_size": Field(int, 32, "Minibatch size.", min=1),
        "full_batch": Field(bool, False, "fedsgd: one gradient over the whole local data set."),
        "lr": Field(float, 0.05, "Client learning rate.", min=0.0, min_open=True),
        "momentum": Field(float, 0.0, "Client SGD momentum (reset every round).", min=0.0, max=1.0, max_open=True),
        "weight_decay": Field(float, 0.0, "Client L2 weight decay.", min=0.0),
        "clients_per_round": Field(int, 0, "Clients sampled per round (0: use client_fraction).", min=0),
        "client_fraction": Field(float, 1.0, "Share of clients sampled per round.",
                                 min=0.0, max=1.0, min_open=True),
    },
    "server": {
        "lr": Field(float, 1.0, "Server learning rate (1.0 with fedavg is plain FedAvg).", min=0.0, min_open=True),
        "momentum": Field(float, 0.0, "Server heavy-ball momentum.", min=0.0, max=1.0, max_open=True),
        "weighting": Field(str, "samples", "Client weights in the mean.", choices=("samples", "equal")),
        "aggregate": Field(str, "per_client", "per_client: decode each message, then sum; fused: one weighted "
                           "sum per tensor through the codec (e.g. altspace inverts its shared map once per layer).",
                           choices=("per_client", "fused")),
    },
    "routing": {
        "scope": Field(str, "tensor", "tensor: codec per tensor; model: lossy tensors flattened into one.",
                       choices=("tensor", "model")),
        "min_numel": Field(int, 0, "Tensors with fewer elements go dense.", min=0),
        "min_ndim": Field(int, 0, "Tensors with fewer dimensions go dense (2 keeps biases dense).", min=0),
        "dense_patterns": Field(list, [], "fnmatch patterns of names that go dense.", item_type=str),
        "lossy_patterns": Field(list, [], "If set, only names matching one of these may go lossy.",
                                item_type=str),
        "dense": Field(dict, {"id": "identity"}, "Codec config for tensors routed dense (identity or lossless)."),
    },
    "link": {
        "mode": Field(str, "off", "Client link emulation: off; model (communication time computed from bytes, "
                      "logged beside measured time); pace (workers really wait for their clients' links).",
                      choices=("off", "model", "pace")),
        "uplink_mbps": Field(float, 10.0, "Client uplink bandwidth, Mbit/s (10^6 bit/s): the median when spread > 0.",
                             min=0.0, min_open=True),
        "downlink_mbps": Field(float, 50.0, "Client downlink bandwidth, Mbit/s (10^6 bit/s).", min=0.0,
                               min_open=True),
        "latency_ms": Field(float, 20.0, "One-way latency added to each transfer, ms.", min=0.0),
        "spread": Field(float, 0.0, "Per-client lognormal spread (sigma of ln bandwidth) around the medians; "
                        "0: every client gets the same link.", min=0.0),
        "trace": Field(str, "", "CSV of per-client links (columns client, uplink_mbps, downlink_mbps, "
                       "latency_ms); client c uses row c mod rows. Overrides the values above."),
    },
    "log": {
        "path": Field(str, "runs/{name}-{time}.h5",
                      "HDF5 output; {name}, {time}, {job_id} are filled in. --out overrides."),
        "overwrite": Field(bool, False, "Replace an existing output file instead of failing."),
        "progress": Field(str, "auto", "Per-round progress on rank 0.", choices=("auto", "tty", "plain", "off")),
        "codec_error": Field(bool, False, "Log per-client reconstruction error (costs a local decode)."),
        "save_updates": Field(int, 0, "Save the raw (uncompressed) updates of up to this many sampled clients "
                              "per round in the run file, for hpcfl analyze gradient-space (0: off).", min=0),
        "save_update_dims": Field(int, 0, "With save_updates: keep only this many seeded coordinates of each "
                                  "update (0: all).", min=0),
        "save_messages": Field(str, "none", "Keep the raw wire messages of these rounds in <out>.messages/ "
                               "(for hpcfl codec decode --run).", choices=("none", "first", "last", "all")),
    },
}

# Sections whose whole content is a codec config, validated by the codec registry.
FREEFORM_SECTIONS: dict[str, dict] = {
    "codec": {"id": "identity"},
}
# Keys (section, key) whose value is a codec config.
CODEC_FIELDS = {("routing", "dense")}
