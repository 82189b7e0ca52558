"""Load a TOML job, apply ``--set`` overrides, check every key against the schema.

The result is a :class:`Job`: a frozen, fully defaulted, JSON-able dict with
attribute access per section. Codec configs are checked later by
:func:`hpcfl.config.validate.validate_job`, which needs the codec registry.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from hpcfl.config.schema import CODEC_FIELDS, FREEFORM_SECTIONS, SCHEMA, Field
from hpcfl.errors import ConfigError

__all__ = ["Job", "load_job", "job_from_dict", "parse_override", "apply_overrides", "canonical_json"]


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces. Used for storage and hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


class _Section:
    """Read-only attribute view of one job section."""

    __slots__ = ("_name", "_d")

    def __init__(self, name: str, d: Mapping[str, Any]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_d", d)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._d[key]
        except KeyError:
            raise AttributeError(f"job section [{self._name}] has no key {key!r}") from None

    def __setattr__(self, key, value):
        raise AttributeError("job sections are read-only")

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self._d))


class Job:
    """A validated job. ``job.train.lr``; ``job.to_dict()``; ``job.hash``."""

    def __init__(self, data: dict, source: str = "<dict>"):
        self._data = data
        self.source = source

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_"):
            raise AttributeError(section)
        try:
            d = self._data[section]
        except KeyError:
            raise AttributeError(f"job has no section [{section}]") from None
        return _Section(section, d)

    @property
    def codec(self) -> dict:  # a codec config, not a section view
        return copy.deepcopy(self._data["codec"])

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def to_json(self) -> str:
        return canonical_json(self._data)

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @property
    def hash_without_rounds(self) -> str:
        """Identity of the computation: a resumed run may extend run.rounds (and change
        output/progress settings) but nothing that changes the rounds already done."""
        d = self.to_dict()
        d["run"].pop("rounds", None)
        for k in ("progress", "path", "overwrite"):
            d["log"].pop(k, None)
        return hashlib.sha256(canonical_json(d).encode()).hexdigest()[:16]

    def with_updates(self, updates: Mapping[str, Any]) -> "Job":
        """A re-validated copy with dotted-key updates applied."""
        d = self.to_dict()
        for k, v in updates.items():
            _set_dotted(d, k, v)
        return job_from_dict(d, self.source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and self._data == other._data

    def __repr__(self) -> str:
        return f"Job(source={self.source!r}, hash={self.hash})"


# ----------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; values are TOML, else a bare string."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(key or text, "an override key must be dotted, like train.lr")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(key, f"{p!r} is not a table")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``raw`` with ``section.key=value`` overrides applied."""
    d = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        if key.endswith(".id") and (key.startswith("codec.") or key.startswith("routing.dense")):
            # a new codec id replaces that whole codec table: the old parameters do not apply
            parent = key[:-3].split(".")
            cur = d
            for p in parent[:-1]:
                cur = cur.setdefault(p, {})
                if not isinstance(cur, dict):
                    raise ConfigError(key, f"{p!r} is not a table")
            cur[parent[-1]] = {"id": value}
            continue
        _set_dotted(d, key, value)
    return d


# ---------------------------------------------------------------- validation

def _type_ok(f: Field, v: Any) -> bool:
    if f.type is bool:
        return isinstance(v, bool)
    if f.type is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if f.type is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if f.type is list:
        if not isinstance(v, list):
            return False
        if f.item_type is not None:
            probe = Field(f.item_type, None, "")
            return all(_type_ok(probe, x) for x in v)
        return True
    return isinstance(v, f.type)


_INT64 = 2**63


def _check_field(key: str, f: Field, v: Any) -> Any:
    if not _type_ok(f, v):
        raise ConfigError(key, f"expected {f.describe_allowed()}, got {type(v).__name__} {v!r}")
    if f.type is float:
        try:
            v = float(v)
        except OverflowError:  # an integer beyond float range (e.g. from --set)
            v = float("inf") if v > 0 else float("-inf")
        if v != v or v in (float("inf"), float("-inf")):
            raise ConfigError(key, f"expected a finite number ({f.describe_allowed()}), got {v!r}")
    if f.type is int and not -_INT64 <= v < _INT64:  # seeds, counts and sizes are 64-bit downstream
        raise ConfigError(key, f"expected {f.describe_allowed()} that fits in 64 bits, got {v!r}")
    if f.choices is not None and v not in f.choices:
        raise ConfigError(key, f"expected {f.describe_allowed()}, got {v!r}")
    if f.min is not None and (v <= f.min if f.min_open else v < f.min):
        raise ConfigError(key, f"expected {f.describe_allowed()}, got {v!r}")
    if f.max is not None and (v >= f.max if f.max_open else v > f.max):
        raise ConfigError(key, f"expected {f.describe_allowed()}, got {v!r}")
    return copy.deepcopy(v)


