"""Imports every built-in codec module so each registers itself (one line per module)."""

from hpcfl.codecs import basic  # noqa: F401
from hpcfl.codecs import feedback  # noqa: F401
from hpcfl.codecs import pipeline  # noqa: F401
from hpcfl.codecs import cookbook  # noqa: F401
from hpcfl.codecs import sparsify  # noqa: F401
from hpcfl.codecs import dgc  # noqa: F401
from hpcfl.codecs import lowrank  # noqa: F401
from hpcfl.codecs import quantize  # noqa: F401
from hpcfl.codecs import sign  # noqa: F401
