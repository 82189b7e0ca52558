"""Running a job: launch detection, the per-rank setup, and the root/worker round loops.

``orchestrator.run_job`` is the only place that wires training, codecs,
transport and logging together (design.md §A).
"""
