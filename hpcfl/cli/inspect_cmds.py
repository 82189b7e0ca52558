"""``hpcfl report`` and ``hpcfl schema``."""

from __future__ import annotations

import argparse
import json
import math

from hpcfl.cli import register


@register("report", "summarise run files: accuracy, rounds, bytes, time by phase")
def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="HDF5 run files")
    p.add_argument("--json", action="store_true", help="one JSON object per run")


@register("schema", "print the job-file keys or the HDF5 run-file layout as Markdown")
def add_schema(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("job", "results"))


def run(args: argparse.Namespace) -> int:
    if args.command == "schema":
        print(job_markdown() if args.what == "job" else results_markdown())
        return 0
    from hpcfl.results import load_run
    from hpcfl.results.report import format_summary, summarize

    for i, path in enumerate(args.runs):
        s = summarize(load_run(path))
        if args.json:
            print(json.dumps(_nan_to_none(s), allow_nan=False))
        else:
            print(("\n" if i else "") + format_summary(s))
    return 0


def _nan_to_none(v):
    """Strict JSON: NaN/inf (e.g. accuracy of a run never evaluated) become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


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
    from hpcfl.results.schema import CLIENT_METRICS, META, RANK_METRICS, ROOT_ATTRS, ROUND_METRICS

    out = ["### Root attributes", "", "| attribute | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in ROOT_ATTRS.items()]
    for title, where, metrics in (("Per round", "`/rounds`: compound table, shape (R,)", ROUND_METRICS),
                                  ("Per round and client", "`/clients`: compound table, shape (R, C)",
                                   CLIENT_METRICS),
                                  ("Per round and rank", "`/ranks`: compound table, shape (R, W)", RANK_METRICS),
                                  ("Static", "`/meta/<name>`: datasets, shape (C,) or (W,)", META)):
        out += ["", f"### {title}: {where}", "", "| field | dtype | unit | meaning |", "|---|---|---|---|"]
        out += [f"| `{m.name}` | {m.dtype} | {m.unit} | {m.doc} |" for m in metrics]
    return "\n".join(out)
