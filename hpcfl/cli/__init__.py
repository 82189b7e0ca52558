"""The ``hpcfl`` command: a registry of subcommands (mpi4py.bench style).

Usage errors (bad job file, bad codec spec, malformed message, missing file)
exit with code 2 and one line on stderr; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from hpcfl.errors import UsageError

__all__ = ["main", "register"]

_commands: dict[str, tuple[Callable, Callable, str]] = {}


def register(name: str, help: str):
    """Decorator for ``add_arguments(parser)``; the module defines ``run(args) -> int``."""

    def deco(add_args: Callable):
        mod = sys.modules[add_args.__module__]
        _commands[name] = (add_args, lambda args: mod.run(args), help)
        return add_args

    return deco


def _load_commands() -> None:
    """Import every ``hpcfl/cli/*_cmds.py`` module: each registers its commands."""
    import importlib
    import pkgutil

    import hpcfl.cli as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if m.name.endswith("_cmds") or m.name == "run_cmd":
            importlib.import_module(f"hpcfl.cli.{m.name}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    import hpcfl

    p = argparse.ArgumentParser(prog="hpcfl", description="MPI benchmark suite for gradient compression "
                                "in federated learning.")
    p.add_argument("--version", action="version", version=f"hpcfl {hpcfl.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add_args, _, help_) in _commands.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
    return p


def _environment() -> None:
    """Process settings that must precede ``import torch``.

    THP_MEM_ALLOC_ENABLE makes torch's CPU allocator ask for transparent huge pages:
    fresh 64 MiB tensors (decoded updates, casts) cost ~31 ms in page faults without
    it and ~6 ms with it on the development VM. numpy already does this by itself.
    """
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    _environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_commands[args.command][1](args) or 0)
    except UsageError as e:
        print(f"hpcfl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hpcfl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hpcfl report ... | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
