"""Offline analyses of run files (no MPI): ``hpcfl analyze ANALYSIS RUN.h5``.

* :mod:`hpcfl.analysis.gradient_space` -- how many principal components span the
  saved updates (LBGM's low-rank gradient-space observation);
* :mod:`hpcfl.analysis.recycling` -- per-round recycled fraction, cumulative
  floats per client and the root's look-back memory (LBGM's plots' axes);
* :mod:`hpcfl.analysis.reproduction` -- docs/reproduction.md from the manifest
  docs/reproduction.toml and the method runs (kinds in ``reproduction_kinds``).

The command-line front end and its dispatch table are in
:mod:`hpcfl.cli.analyze_cmds`.
"""

from hpcfl.analysis.gradient_space import analyze as gradient_space, format_report
from hpcfl.analysis.recycling import format_recycling, recycling_summary

__all__ = ["gradient_space", "format_report", "recycling_summary", "format_recycling"]
