"""The HDF5 run-file schema as data: every dataset, its dtype, unit and meaning.

docs/results.md is generated from these tables (``hpcfl schema``), so the
documentation cannot drift from the writer. Rounds are 0-based.

Layout::

    /              attributes (provenance; see ROOT_ATTRS)
    /rounds        compound table, shape (R,): one row per round, one field per ROUND_METRICS
    /clients       compound table, shape (R, C): one field per CLIENT_METRICS
    /ranks         compound table, shape (R, W): one field per RANK_METRICS
    /meta/<name>   static per-client / per-rank facts
    /codec_stats   long table: (round, client, slot, name, value) per codec-reported statistic
    /updates/      optional raw updates (log.save_updates) for gradient-space analysis
    /calibration   optional network calibration before round 0 (run.calibrate): attrs
                   CALIBRATION_ATTRS, dataset ``table`` with CALIBRATION_FIELDS

Each table carries ``units_json`` and ``doc_json`` attributes (field -> unit / meaning).
Read one field with ``f["clients"].fields("train_s")[:]`` or load everything
with :func:`hpcfl.results.load_run`.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

__all__ = ["Metric", "ROUND_METRICS", "CLIENT_METRICS", "RANK_METRICS", "META", "ROOT_ATTRS", "SCHEMA_VERSION",
           "CODEC_STAT_FIELDS", "UPDATE_FIELDS", "CALIBRATION_FIELDS", "CALIBRATION_ATTRS"]


@dataclass(frozen=True)
class Metric:
    name: str
    dtype: str
    unit: str
    doc: str
    fill: float = float("nan")  # value for rows/cells with no data (e.g. a client not sampled)


ROUND_METRICS: tuple[Metric, ...] = (
    Metric("round", "i4", "1", "0-based round index (the dimension scale of axis 0).", -1),
    Metric("wall_time", "f8", "s", "Seconds from the start of round 0 to the end of this round's evaluation."),
    Metric("accuracy", "f8", "1", "Test accuracy of the global model after this round (NaN if not evaluated)."),
    Metric("loss", "f8", "1", "Test cross-entropy of the global model after this round (NaN if not evaluated)."),
    Metric("train_loss", "f8", "1", "Sample-weighted mean local training loss of the participants."),
    Metric("n_participants", "i4", "1", "Clients sampled this round.", 0),
    Metric("bcast_s", "f8", "s", "Root: broadcast of the global model (until the root's send completes)."),
    Metric("wait_s", "f8", "s", "Root: from the end of the broadcast until every worker's message size "
           "arrived, i.e. waiting for the slowest worker's training and encoding."),
    Metric("gather_s", "f8", "s", "Root: the Gatherv of all encoded messages (the uplink transfer)."),
    Metric("records_s", "f8", "s", "Root: unpacking the gathered chunks into messages and metric records."),
    Metric("decode_s", "f8", "s", "Root: sum over clients of message validation + decoding (server.aggregate = "
           "fused: the fused decode-and-sum of all messages)."),
    Metric("aggregate_s", "f8", "s", "Root: weighted accumulation of decoded updates plus the server step."),
    Metric("eval_s", "f8", "s", "Root: test-set evaluation (0 on rounds that skip it)."),
    Metric("round_s", "f8", "s", "Root: start of the broadcast to end of evaluation."),
    Metric("critical_s", "f8", "s", "bcast_s + max over workers of compute_s + gather_s + records_s + "
           "decode_s + aggregate_s + eval_s: the measured phases on the critical path."),
    Metric("overhead_s", "f8", "s", "round_s - critical_s: framework time outside every measured phase."),
    Metric("log_s", "f8", "s", "Root: writing and flushing this round to HDF5 (outside round_s)."),
    Metric("ckpt_s", "f8", "s", "Root: writing its checkpoint after this round (0 when none is due)."),
    Metric("uplink_bytes", "i8", "B", "Sum over participants of message bytes (payload + header).", 0),
    Metric("payload_bytes", "i8", "B", "Sum over participants of payload bytes.", 0),
    Metric("header_bytes", "i8", "B", "Sum over participants of header bytes.", 0),
    Metric("raw_bytes", "i8", "B", "Sum over participants of the uncompressed float32 update size.", 0),
    Metric("downlink_bytes", "i8", "B", "Model bytes received by the participants (4 x params each).", 0),
    Metric("compression_ratio", "f8", "1", "raw_bytes / uplink_bytes."),
    Metric("n_dropped", "i4", "1", "Clients left out of the aggregate for non-finite updates.", 0),
    Metric("modelled_round_s", "f8", "s", "link.mode model/pace: the synchronous round under the emulated links: "
           "max over sampled clients of modelled_s, plus the root's decode_s and aggregate_s."),
    Metric("modelled_uplink_s", "f8", "s", "link emulation: the slowest sampled client's uplink time."),
    Metric("modelled_downlink_s", "f8", "s", "link emulation: the slowest sampled client's downlink time."),
    Metric("root_state_bytes", "i8", "B", "Decoder-side codec state the root holds for all clients after this "
           "round (e.g. LBGM's look-back gradients; 0 for stateless decoders).", 0),
)

CLIENT_METRICS: tuple[Metric, ...] = (
    Metric("participated", "u1", "1", "1 if the client was sampled this round.", 0),
    Metric("train_s", "f8", "s", "Local training (load model, tau steps or one gradient, form the update)."),
    Metric("encode_s", "f8", "s", "Encoding the update into one wire message (codecs + packing)."),
    Metric("decode_s", "f8", "s", "Root: validating and decoding this client's message (NaN with fused "
           "aggregation, which decodes all clients together)."),
    Metric("train_loss", "f8", "1", "Mean local minibatch loss."),
    Metric("raw_bytes", "i8", "B", "Uncompressed float32 update size (4 x params).", 0),
    Metric("payload_bytes", "i8", "B", "Message payload bytes (the codecs' parts).", 0),
    Metric("header_bytes", "i8", "B", "Message header bytes (fixed header, tables, padding, trailer).", 0),
    Metric("message_bytes", "i8", "B", "payload_bytes + header_bytes: what crossed MPI for this client.", 0),
    Metric("downlink_bytes", "i8", "B", "Bytes this client downloads to rebuild the global model under the "
           "method's protocol (4 x params by default; e.g. subspace coordinates for intrinsic compression).", 0),
    Metric("state_bytes", "i8", "B", "This client's codec state on its host rank after encoding (error-feedback "
           "residuals, look-back gradients, warm-start factors).", 0),
    Metric("dropped", "u1", "1", "1 if the client's decoded update held NaN/Inf and run.nonfinite = 'drop' "
           "left it out of the aggregate.", 0),
    Metric("link_up_s", "f8", "s", "link emulation: latency + 8 x message_bytes / uplink bandwidth."),
    Metric("link_down_s", "f8", "s", "link emulation: latency + 8 x downlink_bytes / downlink bandwidth."),
    Metric("modelled_s", "f8", "s", "link emulation: link_down_s + train_s + encode_s + link_up_s, the client's "
           "part of a synchronous round if it had the CPU to itself."),
    Metric("recon_max_abs", "f8", "1", "max |update - decoded| (log.codec_error only)."),
    Metric("recon_rel_l2", "f8", "1", "||update - decoded|| / ||update|| (log.codec_error only)."),
)

RANK_METRICS: tuple[Metric, ...] = (
    Metric("idle_s", "f8", "s", "Workers: waiting for the root's round token (the root finishing the "
           "previous round). 0 on the root."),
    Metric("bcast_s", "f8", "s", "The model broadcast, after the round token."),
    Metric("compute_s", "f8", "s", "Sum of train_s + encode_s of the rank's sampled clients."),
    Metric("gather_s", "f8", "s", "Time in the message gather (workers: includes waiting for the slowest)."),
    Metric("n_clients", "i4", "1", "Sampled clients hosted this round.", 0),
    Metric("pace_s", "f8", "s", "link.mode pace: the rank slept this long before sending, the slowest of its "
           "clients' modelled downlink + uplink."),
    Metric("rss_bytes", "i8", "B", "Resident memory of the rank at the end of its round's local work.", 0),
)

# /codec_stats: long table, one row per (round, client, slot, statistic) a codec reported
# (Encoded.stats), e.g. LBGM's "recycled" per tensor or an energy share per layer.
CODEC_STAT_FIELDS: tuple[Metric, ...] = (
    Metric("round", "i4", "1", "Round."),
    Metric("client", "i4", "1", "Client id."),
    Metric("slot", "i4", "1", "Index into /meta/slot_names (the codec's tensor table)."),
    Metric("name", "S24", "", "Statistic name, defined by the codec (see docs/codecs.md)."),
    Metric("value", "f8", "1", "Its value."),
)

META: tuple[Metric, ...] = (
    Metric("client_rank", "i4", "1", "Rank hosting each client (static round-robin)."),
    Metric("client_train_samples", "i8", "1", "Training samples of each client."),
    Metric("hostnames", "S", "", "Host name of each rank (of the latest launch, after a resume)."),
    Metric("pids", "i8", "1", "Process id of each rank (of the latest launch): maps a PID in the MPI "
           "launcher's messages, e.g. Hydra's BAD TERMINATION banner, to a rank."),
    Metric("slot_names", "S", "", "The codec's tensor table: parameter name per slot (@model = all lossy "
           "parameters flattened, routing.scope = model)."),
)

# /updates (only with log.save_updates > 0): raw client updates for gradient-space analysis
UPDATE_FIELDS: tuple[Metric, ...] = (
    Metric("index", "(round i4, client i4)", "", "Round and client of each saved update, one row per vector."),
    Metric("vectors", "f4", "1", "The flattened uncompressed update (model order), restricted to /updates/dims."),
    Metric("dims", "i8", "1", "Coordinates kept (all, or a seeded subset of log.save_update_dims)."),
)

# /calibration (run.calibrate): hpcfl.bench.mpi.calibrate() once before round 0, all ranks taking part.
# A resumed run that calibrates again adds a subgroup /calibration/resume_<k> (k = rounds done) of the same layout.
CALIBRATION_FIELDS: tuple[Metric, ...] = (
    Metric("test", "S8", "", "pingpong (rank 0 <-> peer, buffer Send/Recv) or gather (Gather of every rank to 0)."),
    Metric("peer", "i4", "1", "The worker rank of a ping-pong row; -1 for the gather."),
    Metric("size", "i8", "B", "Message size (per rank for the gather)."),
    Metric("iters", "i4", "1", "Timed iterations (after one untimed probe)."),
    Metric("t_min_s", "f8", "s", "Fastest iteration: one-way time (round trip / 2), or the gather time "
           "(max over ranks)."),
    Metric("t_median_s", "f8", "s", "Median iteration."),
    Metric("t_max_s", "f8", "s", "Slowest iteration."),
    Metric("MBps_median", "f8", "MB/s", "size / t_median_s (gather: (ranks - 1) x size / t_median_s), 10^6 B/s."),
)

CALIBRATION_ATTRS: dict[str, tuple[str, str]] = {
    "latency_s": ("s", "Median over peers of the median one-way time of an 8-byte ping-pong."),
    "bw_1MiB_Bps": ("B/s", "Median over peers of 1 MiB / median one-way time."),
    "bw_16MiB_Bps": ("B/s", "Median over peers of 16 MiB / median one-way time."),
    "gather_s": ("s", "Median time of a Gather of 1 MiB from every rank to rank 0 (max over ranks)."),
    "gather_Bps": ("B/s", "(world_size - 1) x 1 MiB / gather_s: bytes that crossed between processes per second."),
    "world_size": ("1", "MPI world size."),
    "peers": ("1", "Workers rank 0 ping-ponged with (all, or 8 spread evenly)."),
    "budget_s": ("s", "run.calibrate_s, the time budget."),
    "elapsed_s": ("s", "Wall time the calibration took (max over ranks)."),
    "mode": ("", "run.calibrate as given (on, or auto in a batch job)."),
    "created": ("", "UTC time of the measurement (ISO 8601)."),
    "rounds_done": ("1", "Rounds completed before it: 0, or k for a calibration on hpcfl run --resume."),
}

ROOT_ATTRS: dict[str, str] = {
    "schema_version": "Version of this layout.",
    "hpcfl_version": "hpcfl package version.",
    "created": "UTC creation time (ISO 8601).",
    "status": "'running', 'complete', or 'failed: <reason>'.",
    "rounds_done": "Completed rounds written to the file.",
    "job_json": "The validated job, canonical JSON (all defaults filled).",
    "job_hash": "SHA-256 prefix of job_json.",
    "codec_json": "Expanded codec config, routing and tensor table (canonical JSON).",
    "codec_hash": "The 64-bit hash every message carries, hex.",
    "seed": "Job seed.",
    "dataset": "Data set name (data.dataset).",
    "initial_accuracy": "Test accuracy of the initial global model (before round 0): Acc_0 of per-bit accuracy.",
    "initial_loss": "Test loss of the initial global model.",
    "n_clients": "Number of virtual clients.",
    "n_params": "Trainable parameters of the model.",
    "param_table_json": "[[name, shape], ...] in model order.",
    "world_size": "MPI world size.",
    "mpi_library": "MPI_Get_library_version string.",
    "mpi_standard": "MPI standard version.",
    "launcher": "How the ranks were started: self (hpcfl ran mpiexec), mpiexec, or srun.",
    "slurm_json": "SLURM_* job variables (job id, array ids, nodelist, ntasks) when present.",
    "versions_json": "python, torch, numpy, h5py, mpi4py versions.",
    "git_commit": "git commit of the hpcfl source tree, or ''.",
    "command": "The command line of rank 0.",
    "resumes_json": "Present only after a resume: each hpcfl run --resume, when, and after how many rounds it "
                    "continued.",
}
