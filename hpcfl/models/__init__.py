"""Models and flat parameter views for the FL loop.

:func:`build_model` turns the job's [model] section into a seeded, buffer-free
torch module; :mod:`hpcfl.models.params` fixes the parameter order both sides
of the wire use.
"""

from hpcfl.models.params import flat_params, load_flat_, model_numel, param_table
from hpcfl.models.zoo import MODEL_NAMES, build_model

__all__ = ["build_model", "param_table", "flat_params", "load_flat_", "model_numel", "MODEL_NAMES"]
