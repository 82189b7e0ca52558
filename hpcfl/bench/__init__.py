"""Micro-benchmarks behind ``hpcfl bench``: codec speed, size and error on one thread.

:func:`~hpcfl.bench.codecs.bench_codecs` times every codec through
:class:`~hpcfl.codecs.UpdateCodec` against a memcpy of the same tensor and
derives the break-even link bandwidth; :mod:`hpcfl.bench.data` makes the
deterministic test tensors; :mod:`hpcfl.bench.report` writes the table, the
HDF5 file (with run-file provenance) and JSON.
"""

from hpcfl.bench.codecs import DEFAULT_SIZES, all_specs, bench_codecs, breakeven, resolve_specs
from hpcfl.bench.data import KINDS, make_tensor, matrix_shape, real_gradient

__all__ = ["bench_codecs", "breakeven", "resolve_specs", "all_specs", "DEFAULT_SIZES", "make_tensor",
           "matrix_shape", "real_gradient", "KINDS"]
