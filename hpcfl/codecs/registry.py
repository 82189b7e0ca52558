"""Codec registry: id -> class, named recipes, and the ``hpcfl.codecs`` entry points.

``get_codec({"id": "topk", "ratio": 0.01})`` builds a codec; a recipe id such as
``topk_ef`` first expands to a full config (``expand``), which is what a run
log stores. Out-of-tree packages register codecs by declaring an entry point
in the group ``hpcfl.codecs`` whose object is a :class:`Codec` subclass (or a
callable that registers codecs when called). An entry point that fails to
load or register is skipped with a :class:`PluginWarning` naming it, so one
broken plugin never hides the other codecs.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from hpcfl.errors import ConfigError, UnknownCodecError

__all__ = ["register_codec", "register_recipe", "get_codec", "expand", "codec_classes", "recipes",
           "Recipe", "PluginWarning"]

_codecs: dict[str, type] = {}
_recipes: dict[str, "Recipe"] = {}
_entry_points_loaded = False


class PluginWarning(RuntimeWarning):
    """An ``hpcfl.codecs`` entry point could not be loaded or registered; it is skipped."""


@dataclass(frozen=True)
class Recipe:
    """A named shorthand: ``build(params) -> full codec config``."""

    name: str
    build: Callable[[dict], dict]
    doc: str
    params: Mapping[str, Any]  # documented defaults of the recipe's own parameters


def register_codec(cls: type) -> type:
    """Register a codec class under ``cls.codec_id`` (usable as a decorator)."""
    cid = getattr(cls, "codec_id", "")
    if not cid or not isinstance(cid, str):
        raise ValueError(f"{cls.__name__} has no codec_id")
    if cid in _codecs and _codecs[cid] is not cls:
        raise ValueError(f"codec id {cid!r} already registered by {_codecs[cid].__name__}")
    if cid in _recipes:
        raise ValueError(f"codec id {cid!r} clashes with a recipe")
    _codecs[cid] = cls
    return cls


def register_recipe(name: str, doc: str, params: Mapping[str, Any] | None = None):
    """Decorator: register ``fn(params) -> config`` as recipe ``name``."""

    def deco(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        if name in _recipes or name in _codecs:
            raise ValueError(f"recipe name {name!r} already taken")
        _recipes[name] = Recipe(name, fn, doc, dict(params or {}))
        return fn

    return deco


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group="hpcfl.codecs"):
        try:
            obj = ep.load()
            if isinstance(obj, type):
                register_codec(obj)
            elif callable(obj):
                obj()
            else:
                raise TypeError(f"{obj!r} is neither a Codec subclass nor a callable")
        except Exception as e:  # a broken plugin must not take the other codecs (or the CLI) down
            warnings.warn(f"hpcfl.codecs entry point {ep.name!r} ({ep.value}) skipped: {type(e).__name__}: {e}",
                          PluginWarning, stacklevel=3)


def _ensure_builtins() -> None:
    import hpcfl.codecs.catalog  # noqa: F401  (registers the built-in codecs and recipes)


def codec_classes() -> dict[str, type]:
    _ensure_builtins()
    _load_entry_points()
    return dict(_codecs)


def recipes() -> dict[str, Recipe]:
    _ensure_builtins()
    return dict(_recipes)


def expand(config: Mapping[str, Any], key: str = "codec") -> dict:
    """Expand recipes (recursively, also inside nested codec tables) to full configs."""
    _ensure_builtins()
    if not isinstance(config, Mapping):
        raise ConfigError(key, f"expected a codec table with an 'id', got {type(config).__name__}")
    cid = config.get("id")
    if not isinstance(cid, str):
        raise ConfigError(f"{key}.id", "a codec table needs a string 'id'")
    cfg = copy.deepcopy(dict(config))
    for _ in range(16):  # recipes may expand to recipes
        rec = _recipes.get(cfg["id"])
        if rec is None:
            break
        params = {k: v for k, v in cfg.items() if k != "id"}
        unknown = set(params) - set(rec.params)
        if unknown:
            bad = sorted(unknown)[0]
            raise ConfigError(f"{key}.{bad}", f"unknown parameter of recipe {rec.name!r}; "
                              f"allowed: {', '.join(rec.params) or '(none)'}")
        cfg = rec.build({**rec.params, **params})
    if cfg["id"] not in _codecs:
        _load_entry_points()
        if cfg["id"] not in _codecs:
            raise UnknownCodecError(f"{key}.id", cfg["id"], list(_codecs) + list(_recipes))
    cls = _codecs[cfg["id"]]
    from hpcfl.codecs.base import CodecParam

    for name, p in cls.params.items():
        if isinstance(p, CodecParam) and cfg.get(name) is not None:
            if p.many:
                if isinstance(cfg[name], list):
                    cfg[name] = [expand(c, f"{key}.{name}[{i}]") for i, c in enumerate(cfg[name])]
            else:
                cfg[name] = expand(cfg[name], f"{key}.{name}")
    return cfg


def get_codec(config: Mapping[str, Any] | str, key: str = "codec"):
    """Build a codec from a config dict (or a bare id/recipe name)."""
    if isinstance(config, str):
        config = {"id": config}
    cfg = expand(config, key)
    cls = _codecs[cfg.pop("id")]
    return cls(_key=key, **cfg)