def _check_codec_dict(key: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(key, f"expected a codec table with an 'id', got {type(v).__name__}")
    if "id" not in v or not isinstance(v["id"], str):
        raise ConfigError(key + ".id", "a codec table needs a string 'id'")
    return copy.deepcopy(v)


def job_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Job:
    """Check ``raw`` against the schema and fill defaults (codec content unchecked)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"a job must be a table, got {type(raw).__name__}")
    known = list(SCHEMA) + list(FREEFORM_SECTIONS)
    for section in raw:
        if section not in known:
            raise ConfigError(section, f"unknown section; allowed: {', '.join(known)}")
    out: dict[str, Any] = {}
    for section, fields in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, Mapping):
            raise ConfigError(section, f"expected a table, got {type(given).__name__}")
        for k in given:
            if k not in fields:
                raise ConfigError(f"{section}.{k}", f"unknown key; allowed: {', '.join(fields)}")
        sec = {}
        for k, f in fields.items():
            key = f"{section}.{k}"
            if k in given:
                v = given[k]
                sec[k] = _check_codec_dict(key, v) if (section, k) in CODEC_FIELDS else _check_field(key, f, v)
            else:
                sec[k] = copy.deepcopy(f.default)
        out[section] = sec
    for section, default in FREEFORM_SECTIONS.items():
        out[section] = _check_codec_dict(section, raw.get(section, default))
    _cross_checks(out)
    return Job(out, source)


def _cross_checks(d: dict) -> None:
    data, train, run = d["data"], d["train"], d["run"]
    if data["dataset"] in ("mnist", "fashion_mnist", "cifar10") and not data["path"]:
        raise ConfigError("data.path", f"dataset {data['dataset']!r} is read from disk; set data.path "
                          "to the directory holding its files")
    if data["n_clients"] < run["ranks"] - 1:
        raise ConfigError("data.n_clients", f"{data['n_clients']} clients cannot fill {run['ranks'] - 1} "
                          f"worker ranks (run.ranks = {run['ranks']}); use at least {run['ranks'] - 1} clients")
    if train["clients_per_round"] > data["n_clients"]:
        raise ConfigError("train.clients_per_round", f"{train['clients_per_round']} > data.n_clients "
                          f"({data['n_clients']})")
    if train["full_batch"] and train["algorithm"] != "fedsgd":
        raise ConfigError("train.full_batch", "only applies to train.algorithm = 'fedsgd'")
    if d["server"]["aggregate"] == "fused" and run["nonfinite"] == "drop":
        raise ConfigError("run.nonfinite", "'drop' needs each client's update on its own; with "
                          "server.aggregate = 'fused' use 'stop'")
    if data["partition"] == "natural" and data["dataset"] != "synthetic":
        raise ConfigError("data.partition", "'natural' applies only to dataset = 'synthetic' "
                          "(its devices are the clients)")
    for key in ("dense_patterns", "lossy_patterns"):
        if any(not p for p in d["routing"][key]):
            raise ConfigError(f"routing.{key}", "empty pattern")
    template = d["log"]["path"]
    try:
        template.format(name="n", time="t", job_id="j")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ConfigError("log.path", f"bad placeholder in {template!r} ({type(e).__name__}: {e}); "
                          "allowed: {name}, {time}, {job_id}") from None


def load_job(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Job:
    """Read a TOML job file, apply overrides, validate against the schema."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")  # TOML is UTF-8 whatever the locale
    except FileNotFoundError:
        raise ConfigError("", f"job file not found: {p}") from None
    except OSError as e:
        raise ConfigError("", f"cannot read job file {p}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{p}: not a TOML job file (not UTF-8 text at byte {e.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{p}: not valid TOML: {e}") from None
    raw = apply_overrides(raw, overrides)
    return job_from_dict(raw, str(p))
