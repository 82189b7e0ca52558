"""hpcfl: an MPI benchmark suite for gradient compression in federated learning.

Rank 0 aggregates, ranks 1..N-1 host virtual clients; updates travel as real
bytes through a pluggable codec pipeline, and every phase is timed and logged
to one HDF5 file per run.
"""

__version__ = "0.1.0"
