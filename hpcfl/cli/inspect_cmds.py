"""``hpcfl report`` and ``hpcfl schema``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcfl.cli import register


@register("report", "summarise a run file, or compare several runs or a sweep directory in one table")
def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN.h5|DIR",
                   help="HDF5 run files, sweep directories, or directories holding run files")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per run (JSON Lines)")
    out.add_argument("--csv", action="store_true", help="one CSV line per run, with a header")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="target accuracy for rounds/bytes to target (default with several runs: the best "
                        "accuracy every run reached, floored to 0.01)")
    p.add_argument("--plot", metavar="DIR", help="write PNG figures into DIR")


@register("merge", "collect a sweep (or run files) into one summary file: .csv, .json or .h5")
def add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="DIR|RUN.h5", help="sweep directory, or run files")
    p.add_argument("-o", "--out", required=True, help="summary file: .csv, .json (JSON Lines) or .h5")
    p.add_argument("--target", type=float, metavar="ACC", help="target accuracy (as in hpcfl report)")


@register("schema", "print the job-file keys or the HDF5 run-file layout as Markdown")
def add_schema(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("job", "results"))


def run(args: argparse.Namespace) -> int:
    if args.command == "schema":
        print(job_markdown() if args.what == "job" else results_markdown())
        return 0
    if args.command == "merge":
        return _merge(args)
    return _report(args)


def _collect(args):
    import sys

    from hpcfl.results.compare import collect, default_target

    entries, skipped = collect(args.runs)
    for msg in skipped:
        print(f"hpcfl {args.command}: skipped {msg}", file=sys.stderr)
    if args.target is not None and not 0.0 <= args.target <= 1.0:
        from hpcfl.errors import UsageError

        raise UsageError(f"--target {args.target}: an accuracy between 0 and 1")
    target = args.target
    if target is None and len(entries) > 1:
        target = default_target([e.run for e in entries])
    return entries, target


def _report(args) -> int:
    import sys

    from hpcfl.results.compare import compare, format_table, rounds_to_target, to_csv, to_json_lines
    from hpcfl.results.report import format_summary

    entries, target = _collect(args)
    rows = compare(entries, target)
    single = len(entries) == 1 and len(args.runs) == 1 and not Path(args.runs[0]).is_dir()
    if args.json:
        sys.stdout.write(to_json_lines(rows))
    elif args.csv:
        sys.stdout.write(to_csv(rows))
    elif single:
        print(format_summary(rows[0]))
        if target is not None:
            n = rounds_to_target(entries[0].run, target)
            print(f"  target accuracy {target:.4g}: " + ("not reached" if n is None else
                  f"after {n} rounds, {rows[0]['uplink_bytes_to_target']} uplink bytes, "
                  f"{rows[0]['wall_s_to_target']:.2f} s"))
    else:
        print(format_table(rows, target))
    if args.plot:
        from hpcfl.results.plots import plot_all

        for p in plot_all(entries, args.plot, target):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def _merge(args) -> int:
    from hpcfl.results.compare import compare
    from hpcfl.results.merge import write_summary

    entries, target = _collect(args)
    sweep_json = ""
    if len(args.runs) == 1 and (Path(args.runs[0]) / "sweep.json").exists():
        sweep_json = (Path(args.runs[0]) / "sweep.json").read_text()
    out = write_summary(compare(entries, target), entries, args.out, target=target, sweep_json=sweep_json)
    print(f"wrote {out}: {len(entries)} runs" + (f", target accuracy {target:.4g}" if target is not None else ""))
    return 0


def job_markdown() -> str:
    from hpcfl.config.schema import FREEFORM_SECTIONS, SCHEMA

    out = ["| key | type / allowed | default | meaning |", "|---|---|---|---|"]
    for sec, fields in SCHEMA.items():
        for k, f in fields.items():
            out.append(f"| `{sec}.{k}` | {f.describe_allowed()} | `{json.dumps(f.default)}` | {f.doc} |")
    for sec, default in FREEFORM_SECTIONS.items():
        out.append(f"| `[{sec}]` | codec table (`id` + parameters) | `{json.dumps(default)}` | "
                   "The codec for lossy-routed tensors; see docs/codecs.md. |")
    return "\n".join(out)


def results_markdown() -> str:
    from hpcfl.results.schema import (CALIBRATION_ATTRS, CALIBRATION_FIELDS, CLIENT_METRICS, META, RANK_METRICS,
                                      ROOT_ATTRS, ROUND_METRICS)

    out = ["### Root attributes", "", "| attribute | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in ROOT_ATTRS.items()]
    for title, where, metrics in (("Per round", "`/rounds`: compound table, shape (R,)", ROUND_METRICS),
                                  ("Per round and client", "`/clients`: compound table, shape (R, C)",
                                   CLIENT_METRICS),
                                  ("Per round and rank", "`/ranks`: compound table, shape (R, W)", RANK_METRICS),
                                  ("Static", "`/meta/<name>`: datasets, shape (C,) or (W,)", META)):
        out += ["", f"### {title}: {where}", "", "| field | dtype | unit | meaning |", "|---|---|---|---|"]
        out += [f"| `{m.name}` | {m.dtype} | {m.unit} | {m.doc} |" for m in metrics]
    out += ["", "### Network calibration: `/calibration` (group; only with `run.calibrate`)", "",
            "Measured once before round 0 by every rank (`hpcfl.bench.mpi.calibrate`, about `run.calibrate_s` "
            "seconds). A resumed run that calibrates again adds `/calibration/resume_<k>` with the same layout. "
            "Read it as `load_run(p).calibration`; `hpcfl report RUN.h5` prints it.", "",
            "| attribute | unit | meaning |", "|---|---|---|"]
    out += [f"| `{k}` | {u} | {d} |" for k, (u, d) in CALIBRATION_ATTRS.items()]
    out += ["", "`/calibration/table`: compound dataset, one row per (peer, size) ping-pong, then the gather.", "",
            "| field | dtype | unit | meaning |", "|---|---|---|---|"]
    out += [f"| `{m.name}` | {m.dtype} | {m.unit} | {m.doc} |" for m in CALIBRATION_FIELDS]
    return "\n".join(out)
