"""``hpcfl bench <action>``: micro-benchmarks (``codecs``, ``mpi``, ``round``).

Each action registers in :data:`ACTIONS` with :func:`bench_action`: a function
adding its arguments and a ``run(args) -> int``. Options shared by every
action (``--out``, ``--overwrite``, ``--json``, ``--repeat``, ``--quiet``)
come from :func:`common_parser`. Usage errors exit with code 2 and one line.

``mpi`` and ``round`` run inside MPI ranks. Outside MPI they start themselves as
``mpiexec -n RANKS python -m mpi4py -m hpcfl bench ACTION ...`` (as ``hpcfl run``
does: the mpiexec beside the interpreter, abort on an exception in any rank);
under ``mpiexec`` or ``srun`` they run in the existing world. Rank 0 alone
prints and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from hpcfl.cli import register
from hpcfl.errors import UsageError

__all__ = ["ACTIONS", "bench_action", "common_parser", "parse_sizes", "parse_pow2_sizes", "parse_codecs"]

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


@register("bench", "micro-benchmarks: codecs (speed, size, error, break-even bandwidth), mpi (OSU-style "
          "latency/bandwidth/gather), round (compressed gather vs bare Gatherv)")
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


def parse_pow2_sizes(text: str, option: str = "--sizes") -> list[int]:
    """Comma-separated sizes and ranges: ``"1..16M"`` is every power of two from 1 B to 16 MiB,
    ``"1K..16M*4"`` every 4th (1K, 4K, 16K, ...); ``"8,1M"`` a list."""
    out: list[int] = []
    for item in text.split(","):
        it = item.strip()
        if ".." not in it:
            out += parse_sizes(it)
            continue
        lo_s, hi_s = it.split("..", 1)
        step = 2
        if "*" in hi_s:
            hi_s, step_s = hi_s.split("*", 1)
            try:
                step = int(step_s)
            except ValueError:
                raise UsageError(f"{option}: {it!r}: the step after '*' must be an integer") from None
        (lo,), (hi,) = parse_sizes(lo_s), parse_sizes(hi_s)
        if step < 2 or step & (step - 1) or lo & (lo - 1) or hi & (hi - 1) or hi < lo:
            raise UsageError(f"{option}: {it!r}: a range runs between powers of two, low to high, "
                             "with a power-of-two step (e.g. 1..16M or 1K..16M*4)")
        n = lo
        while n <= hi:
            out.append(n)
            n *= step
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


# ------------------------------------------------------------------ MPI actions: launching

def _launch_args(p: argparse.ArgumentParser, ranks: int) -> None:
    p.add_argument("--ranks", type=int, default=ranks, metavar="N",
                   help=f"MPI ranks when hpcfl starts mpiexec itself (default {ranks}); ignored under "
                        "mpiexec/srun")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead")
    p.add_argument("--no-launch", action="store_true", help="never start mpiexec; use this process's MPI world")
    p.add_argument("--launcher", default=None, help=argparse.SUPPRESS)


def _argv_of(args: argparse.Namespace, add_args: Callable[[argparse.ArgumentParser], None]) -> list[str]:
    """The command-line options of ``args`` again (for the ranks' command line)."""
    p = argparse.ArgumentParser(add_help=False, parents=[common_parser()])
    add_args(p)
    out: list[str] = []
    for a in p._actions:
        if not a.option_strings or a.dest in ("launcher", "no_launch", "ranks", "help"):
            continue
        v = getattr(args, a.dest, None)
        if isinstance(a, argparse._StoreTrueAction):
            if v:
                out.append(a.option_strings[0])
        elif v is not None:
            out += [a.option_strings[0], str(v)]
    return out


def _self_launch(action: str, args: argparse.Namespace) -> int | None:
    """Start ``mpiexec`` unless already in an MPI job (or ``--no-launch``); its exit code, else None."""
    from hpcfl.run.launch import detect_launcher, mpiexec_path

    if args.launcher or args.no_launch or detect_launcher() is not None:
        return None
    if args.ranks < 2:
        raise UsageError("--ranks must be >= 2 (rank 0 measures against the others)")
    cmd = [str(mpiexec_path()), "-n", str(args.ranks), sys.executable, "-m", "mpi4py", "-m", "hpcfl", "bench",
           action, *_argv_of(args, ACTIONS[action][0]), "--launcher", "self"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # see hpcfl.cli._environment
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"hpcfl bench {action}: the MPI job exited with code {rc}", file=sys.stderr)
    return rc


def _in_mpi(action: str, body: Callable[[object], None]) -> int:
    """Run ``body(comm)`` on every rank; any failure ends every rank (usage errors: code 2)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        from hpcfl.run.launch import check_slurm_world

        check_slurm_world(size)
        body(comm)
        return 0
    except UsageError as e:
        if rank == 0:
            print(f"hpcfl bench {action}: error: {e}", file=sys.stderr, flush=True)
        if size > 1:
            comm.Abort(2)
        return 2
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        print(f"hpcfl bench {action}: rank {rank}/{size} failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        if size > 1:
            comm.Abort(1)
        return 1


def _mpi_attrs(comm, action: str, args: argparse.Namespace, **extra) -> dict:
    """Provenance of a run file (versions, git, command, MPI library, launcher, Slurm) plus host facts."""
    from hpcfl.bench.report import provenance_attrs
    from hpcfl.run import provenance

    return provenance_attrs(action=action, launcher=args.launcher or "mpiexec",
                            slurm_json=provenance.as_json(provenance.slurm_vars()),
                            **provenance.mpi_facts(comm), **extra)


def _emit(args: argparse.Namespace, table: str, records: list, fields: dict, attrs: dict,
          text: Callable[[list], str], markdown: Callable[[list], str]) -> None:
    from hpcfl.bench.report import to_json, write_h5

    if args.out:
        write_h5(args.out, table, records, fields, attrs, overwrite=args.overwrite)
    if args.json:
        print(to_json(records, attrs), flush=True)
    elif args.markdown:
        print(markdown(records), flush=True)
    else:
        print(text(records), flush=True)
    if args.out and not args.quiet:
        print(f"wrote {args.out}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ mpi

def _add_mpi(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tests", default="pingpong,bw,gather", metavar="T,T",
                   help="pingpong (latency + bandwidth), bw (OSU windowed), gather (default: all three)")
    p.add_argument("--apis", default="buffer,pickle", metavar="A,A",
                   help="buffer (numpy, uppercase calls), pickle (lowercase), pkl5 (out-of-band pickle); "
                        "default buffer,pickle")
    p.add_argument("--sizes", default="1..16M", metavar="SIZES",
                   help="message sizes in bytes: list and/or power-of-two ranges, K/M = 1024/1024^2 "
                        "(default 1..16M: 1 B to 16 MiB, every power of two)")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="warm-up iterations below 8 KiB (a tenth from 8 KiB); default OSU's per test")
    p.add_argument("--iters", type=int, default=None, metavar="N",
                   help="timed iterations below 8 KiB (a tenth from 8 KiB); default OSU's per test")
    p.add_argument("--budget", type=float, default=0.2, metavar="S",
                   help="cap iterations so that one point takes about S seconds (default 0.2; 0: no cap)")
    p.add_argument("--window", type=int, default=64, metavar="N", help="messages in flight for bw (default 64)")
    _launch_args(p, 2)


def _names(text: str, known: tuple, option: str) -> list[str]:
    items = [i.strip() for i in text.split(",") if i.strip()]
    bad = [i for i in items if i not in known]
    if bad or not items:
        raise UsageError(f"{option}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(known)}")
    return items


@bench_action("mpi", "OSU-style ping-pong latency/bandwidth, windowed bandwidth and gather; buffer vs pickle",
              _add_mpi)
def _run_mpi(args: argparse.Namespace) -> int:
    from hpcfl.bench.mpi import APIS, TESTS

    tests = _names(args.tests, TESTS, "--tests")
    apis = _names(args.apis, APIS, "--apis")
    sizes = parse_pow2_sizes(args.sizes)
    _check_out(args)
    for opt in ("warmup", "iters"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise UsageError(f"--{opt} must be >= 1")
    if args.window < 1 or args.budget < 0:
        raise UsageError("--window must be >= 1 and --budget >= 0")
    rc = _self_launch("mpi", args)
    if rc is not None:
        return rc

    def body(comm) -> None:
        from hpcfl.bench.mpi import MPI_FIELDS, UNITS_NOTE, bench_mpi, format_mpi_markdown, format_mpi_table

        if comm.Get_size() < 2:
            raise UsageError("hpcfl bench mpi needs at least 2 ranks (run it outside MPI with --ranks, "
                             "or under mpiexec -n 2 or more)")
        progress = None
        if not args.quiet and comm.Get_rank() == 0:
            def progress(r: dict) -> None:
                print(f"  {r['test']:<8} {r['api']:<6} {r['size']:>9} B  median {r['t_median_s'] * 1e6:10.2f} us  "
                      f"{r['MBps_median']:10.1f} MB/s  ({r['iters']} iters)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        records = bench_mpi(comm, tests, apis, sizes, warmup=args.warmup, iters=args.iters, budget=args.budget,
                            window=args.window, progress=progress)
        if comm.Get_rank() == 0:
            attrs = _mpi_attrs(comm, "mpi", args, tests_json=json.dumps(tests), apis_json=json.dumps(apis),
                               sizes_json=json.dumps(sizes), budget_s=args.budget, window=args.window,
                               elapsed_s=time.perf_counter() - t0, units=UNITS_NOTE,
                               timing="min/median/max over iterations, each timed on its own (MPI.Wtime)")
            _emit(args, "mpi", records, MPI_FIELDS, attrs, format_mpi_table, format_mpi_markdown)

    return _in_mpi("mpi", body)


# ------------------------------------------------------------------ round

def _add_round(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codecs", default="identity,fp16,topk_ef,qsgd_zstd", metavar="SPECS",
                   help="comma-separated codec ids/recipes or a JSON config/list "
                        "(default identity,fp16,topk_ef,qsgd_zstd)")
    p.add_argument("--sizes", default="1K..16M*4", metavar="SIZES",
                   help="raw float32 bytes per client: list and/or power-of-two ranges, K/M = 1024/1024^2 "
                        "(default 1K..16M*4: 1K, 4K, ..., 16M)")
    p.add_argument("--clients-per-rank", type=int, default=1, metavar="N", help="clients per worker rank")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds per point (default 1)")
    p.add_argument("--budget", type=float, default=0.3, metavar="S",
                   help="seconds of gathers per point; sets the gather pairs per round (default 0.3)")
    p.add_argument("--max-gathers", type=int, default=50, metavar="N",
                   help="at most N hpcfl/bare gather pairs per round (default 50)")
    p.add_argument("--poll-interval", type=float, default=0.0002, metavar="S",
                   help="hpcfl transport's run.poll_interval (default 0.0002; 0 = block inside MPI)")
    p.add_argument("--recv-buffers", type=int, default=2, metavar="N",
                   help="receive buffers the transport's root reuses (default 2; 0 = a fresh buffer per "
                        "gather, as before the reuse)")
    p.add_argument("--data", default="gaussian", choices=("gaussian", "heavy", "lowrank", "real"),
                   help="test tensor (default gaussian)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test tensors")
    _launch_args(p, 4)


@bench_action("round", "the compressed gather: encode, gather to root, decode vs bare mpi4py Gatherv",
              _add_round)
def _run_round(args: argparse.Namespace) -> int:
    from hpcfl.bench.codecs import resolve_specs

    specs = resolve_specs(parse_codecs(args.codecs))
    sizes = parse_pow2_sizes(args.sizes)
    bad = [s for s in sizes if s % 4]
    if bad:
        raise UsageError(f"--sizes: {bad[0]} is not a whole number of float32 values (a multiple of 4 bytes)")
    _check_out(args)
    if args.clients_per_rank < 1 or args.warmup < 1 or args.max_gathers < 1:
        raise UsageError("--clients-per-rank, --warmup and --max-gathers must be >= 1")
    if args.budget < 0 or args.poll_interval < 0 or args.recv_buffers < 0:
        raise UsageError("--budget, --poll-interval and --recv-buffers must be >= 0")
    rc = _self_launch("round", args)
    if rc is not None:
        return rc

    def body(comm) -> None:
        from hpcfl.bench.round import ROUND_FIELDS, UNITS_NOTE, bench_round, format_round_markdown, \
            format_round_table

        if comm.Get_size() < 2:
            raise UsageError("hpcfl bench round needs at least 2 ranks (root + workers)")
        progress = None
        if not args.quiet and comm.Get_rank() == 0:
            def progress(r: dict) -> None:
                print(f"  {r['size']:>9} B {r['codec'][:20]:<20} enc {r['encode_median_s'] * 1e3:8.3f} ms  "
                      f"gather {r['gather_median_s'] * 1e3:8.3f} ms  bare {r['bare_median_s'] * 1e3:8.3f} ms  "
                      f"dec {r['decode_median_s'] * 1e3:8.3f} ms  gather/bare {100 * r['gather_vs_bare']:5.1f}%",
                      file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        records = bench_round(comm, specs, sizes, clients_per_rank=args.clients_per_rank, repeat=args.repeat,
                              warmup=args.warmup, budget=args.budget, max_gathers=args.max_gathers,
                              poll_interval=args.poll_interval, recv_buffers=args.recv_buffers, data=args.data,
                              seed=args.seed, progress=progress)
        if comm.Get_rank() == 0:
            attrs = _mpi_attrs(comm, "round", args, codecs_json=json.dumps([c for _, c in specs]),
                               sizes_json=json.dumps(sizes), clients_per_rank=args.clients_per_rank,
                               repeat=args.repeat, warmup=args.warmup, budget_s=args.budget,
                               poll_interval=args.poll_interval, recv_buffers=args.recv_buffers,
                               data=args.data, seed=args.seed, torch_threads=1,
                               elapsed_s=time.perf_counter() - t0, units=UNITS_NOTE,
                               timing="samples: max over ranks (MPI.Wtime); derived figures use medians")
            _emit(args, "round", records, ROUND_FIELDS, attrs, format_round_table, format_round_markdown)

    return _in_mpi("round", body)
