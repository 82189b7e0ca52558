"""HDF5 run files: schema, writer (root only), reader and report. No MPI, no training code."""

from hpcfl.results.reader import Run, load_run

__all__ = ["Run", "load_run"]
