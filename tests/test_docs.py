"""Generated reference docs must match the schema they are generated from."""

from __future__ import annotations

from pathlib import Path

from hpcfl.cli.inspect_cmds import job_markdown, results_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_jobs_md_is_current():
    text = (DOCS / "jobs.md").read_text()
    assert job_markdown() in text, "docs/jobs.md is stale: regenerate with `hpcfl schema job`"


def test_results_md_is_current():
    text = (DOCS / "results.md").read_text()
    assert results_markdown() in text, "docs/results.md is stale: regenerate with `hpcfl schema results`"
