"""``hpcfl sweep``: expand a grid into job files; run them locally or write (and submit) a Slurm array."""

from __future__ import annotations

import argparse
import sys

from hpcfl.cli import register
from hpcfl.errors import UsageError


@register("sweep", "expand a parameter grid into job files; run them one by one or as a Slurm job array")
def add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="base job file (TOML); leave out to reuse DIR/sweep.json")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="one grid axis (repeatable; the first varies slowest); values are TOML, "
                        "commas inside [..] or quotes do not split")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of every point (repeatable), as in hpcfl run")
    p.add_argument("--dir", required=True, help="sweep directory (sweep.json, jobs/, runs/)")
    p.add_argument("--replace", action="store_true",
                   help="overwrite a DIR/sweep.json that describes a different sweep")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the unfinished points here, one after another")
    mode.add_argument("--slurm", action="store_true",
                      help="write DIR/sweep.sbatch, a job array over the unfinished points")
    p.add_argument("--only", metavar="N,M,...", help="only these point numbers, re-run even if complete")
    p.add_argument("--progress", choices=("auto", "tty", "plain", "off"), default="plain",
                   help="progress output of local runs (default plain)")
    s = p.add_argument_group("Slurm (with --slurm)")
    s.add_argument("--submit", action="store_true", help="submit DIR/sweep.sbatch with sbatch")
    s.add_argument("--time", default="01:00:00", help="time limit per array task (default 01:00:00)")
    s.add_argument("--max-parallel", type=int, metavar="M", help="run at most M array tasks at once (%%M)")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH line (repeatable), e.g. --sbatch=--partition=debug --sbatch=--overcommit")
    s.add_argument("--template", help="array template (default: slurm/sweep-array.sbatch of the source tree)")


def _only(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--only {text!r}: expected point numbers like 0,3,5") from None


def run(args: argparse.Namespace) -> int:
    from hpcfl.sweep import create_sweep, load_sweep, pending, point_status, run_local, submit, write_slurm_script

    if args.submit and not args.slurm:
        raise UsageError("--submit needs --slurm")
    if args.job is None:
        if args.grid or args.set:
            raise UsageError("--grid/--set need the base JOB.toml")
        sw = load_sweep(args.dir)
    else:
        if not args.grid:
            raise UsageError("give at least one --grid SECTION.KEY=V1,V2,...")
        sw = create_sweep(args.job, args.set, args.grid, args.dir, replace=args.replace)
    only = _only(args.only)
    statuses = {p.index: point_status(sw, p) for p in sw.points}
    todo = pending(sw, only)
    n_done = sum(1 for s in statuses.values() if s == "complete")
    print(f"sweep {sw.dir}: {len(sw.points)} points, {n_done} complete, {len(todo)} to run", flush=True)
    if not (args.run or args.slurm):
        for p in sw.points:
            print(f"  {p.name:<40s} {statuses[p.index]}")
        print("  (--run runs them here, --slurm writes a job array)")
        return 0
    if not todo:
        print("nothing to do: every point is complete (--only N re-runs one)")
        return 0
    running = [p.name for p in todo if statuses[p.index] == "running"]
    if running:
        print(f"hpcfl sweep: warning: {len(running)} point(s) marked running ({', '.join(running[:3])}"
              f"{', ...' if len(running) > 3 else ''}): a job may still be writing them, or was killed; "
              "they are run again", file=sys.stderr)
    if args.slurm:
        script = write_slurm_script(sw, todo, template=args.template, time_limit=args.time,
                                    max_parallel=args.max_parallel, sbatch_options=args.sbatch)
        print(f"wrote {script} (array of {len(todo)}: {', '.join(p.name for p in todo)})")
        if args.submit:
            job_id = submit(script)
            print(f"submitted job array {job_id}; logs in {sw.dir / 'logs'}; "
                  f"then: hpcfl report {sw.dir}")
        else:
            print(f"submit with: sbatch {script}")
        return 0
    results = run_local(sw, todo, progress=args.progress)
    failed = [(p, rc, st) for p, rc, st in results if rc != 0]
    print(f"sweep {sw.dir}: {len(results) - len(failed)} of {len(results)} run(s) complete"
          + (f", {n_done} skipped as complete" if only is None and n_done else ""))
    if failed:
        for p, rc, st in failed:
            print(f"  FAILED {p.name} (exit {rc}, status {st})", file=sys.stderr)
        print(f"re-run the failed points: hpcfl sweep --dir {sw.dir} --run "
              f"[--only {','.join(str(p.index) for p, _, _ in failed)}]", file=sys.stderr)
        return 1
    return 0
