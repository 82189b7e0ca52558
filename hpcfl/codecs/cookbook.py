"""Named recipes: short ids that expand to full codec configs.

A run log stores the expanded config, never the alias (design.md §C).
"""

from __future__ import annotations

from hpcfl.codecs.registry import register_recipe


@register_recipe("fp16_zstd", "fp16 values, then zstd where it pays", {"level": 3})
def _fp16_zstd(p: dict) -> dict:
    return {"id": "pipeline", "encoder": {"id": "fp16"}, "bytes": [{"id": "zstd", "level": p["level"]}]}
