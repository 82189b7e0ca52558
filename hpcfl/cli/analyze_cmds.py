"""``hpcfl analyze ANALYSIS RUN.h5``: offline analyses of run files, from a dispatch table.

Add an analysis with :func:`analysis`: a function that adds its arguments to
its sub-parser, and a ``run(args) -> int``. Usage errors (missing file, a run
without the data the analysis needs) raise ``UsageError``: exit 2, one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

from hpcfl.cli import register
from hpcfl.errors import UsageError

__all__ = ["ANALYSES", "analysis"]


@dataclass(frozen=True)
class Analysis:
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


ANALYSES: dict[str, Analysis] = {}


def analysis(name: str, help: str, run: Callable[[argparse.Namespace], int]):
    """Decorator for ``add_args(parser)``: registers analysis ``name`` with its ``run``."""

    def deco(add_args: Callable[[argparse.ArgumentParser], None]):
        if name in ANALYSES:
            raise ValueError(f"analysis {name!r} already registered")
        ANALYSES[name] = Analysis(add_args, run, help)
        return add_args

    return deco


@register("analyze", "offline analyses of a run file: " + "gradient-space, recycling, reproduction")
def add_analyze(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    sub.required = True
    for name, a in ANALYSES.items():
        sp = sub.add_parser(name, help=a.help, description=a.help)
        a.add_args(sp)


def run(args: argparse.Namespace) -> int:
    return int(ANALYSES[args.analysis].run(args) or 0)


def _emit(args: argparse.Namespace, data: dict, text: Callable[[dict], str]) -> int:
    if args.json:
        json.dump(data, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(text(data))
    return 0


# --------------------------------------------------------------- gradient-space

def _gradient_space(args: argparse.Namespace) -> int:
    from hpcfl.analysis.gradient_space import analyze, format_report

    rounds = None
    if args.rounds:
        try:
            lo, hi = (int(x) for x in args.rounds.split(":"))
        except ValueError:
            raise UsageError(f"--rounds {args.rounds!r}: expected FIRST:LAST, e.g. 0:49") from None
        rounds = (lo, hi)
    res = analyze(args.run, center=args.center, per_client=not args.no_clients, per_tensor=not args.no_tensors,
                  rounds=rounds)
    if not args.json:
        return _emit(args, res, lambda d: format_report(d, max_rows=args.rows))
    if not args.ratios:
        for d in [res["overall"], *res.get("per_client", []), *res.get("per_tensor", [])]:
            d.pop("ratios", None)
    return _emit(args, res, str)


@analysis("gradient-space", "how many principal components explain the saved updates (log.save_updates): "
          "LBGM's low-rank gradient-space observation", _gradient_space)
def _gradient_space_args(p: argparse.ArgumentParser) -> None:
    from hpcfl.analysis.gradient_space import CENTERS

    p.add_argument("run", metavar="RUN.h5", help="run file written with log.save_updates > 0")
    p.add_argument("--center", choices=CENTERS, default="vector",
                   help="vector (default): each update minus its mean coordinate, as the authors' sklearn PCA "
                        "on the coordinates x rounds matrix; none: uncentred SVD (energy shares); rounds: "
                        "classical PCA around the mean update")
    p.add_argument("--rounds", metavar="FIRST:LAST", help="only updates of these rounds (inclusive)")
    p.add_argument("--no-clients", action="store_true", help="skip the per-client spectra")
    p.add_argument("--no-tensors", action="store_true", help="skip the per-tensor spectra")
    p.add_argument("--rows", type=int, default=12, help="rows per group in the text table (default 12)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--ratios", action="store_true", help="with --json: include the top-10 ratios per group")


# -------------------------------------------------------------------- recycling

def _recycling(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcfl.analysis.recycling import (format_recycling, format_recycling_table, plot_accuracy_vs_floats,
                                          recycling_summary)

    labels = args.labels.split(",") if args.labels else [Path(p).stem for p in args.runs]
    if len(labels) != len(args.runs):
        raise UsageError(f"--labels names {len(labels)} runs, but {len(args.runs)} were given")
    summaries = [recycling_summary(p) for p in args.runs]
    if args.plot:
        print(f"wrote {plot_accuracy_vs_floats(summaries, labels, args.plot, args.title)}", file=sys.stderr)
    if args.json:
        for s in summaries:
            if not args.rounds:
                s.pop("per_round")
            json.dump(s, sys.stdout, allow_nan=False)
            sys.stdout.write("\n")
        return 0
    if len(summaries) == 1:
        print(format_recycling(summaries[0], every=max(1, args.every)))
    else:
        print(format_recycling_table(summaries, labels))
    return 0


@analysis("recycling", "per-round recycled fraction (lbgm), cumulative floats per client and root state: "
          "LBGM's accuracy vs #params-shared axes", _recycling)
def _recycling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files (one: per-round table; several: "
                   "one line each)")
    p.add_argument("--every", type=int, default=10, help="print every k-th round (default 10)")
    p.add_argument("--labels", help="comma-separated run labels (default: file names)")
    p.add_argument("--plot", metavar="PNG", help="write accuracy vs cumulative floats per client to PNG")
    p.add_argument("--title", default="", help="title of the --plot figure")
    p.add_argument("--json", action="store_true", help="one JSON object per run (summary only unless --rounds)")
    p.add_argument("--rounds", action="store_true", help="with --json: include the per-round rows")


# ----------------------------------------------------------------- reproduction

def _reproduction(args: argparse.Namespace) -> int:
    from hpcfl.analysis.reproduction import main

    return main(args)


@analysis("reproduction", "write docs/reproduction.md from the method runs of a manifest: each paper's figures "
          "(methods.md, with confidence tags) beside ours from the run files; lists runs without a file", _reproduction)
def _reproduction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="runs", help="directory the manifest's run paths are relative to (default runs)")
    p.add_argument("--manifest", default="docs/reproduction.toml", help="default docs/reproduction.toml")
    p.add_argument("--out", default="docs/reproduction.md", help="report to write (default docs/reproduction.md)")
    p.add_argument("--img", help="figure directory, owned by the report: PNGs it no longer draws are removed "
                   "once the new report is written (default: img/reproduction beside --out)")
    p.add_argument("--run-missing", action="store_true",
                   help="first run (hpcfl run, one after another) every manifest run without a complete file")
    p.add_argument("--list", action="store_true", help="only print each run's status; write nothing")
    p.add_argument("--force", action="store_true",
                   help="write the report even if fewer runs are usable than the existing report at --out was "
                        "built from (otherwise: exit 2, nothing written or removed)")
