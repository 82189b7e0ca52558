"""``hpcfl codecs`` (list) — the codec command group grows with the compressor library."""

from __future__ import annotations

import argparse
import json

from hpcfl.cli import register


@register("codecs", "list every codec and recipe with its parameters and defaults")
def add_codecs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from hpcfl.codecs import codec_classes, recipes

    rows = []
    for cid, cls in sorted(codec_classes().items()):
        rows.append({"id": cid, "kind": cls.kind, "summary": cls.summary,
                     "params": {k: getattr(v, "default", None) for k, v in cls.params.items()}})
    recs = [{"id": r.name, "kind": "recipe", "summary": r.doc, "params": dict(r.params)}
            for r in recipes().values()]
    if args.json:
        print(json.dumps(rows + recs, indent=1, default=str))
        return 0
    for r in rows + sorted(recs, key=lambda r: r["id"]):
        ps = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in r["params"].items())
        print(f"{r['id']:<14} {r['kind']:<9} {r['summary']}" + (f"\n{'':<25}{ps}" if ps else ""))
    return 0
