"""Every invalid job is refused before a rank starts (issue 9, item 2).

Table-driven over the schema itself, so a key added to ``hpcfl.config.schema``
is covered without editing this file: for every key, a wrong type, values
outside its range or choices, a wrong list item and (floats) a non-finite
number; unknown sections and keys; every numeric or choice parameter of every
registered codec; impossible combinations. Each must raise ``ConfigError``
(``DataError`` for missing data files) whose ``key`` is the dotted key and
whose message names the allowed values. On the command line the same jobs make
``hpcfl run`` exit with code 2 and one line, without starting mpiexec.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_job
from hpcfl.codecs import codec_classes
from hpcfl.codecs.base import CodecParam
from hpcfl.config import job_from_dict, load_job
from hpcfl.config.schema import FREEFORM_SECTIONS, SCHEMA, Field
from hpcfl.config.validate import validate_job
from hpcfl.errors import ConfigError, DataError, UsageError

# A job that validates (and would run): digits, logistic regression, 3 ranks, 6 clients.
BASE = {
    "run": {"name": "rej", "ranks": 3, "rounds": 2, "seed": 1},
    "data": {"dataset": "digits", "n_clients": 6},
    "model": {"name": "logreg"},
    "train": {"local_steps": 1, "batch_size": 8},
    "codec": {"id": "identity"},
}


def merge(base: dict, extra: dict) -> dict:
    d = copy.deepcopy(base)
    for section, table in extra.items():
        if isinstance(table, dict) and isinstance(d.get(section), dict) and section != "codec":
            d[section].update(table)
        else:
            d[section] = table
    return d


def rejected(raw: dict, *, full: bool = True) -> UsageError:
    """The error that refuses ``raw`` (schema, then full validation when ``full``)."""
    with pytest.raises(UsageError) as ei:
        job = job_from_dict(raw)
        if full:
            validate_job(job)
    return ei.value


def test_base_job_validates():
    validate_job(job_from_dict(BASE))


# ------------------------------------------------------------ invalid values per key

_WRONG_TYPE = {
    int: ["3", 2.5, True, [1]],
    float: ["0.5", True, [0.5]],
    bool: [1, "true", 0.0],
    str: [3, True, ["x"]],
    list: ["x", 3, {"a": 1}],
}


def _below(f: Field):
    if f.type is int:
        return int(f.min) if f.min_open else int(f.min) - 1
    return float(f.min) if f.min_open else float(f.min) - 0.5


def _above(f: Field):
    if f.type is int:
        return int(f.max) if f.max_open else int(f.max) + 1
    return float(f.max) if f.max_open else float(f.max) + 0.5


def invalid_values(f: Field) -> list[tuple[str, object, list[str]]]:
    """``(label, value, words the message must contain)`` for one schema field."""
    allowed = f.describe_allowed()
    out = [(f"type-{type(v).__name__}", v, [allowed]) for v in _WRONG_TYPE.get(f.type, [])]
    if f.type is list and f.item_type is not None:
        wrong = 7 if f.item_type is str else "x"
        out.append(("item-type", [wrong], [allowed]))
    if f.choices is not None:
        out.append(("choice", "bogus", ["'bogus'"] + [repr(c) for c in f.choices]))
    if f.min is not None:
        out.append(("below-min", _below(f), [allowed]))
    if f.max is not None:
        out.append(("above-max", _above(f), [allowed]))
    if f.type is float:
        out += [("inf", float("inf"), ["finite", allowed]), ("nan", float("nan"), ["finite", allowed])]
    if f.type is int:
        out.append(("int64", 2**63, [allowed, "64 bits"]))
    return out


KEY_CASES = [pytest.param(section, key, value, words, id=f"{section}.{key}-{label}")
             for section, fields in SCHEMA.items() for key, f in fields.items()
             if f.type is not dict for label, value, words in invalid_values(f)]


def test_every_schema_key_has_invalid_values():
    covered = {p.values[:2] for p in KEY_CASES}
    for section, fields in SCHEMA.items():
        for key, f in fields.items():
            if f.type is not dict:
                assert (section, key) in covered, f"{section}.{key}"


@pytest.mark.parametrize("section, key, value, words", KEY_CASES)
def test_invalid_value_names_key_and_allowed(section, key, value, words):
    e = rejected(merge(BASE, {section: {key: value}}), full=False)
    assert isinstance(e, ConfigError)
    assert e.key == f"{section}.{key}", str(e)
    msg = str(e)
    assert msg.startswith(f"{section}.{key}: ")
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("section, key, value, words", [p for p in KEY_CASES if p.id.endswith(
    ("type-str", "choice", "below-min", "above-max", "inf", "item-type"))])
def test_invalid_value_in_a_toml_file(tmp_path, section, key, value, words):
    """The same values written to a TOML job file (load_job), and as a --set override."""
    path = write_job(tmp_path / "bad.toml", merge(BASE, {section: {key: value}}))
    with pytest.raises(ConfigError) as ei:
        load_job(path)
    assert ei.value.key == f"{section}.{key}"
    for w in words:
        assert w in str(ei.value)
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and value == value:
        lit = repr(value) if not isinstance(value, str) else f'"{value}"'
        with pytest.raises(ConfigError) as ei:
            load_job(write_job(tmp_path / "good.toml", BASE), [f"{section}.{key}={lit}"])
        assert ei.value.key == f"{section}.{key}"


@pytest.mark.parametrize("value, key, words", [
    ("identity", "routing.dense", ["codec table"]),
    (3, "routing.dense", ["codec table"]),
    ({}, "routing.dense.id", ["'id'"]),
    ({"id": 3}, "routing.dense.id", ["'id'"]),
    ({"id": "nosuch"}, "routing.dense.id", ["'nosuch'", "identity", "zstd"]),
    ({"id": "identity", "bogus": 1}, "routing.dense.bogus", ["unknown parameter"]),
    ({"id": "zstd", "level": 99}, "routing.dense.level", ["<= 22"]),
    ({"id": "topk_ef"}, "routing.dense.id", ["stateful", "identity"]),
    ({"id": "flatten"}, "routing.dense.id", ["transform"]),
])
def test_invalid_dense_codec(value, key, words):
    e = rejected(merge(BASE, {"routing": {"dense": value}}))
    assert e.key == key, str(e)
    for w in words:
        assert w in str(e)


# ---------------------------------------------------------- unknown sections and keys

def test_unknown_section_names_every_section():
    e = rejected(merge(BASE, {"bogus": {"x": 1}}), full=False)
    assert e.key == "bogus"
    for s in list(SCHEMA) + list(FREEFORM_SECTIONS):
        assert s in str(e)


@pytest.mark.parametrize("section", list(SCHEMA))
def test_unknown_key_in_each_section(section):
    e = rejected(merge(BASE, {section: {"bogus_key": 1}}), full=False)
    assert e.key == f"{section}.bogus_key"
    for k in SCHEMA[section]:
        assert k in str(e)


def test_unknown_key_in_codec_section():
    e = rejected(merge(BASE, {"codec": {"id": "topk", "bogus_key": 1}}))
    assert e.key == "codec.bogus_key"
    for p in codec_classes()["topk"].params:
        assert p in str(e)


@pytest.mark.parametrize("value, key", [("topk", "codec"), ({"ratio": 0.1}, "codec.id"),
                                        ({"id": "nosuch"}, "codec.id"), ({"id": "flatten"}, "codec.id")])
def test_bad_codec_table(value, key):
    raw = merge(BASE, {})
    raw["codec"] = value
    assert rejected(raw).key == key


# ---------------------------------------------------------------- codec parameters

_INNER = {"id": "topk", "ratio": 0.1}


def _codec_base(cid: str, cls) -> tuple[dict, str]:
    """A runnable config around codec ``cid`` and the key prefix of its parameters."""
    if cls.kind == "transform":
        return {"id": "pipeline", "transforms": [{"id": cid}], "encoder": {"id": "identity"}}, "codec.transforms[0]"
    cfg: dict = {"id": cid}
    for name, p in cls.params.items():
        if isinstance(p, CodecParam) and p.required:
            cfg[name] = [dict(_INNER)] if p.many else dict(_INNER)
    return cfg, "codec"


CODEC_CASES = []
for _cid, _cls in sorted(codec_classes().items()):
    _cfg, _prefix = _codec_base(_cid, _cls)
    for _pname, _p in _cls.params.items():
        if isinstance(_p, CodecParam):
            continue
        for _label, _value, _words in invalid_values(_p):
            if _label.startswith("type-") and _label != "type-str":
                continue  # one wrong type per parameter is enough here
            CODEC_CASES.append(pytest.param(_cid, _cfg, f"{_prefix}.{_pname}", _pname, _value, _words,
                                            id=f"{_cid}.{_pname}-{_label}"))


def test_every_codec_with_a_checked_parameter_is_covered():
    ids = {p.values[0] for p in CODEC_CASES}
    for cid, cls in codec_classes().items():
        checked = [p for p in cls.params.values() if isinstance(p, Field) and
                   (p.choices is not None or p.min is not None or p.max is not None)]
        if checked:
            assert cid in ids, cid


@pytest.mark.parametrize("cid, cfg, key, pname, value, words", CODEC_CASES)
def test_codec_parameter_out_of_range(cid, cfg, key, pname, value, words):
    cfg = copy.deepcopy(cfg)
    if key.startswith("codec.transforms[0]"):
        cfg["transforms"][0][pname] = value
    else:
        cfg[pname] = value
    raw = merge(BASE, {})
    raw["codec"] = cfg
    e = rejected(raw)
    assert isinstance(e, ConfigError)
    assert e.key == key, str(e)
    for w in words:
        assert w in str(e), (w, str(e))


def test_nested_and_recipe_codec_parameters():
    raw = merge(BASE, {})
    raw["codec"] = {"id": "ef", "inner": {"id": "qsgd", "levels": 0}}
    e = rejected(raw)
    assert e.key == "codec.inner.levels" and ">= 1" in str(e)
    raw["codec"] = {"id": "topk_ef", "ratio": 2.0}  # a recipe: the key names the expanded config
    e = rejected(raw)
    assert e.key.endswith(".ratio") and "<= 1" in str(e)
    raw["codec"] = {"id": "topk_ef", "bogus": 1}
    e = rejected(raw)
    assert e.key == "codec.bogus" and "ratio" in str(e)


# ------------------------------------------------------------ impossible combinations

COMBOS = [
    # more worker ranks than clients
    ("ranks>clients", {"run": {"ranks": 8}, "data": {"n_clients": 6}}, "data.n_clients", ["run.ranks = 8"]),
    ("clients_per_round>n_clients", {"train": {"clients_per_round": 7}}, "train.clients_per_round",
     ["data.n_clients", "6"]),
    ("full_batch-fedavg", {"train": {"full_batch": True}}, "train.full_batch", ["fedsgd"]),
    ("natural-digits", {"data": {"partition": "natural"}}, "data.partition", ["synthetic"]),
    ("shards-c>classes", {"data": {"partition": "shards", "classes_per_client": 11}}, "data.classes_per_client",
     ["10 classes"]),
    ("shards-c>synthetic_classes", {"data": {"dataset": "synthetic", "partition": "shards", "classes_per_client": 4,
                                             "synthetic_classes": 3}, "model": {"name": "logreg"}},
     "data.classes_per_client", ["3 classes"]),
    ("shards-leave-a-class", {"data": {"partition": "shards", "classes_per_client": 1}}, "data.classes_per_client",
     ["of 10 classes"]),
    ("clients>samples", {"data": {"n_clients": 5000}}, "data.n_clients", ["training samples"]),
    ("clients>samples-dirichlet", {"data": {"n_clients": 5000, "partition": "dirichlet"}}, "data.n_clients",
     ["training samples"]),
    ("mnist-no-path", {"data": {"dataset": "mnist"}}, "data.path", ["data.path"]),
    ("cifar10-no-path", {"data": {"dataset": "cifar10"}}, "data.path", ["data.path"]),
    ("cnn2-synthetic", {"data": {"dataset": "synthetic"}, "model": {"name": "cnn2"}}, "model.name", ["'logreg'"]),
    ("bad-log-path", {"log": {"path": "runs/{nmae}.h5"}}, "log.path", ["{name}", "{time}", "{job_id}"]),
    ("huge-mlp", {"model": {"name": "mlp", "hidden": [2**40]}}, "model.hidden", ["parameters"]),
    ("huge-synthetic-dim", {"data": {"dataset": "synthetic", "synthetic_dim": 10**10}}, "data.synthetic_dim",
     ["parameters"]),
    ("seed-beyond-64-bits", {"run": {"seed": 2**64}}, "run.seed", ["64 bits"]),
    ("empty-routing-pattern", {"routing": {"dense_patterns": ["*.bias", ""]}}, "routing.dense_patterns",
     ["empty pattern"]),
]


@pytest.mark.parametrize("extra, key, words", [pytest.param(*c[1:], id=c[0]) for c in COMBOS])
def test_impossible_combination(extra, key, words):
    e = rejected(merge(BASE, extra))
    assert isinstance(e, ConfigError)
    assert e.key == key, str(e)
    for w in words:
        assert w in str(e), (w, str(e))


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_data_files_name_path_and_file(tmp_path, dataset):
    from hpcfl.data.cifar import CIFAR_FILES
    from hpcfl.data.idx import IDX_FILES

    for path in (tmp_path / "nonexistent", tmp_path):  # no such directory; a directory without the files
        e = rejected(merge(BASE, {"data": {"dataset": dataset, "path": str(path)}}))
        assert isinstance(e, DataError)
        first = CIFAR_FILES[0] if dataset == "cifar10" else IDX_FILES[0]
        assert "data.path" in str(e) and first in str(e) and str(path) in str(e), str(e)


# ------------------------------------------------------------- hpcfl run, in-process

_LAUNCH_ENV = ("PMI", "PMIX", "OMPI_", "SLURM_", "HYDI", "MPI_", "MV2_", "I_MPI")


@pytest.fixture
def no_launch(monkeypatch):
    """Not under any MPI launcher (hpcfl would start mpiexec), and starting it fails the test."""
    import hpcfl.cli.run_cmd as run_cmd

    for k in list(os.environ):
        if k.startswith(_LAUNCH_ENV):
            monkeypatch.delenv(k)
    calls = []

    def spawn(*a, **k):
        calls.append(a)
        raise AssertionError(f"mpiexec started: {a}")

    monkeypatch.setattr(run_cmd.subprocess, "call", spawn)
    monkeypatch.setattr(run_cmd.subprocess, "run", spawn)
    monkeypatch.setattr(run_cmd.subprocess, "Popen", spawn)
    return calls


def _main(args) -> tuple[int, str]:
    from hpcfl.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


@pytest.mark.parametrize("extra, key, words", [pytest.param(*c[1:], id=c[0]) for c in COMBOS])
def test_run_refuses_before_mpiexec(tmp_path, no_launch, extra, key, words):
    job = write_job(tmp_path / "bad.toml", merge(BASE, extra))
    out = tmp_path / "out.h5"
    rc, err = _main(["run", job, "--out", out])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and key in lines[0], err
    assert lines[0].startswith("hpcfl run: error: ")
    assert not no_launch and not out.exists()


def test_run_refuses_existing_output_without_overwrite(tmp_path, no_launch):
    job = write_job(tmp_path / "good.toml", BASE)
    out = tmp_path / "out.h5"
    out.write_bytes(b"earlier run")
    rc, err = _main(["run", job, "--out", out])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0], err
    assert out.read_bytes() == b"earlier run" and not no_launch
    # the same through log.path
    job = write_job(tmp_path / "good2.toml", merge(BASE, {"log": {"path": str(out)}}))
    rc, err = _main(["run", job])
    assert rc == 2 and "--overwrite" in err and not no_launch


def test_validate_command_refuses_with_one_line(tmp_path):
    for extra, key in ((COMBOS[0][1], COMBOS[0][2]), ({"train": {"lr": -1.0}}, "train.lr")):
        rc, err = _main(["validate", write_job(tmp_path / "bad.toml", merge(BASE, extra))])
        assert rc == 2 and len(err.strip().splitlines()) == 1 and key in err


# ------------------------------------------------------------------ hpcfl run, real process

SUBPROCESS = [
    ("type", {"run": {"rounds": "ten"}}, "run.rounds"),
    ("range", {"train": {"lr": 0.0}}, "train.lr"),
    ("choice", {"data": {"partition": "random"}}, "data.partition"),
    ("unknown-key", {"train": {"learning_rate": 0.1}}, "train.learning_rate"),
    ("unknown-section", {"trainer": {"lr": 0.1}}, "trainer"),
    ("ranks>clients", {"run": {"ranks": 8}}, "data.n_clients"),
    ("codec-param", {"codec": {"id": "topk", "ratio": 1.5}}, "codec.ratio"),
    ("codec-choice", {"codec": {"id": "uniform", "bits": 3}}, "codec.bits"),
    ("mnist-missing-files", {"data": {"dataset": "mnist", "path": "/nonexistent/mnist"}}, "data.path"),
    ("clients>samples", {"data": {"n_clients": 5000}}, "data.n_clients"),
]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def validate_seconds(tmp_path_factory) -> float:
    """Wall time of ``hpcfl validate`` on a good job here: the same imports and checks as a refused
    ``hpcfl run``, without MPI (scales the time bound below to the machine's load)."""
    d = tmp_path_factory.mktemp("baseline")
    job = write_job(d / "good.toml", BASE)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "hpcfl", "validate", str(job)], capture_output=True, text=True,
                       cwd=d, env=_clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0


@pytest.mark.parametrize("extra, key", [pytest.param(c[1], c[2], id=c[0]) for c in SUBPROCESS])
def test_run_subprocess_exits_2_before_mpiexec(tmp_path, validate_seconds, extra, key):
    job = write_job(tmp_path / "bad.toml", merge(BASE, extra))
    out = tmp_path / "out.h5"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "hpcfl", "run", str(job), "--out", str(out)], capture_output=True,
                       text=True, cwd=tmp_path, env=_clean_env(), timeout=120)
    elapsed = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("hpcfl run: error: ") and key in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and not list(Path(tmp_path).rglob("*.h5"))  # rank 0 would have created it
    # under 10 s on an idle machine; mpiexec plus rank start-up would take several times `validate`
    assert elapsed < max(10.0, 2 * validate_seconds + 5), f"{elapsed:.1f} s: did mpiexec start?"
