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
from hpcfl.codecs import eblc  # noqa: F401


def _import_methods() -> None:
    """The published methods: every module in hpcfl/codecs/methods/ registers itself."""
    import importlib
    import pkgutil

    import hpcfl.codecs.methods as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"hpcfl.codecs.methods.{m.name}")


_import_methods()
