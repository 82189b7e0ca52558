"""``hpcfl bench <action>``: micro-benchmarks (``codecs`` now; ``mpi``, ``round`` later).

Each action registers in :data:`ACTIONS` with :func:`bench_action`: a function
adding its arguments and a ``run(args) -> int``. Options shared by every
action (``--out``, ``--overwrite``, ``--json``, ``--repeat``, ``--quiet``)
come from :func:`common_parser`. Usage errors exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from hpcfl.cli import register
from hpcfl.errors import UsageError

__all__ = ["ACTIONS", "bench_action", "common_parser", "parse_sizes", "parse_codecs"]

ACTIONS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def bench_action(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Decorator for an action's ``run(args) -> int``; ``add_args(parser)`` adds its options."""

    def deco(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        ACTIONS[name] = (add_args, run, help)
        return run

    return deco


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", metavar="FILE.h5", help="write the results and provenance to this HDF5 file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print {attrs, records} as JSON instead of the table")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="timed samples per statistic (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


@register("bench", "micro-benchmarks: codecs (speed, size, error, break-even bandwidth)")
def add_bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    common = common_parser()
    for name, (add_args, _, help_) in ACTIONS.items():
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        add_args(sp)


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.action][1](args)


# ------------------------------------------------------------------ parsing

_UNITS = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30}


def parse_sizes(text: str) -> list[int]:
    """``"1024,64K,1M"`` -> ``[1024, 65536, 1048576]`` (K/M/G are powers of 1024)."""
    out = []
    for item in text.split(","):
        s = item.strip().lower()
        num = s.rstrip("kmgi")
        try:
            n = int(num) * _UNITS[s[len(num):]]
        except (ValueError, KeyError):
            raise UsageError(f"--sizes: {item.strip()!r} is not a size (e.g. 1024, 64K, 16M)") from None
        if n < 1:
            raise UsageError(f"--sizes: {item.strip()!r} must be >= 1")
        out.append(n)
    return out


def parse_codecs(text: str) -> list:
    """Comma-separated ids/recipes/``@file.json``/``all``, or one JSON config or list of configs."""
    from hpcfl.cli.codec_cmds import parse_spec

    t = text.strip()
    if t.startswith("["):
        try:
            items = json.loads(t)
        except json.JSONDecodeError as e:
            raise UsageError(f"--codecs is not valid JSON: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, dict)) for i in items):
            raise UsageError("--codecs JSON list must hold codec ids or config objects")
        return items
    if t.startswith("{"):
        return [parse_spec(t)]
    items = [i.strip() for i in t.split(",")]
    if not all(items):
        raise UsageError(f"--codecs {text!r}: empty entry in the comma-separated list")
    return [i if i == "all" else (parse_spec(i) if i.startswith("@") else i) for i in items]


def _check_out(args: argparse.Namespace) -> None:
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite or choose another --out")
    if args.repeat < 1:
        raise UsageError("--repeat must be >= 1")


# ------------------------------------------------------------------ codecs

def _add_codecs(p: argparse.ArgumentParser) -> None:
    from hpcfl.bench.data import KINDS

    p.add_argument("--codecs", default="all", metavar="SPECS",
                   help="comma-separated codec ids/recipes, 'all', or a JSON config/list (default: all)")
    p.add_argument("--sizes", default="1K,64K,1M,16M", metavar="N,N,...",
                   help="tensor sizes in elements; K/M suffixes are powers of 1024 (default 1K,64K,1M,16M)")
    p.add_argument("--data", default="gaussian", choices=KINDS, help="test tensor (default gaussian)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds before sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the test tensors")
    p.add_argument("--no-baselines", action="store_true", help="omit the memcpy/clone/torch.topk rows")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (one per size) instead")


def _progress(rec: dict) -> None:
    print(f"  {rec['n']:>9} {rec['codec'][:30]:<30} enc {rec['encode_min_s'] * 1e3:10.3f} ms  "
          f"dec {rec['decode_min_s'] * 1e3:10.3f} ms  ratio {rec['ratio']:8.2f}", file=sys.stderr, flush=True)


@bench_action("codecs", "time encode/decode of every codec vs memcpy; ratio, error, break-even bandwidth",
              _add_codecs)
def _run_codecs(args: argparse.Namespace) -> int:
    from hpcfl.bench.codecs import bench_codecs, resolve_specs
    from hpcfl.bench.report import (CODEC_FIELDS, format_codec_markdown, format_codec_table, provenance_attrs,
                                    to_json, write_h5)

    specs = resolve_specs(parse_codecs(args.codecs))
    sizes = parse_sizes(args.sizes)
    _check_out(args)
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    attrs = provenance_attrs(action="codecs", data=args.data, sizes_json=json.dumps(sizes), repeat=args.repeat,
                             warmup=args.warmup, seed=args.seed, torch_threads=1,
                             timing="derived figures use the fastest of `repeat` samples")
    records = bench_codecs(specs, sizes, data=args.data, repeat=args.repeat, warmup=args.warmup,
                           seed=args.seed, baselines=not args.no_baselines,
                           progress=None if args.quiet else _progress)
    if args.out:
        write_h5(args.out, "codecs", records, CODEC_FIELDS, attrs, overwrite=args.overwrite)
    if args.json:
        print(to_json(records, attrs))
    elif args.markdown:
        print(format_codec_markdown(records))
    else:
        print(format_codec_table(records))
    if args.out and not args.quiet:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
