"""hpcfl.config: TOML loading, defaults, validation errors, overrides, cross-checks, hashing, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcfl.config import apply_overrides, canonical_json, job_from_dict, load_job, parse_override
from hpcfl.config.schema import FREEFORM_SECTIONS, SCHEMA
from hpcfl.config.validate import validate_job
from hpcfl.errors import ConfigError, UnknownCodecError, UsageError

GOOD_TOML = """
[run]
name = "cfgtest"
rounds = 3
ranks = 3
seed = 5

[data]
dataset = "digits"
n_clients = 4

[model]
name = "logreg"

[train]
lr = 0.1
local_steps = 2

[codec]
id = "identity"
"""


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def err(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        job_from_dict(raw)
    return ei.value


# ------------------------------------------------------------------ loading

def test_load_fills_every_default(tmp_path):
    job = load_job(write(tmp_path, GOOD_TOML))
    d = job.to_dict()
    assert set(d) == set(SCHEMA) | set(FREEFORM_SECTIONS)
    for section, fields in SCHEMA.items():
        assert set(d[section]) == set(fields), section
    # given values are kept, the rest are the schema defaults
    assert job.run.name == "cfgtest" and job.run.rounds == 3 and job.run.seed == 5
    assert job.train.lr == 0.1 and job.train.local_steps == 2
    assert job.train.batch_size == SCHEMA["train"]["batch_size"].default
    assert job.server.weighting == SCHEMA["server"]["weighting"].default
    assert job.routing.dense == {"id": "identity"}
    assert job.codec == {"id": "identity"}
    assert job.source == str(tmp_path / "job.toml")


def test_empty_job_is_all_defaults():
    job = job_from_dict({})
    for section, fields in SCHEMA.items():
        for k, f in fields.items():
            assert job.to_dict()[section][k] == f.default, f"{section}.{k}"
    assert job.codec == FREEFORM_SECTIONS["codec"]


def test_int_given_for_float_becomes_float():
    job = job_from_dict({"train": {"lr": 1}})
    assert job.train.lr == 1.0 and isinstance(job.train.lr, float)


def test_sections_are_read_only_and_copies():
    job = job_from_dict({"model": {"hidden": [8, 4]}})
    with pytest.raises(AttributeError):
        job.train.lr = 3.0
    with pytest.raises(AttributeError, match="no key"):
        job.train.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no section"):
        job.nosection  # noqa: B018
    d = job.to_dict()
    d["model"]["hidden"].append(99)
    c = job.codec
    c["id"] = "fp16"
    assert job.model.hidden == [8, 4] and job.codec == {"id": "identity"}


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(write(tmp_path, "[run\nrounds = 3"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_job(tmp_path)  # a directory
    binary = tmp_path / "run.h5"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n\0\0")
    with pytest.raises(ConfigError, match="not a TOML job file"):
        load_job(binary)


def test_job_file_is_utf8(tmp_path):
    p = tmp_path / "job.toml"
    p.write_bytes('[run]\nname = "état-β"\n'.encode("utf-8"))
    assert load_job(p).run.name == "état-β"


# --------------------------------------------------------------- errors

def test_unknown_section():
    e = err({"trian": {"lr": 0.1}})
    assert e.key == "trian"
    for s in SCHEMA:
        assert s in str(e)
    assert "codec" in str(e)


def test_unknown_key():
    e = err({"train": {"learning_rate": 0.1}})
    assert e.key == "train.learning_rate"
    for k in SCHEMA["train"]:
        assert k in str(e)


@pytest.mark.parametrize("raw, key, words", [
    ({"run": {"rounds": True}}, "run.rounds", ["int", ">= 1", "bool"]),
    ({"run": {"rounds": 2.0}}, "run.rounds", ["int", "float"]),
    ({"train": {"lr": "0.1"}}, "train.lr", ["float", "> 0.0", "str"]),
    ({"train": {"lr": False}}, "train.lr", ["float", "bool"]),
    ({"run": {"wire_checksum": 1}}, "run.wire_checksum", ["bool", "int"]),
    ({"run": {"name": 3}}, "run.name", ["str", "int"]),
    ({"model": {"hidden": [8, "x"]}}, "model.hidden", ["list of int"]),
    ({"model": {"hidden": [8, True]}}, "model.hidden", ["list of int"]),
    ({"model": {"hidden": 8}}, "model.hidden", ["list of int"]),
    ({"routing": {"dense_patterns": "bias"}}, "routing.dense_patterns", ["list of str"]),
])
def test_wrong_type(raw, key, words):
    e = err(raw)
    assert e.key == key
    for w in words:
        assert w in str(e), (w, str(e))


@pytest.mark.parametrize("raw, key, allowed", [
    ({"run": {"rounds": 0}}, "run.rounds", ">= 1"),
    ({"run": {"ranks": 1}}, "run.ranks", ">= 2"),
    ({"train": {"lr": 0.0}}, "train.lr", "> 0.0"),
    ({"train": {"lr": -1}}, "train.lr", "> 0.0"),
    ({"train": {"momentum": 1.0}}, "train.momentum", "< 1.0"),
    ({"train": {"client_fraction": 1.5}}, "train.client_fraction", "<= 1.0"),
    ({"data": {"test_fraction": 0.0}}, "data.test_fraction", "> 0.0"),
    ({"run": {"poll_interval": 2.0}}, "run.poll_interval", "<= 1.0"),
    ({"model": {"resnet_stages": 5}}, "model.resnet_stages", "<= 4"),
])
def test_out_of_range(raw, key, allowed):
    e = err(raw)
    assert e.key == key
    assert allowed in str(e)


def test_non_finite_float():
    e = err({"train": {"lr": float("inf")}})
    assert e.key == "train.lr"
    e = err({"train": {"weight_decay": float("nan")}})
    assert e.key == "train.weight_decay" and "finite" in str(e)


@pytest.mark.parametrize("section, key", [("data", "dataset"), ("model", "name"), ("train", "algorithm"),
                                          ("server", "weighting"), ("routing", "scope"),
                                          ("log", "progress"), ("data", "partition")])
def test_bad_choice_names_choices(section, key):
    e = err({section: {key: "bogus"}})
    assert e.key == f"{section}.{key}"
    assert "'bogus'" in str(e)
    for c in SCHEMA[section][key].choices:
        assert repr(c) in str(e)


def test_section_not_a_table():
    e = err({"run": 5})
    assert e.key == "run"
    e = err({"codec": "topk"})
    assert e.key == "codec"
    e = err({"codec": {"ratio": 0.1}})
    assert e.key == "codec.id"
    e = err({"routing": {"dense": "identity"}})
    assert e.key == "routing.dense"


def test_config_error_is_usage_and_value_error():
    e = err({"run": {"rounds": -1}})
    assert isinstance(e, UsageError) and isinstance(e, ValueError)
    assert str(e).startswith("run.rounds: ")


# ------------------------------------------------------------- overrides

@pytest.mark.parametrize("text, key, value", [
    ("train.lr=0.1", "train.lr", 0.1),
    ("run.rounds = 7", "run.rounds", 7),
    ("run.wire_checksum=true", "run.wire_checksum", True),
    ('run.name="quoted name"', "run.name", "quoted name"),
    ("run.name=bare", "run.name", "bare"),
    ("run.name=two words", "run.name", "two words"),
    ("model.hidden=[32, 16]", "model.hidden", [32, 16]),
    ("codec.inner.ratio=0.1", "codec.inner.ratio", 0.1),
    ('routing.dense={id="fp16"}', "routing.dense", {"id": "fp16"}),
    ("log.path=a=b.h5", "log.path", "a=b.h5"),
])
def test_parse_override(text, key, value):
    k, v = parse_override(text)
    assert k == key
    assert v == value and type(v) is type(value)


@pytest.mark.parametrize("text", ["train.lr", "lr=0.1", "=3", " =3"])
def test_parse_override_rejects(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_apply_overrides_nested_codec_and_copy():
    raw = {"codec": {"id": "ef", "inner": {"id": "topk", "ratio": 0.01}}, "train": {"lr": 0.5}}
    out = apply_overrides(raw, ["codec.inner.ratio=0.1", "train.lr=0.2", "server.lr=2"])
    assert out["codec"] == {"id": "ef", "inner": {"id": "topk", "ratio": 0.1}}
    assert out["train"]["lr"] == 0.2 and out["server"] == {"lr": 2}
    # the input is untouched
    assert raw["codec"]["inner"]["ratio"] == 0.01 and raw["train"]["lr"] == 0.5


def test_codec_id_override_replaces_whole_table():
    raw = {"codec": {"id": "topk", "ratio": 0.01, "index": "u32"}}
    out = apply_overrides(raw, ["codec.id=fp16"])
    assert out["codec"] == {"id": "fp16"}
    # later codec keys apply to the new table
    out = apply_overrides(raw, ["codec.id=ef", "codec.inner.id=fp16"])
    assert out["codec"] == {"id": "ef", "inner": {"id": "fp16"}}


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError) as ei:
        apply_overrides({"run": {"rounds": 3}}, ["run.rounds.x=1"])
    assert ei.value.key == "run.rounds.x"


def test_load_job_with_overrides(tmp_path):
    job = load_job(write(tmp_path, GOOD_TOML), ["train.lr=0.3", "codec.id=fp16", "run.name=other"])
    assert job.train.lr == 0.3 and job.codec == {"id": "fp16"} and job.run.name == "other"
    with pytest.raises(ConfigError) as ei:
        load_job(write(tmp_path, GOOD_TOML), ["train.lr=fast"])
    assert ei.value.key == "train.lr"


def test_with_updates_revalidates():
    job = job_from_dict({})
    j2 = job.with_updates({"train.lr": 0.2})
    assert j2.train.lr == 0.2 and job.train.lr == SCHEMA["train"]["lr"].default
    with pytest.raises(ConfigError):
        job.with_updates({"train.lr": -1.0})


# ----------------------------------------------------------- cross-checks

@pytest.mark.parametrize("raw, key", [
    ({"run": {"ranks": 6}, "data": {"n_clients": 4}}, "data.n_clients"),
    ({"data": {"n_clients": 4}, "train": {"clients_per_round": 5}}, "train.clients_per_round"),
    ({"train": {"full_batch": True}}, "train.full_batch"),
    ({"data": {"partition": "natural"}}, "data.partition"),
    ({"data": {"dataset": "mnist"}}, "data.path"),
    ({"data": {"dataset": "cifar10"}}, "data.path"),
    ({"routing": {"dense_patterns": [""]}}, "routing.dense_patterns"),
    ({"routing": {"lossy_patterns": ["conv*", ""]}}, "routing.lossy_patterns"),
])
def test_cross_checks(raw, key):
    assert err(raw).key == key


@pytest.mark.parametrize("raw", [
    {"run": {"ranks": 5}, "data": {"n_clients": 4}},  # 4 workers, 4 clients: fits exactly
    {"data": {"n_clients": 4}, "train": {"clients_per_round": 4}},
    {"train": {"full_batch": True, "algorithm": "fedsgd"}},
    {"data": {"partition": "natural", "dataset": "synthetic"}},
    {"data": {"dataset": "mnist", "path": "/somewhere"}},
])
def test_cross_checks_pass(raw):
    job_from_dict(raw)


# ------------------------------------------------------------- hashing

def test_canonical_json_and_hash():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    a = job_from_dict({"train": {"lr": 0.1}, "run": {"seed": 1}})
    b = job_from_dict({"run": {"seed": 1}, "train": {"lr": 0.1}})  # other key order
    assert a == b and a.to_json() == b.to_json() and a.hash == b.hash
    assert len(a.hash) == 16 and int(a.hash, 16) >= 0
    assert json.loads(a.to_json()) == a.to_dict()
    # explicitly stating a default does not change the hash
    assert job_from_dict({"train": {"lr": 0.1, "batch_size": 32}, "run": {"seed": 1}}).hash == a.hash
    for changed in ({"train": {"lr": 0.11}, "run": {"seed": 1}}, {"train": {"lr": 0.1}, "run": {"seed": 2}},
                    {"train": {"lr": 0.1}, "run": {"seed": 1}, "codec": {"id": "fp16"}},
                    {"train": {"lr": 0.1}, "run": {"seed": 1}, "codec": {"id": "identity", "x": 1}}):
        c = job_from_dict(changed)
        assert c != a and c.hash != a.hash


def test_hash_is_stable_across_processes():
    job = job_from_dict({"train": {"lr": 0.25}, "codec": {"id": "ef", "inner": {"id": "fp16"}}})
    code = ("from hpcfl.config import job_from_dict;"
            "print(job_from_dict({'codec': {'inner': {'id': 'fp16'}, 'id': 'ef'}, 'train': {'lr': 0.25}}).hash)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="123"))
    assert out.stdout.strip() == job.hash


# ----------------------------------------------------------- validate_job

def _small(**codec):
    return job_from_dict({"run": {"ranks": 2}, "data": {"n_clients": 2}, "model": {"name": "logreg"},
                          "codec": codec or {"id": "identity"}})


def test_validate_job_good():
    v = validate_job(_small(id="fp16"))
    assert v.n_params == 8 * 8 * 10 + 10
    assert [(s.name, s.shape, s.route) for s in v.slots] == [("fc.weight", (10, 64), "lossy"),
                                                             ("fc.bias", (10,), "lossy")]
    assert v.codec_config["codec"] == {"id": "fp16"}


def test_validate_job_unknown_codec_id():
    with pytest.raises(UnknownCodecError) as ei:
        validate_job(_small(id="topkk"))
    assert ei.value.key == "codec.id"
    assert "'topkk'" in str(ei.value) and "identity" in str(ei.value) and "fp16_zstd" in str(ei.value)


def test_validate_job_unknown_codec_param():
    with pytest.raises(ConfigError) as ei:
        validate_job(_small(id="fp16", level=3))
    assert ei.value.key == "codec.level"
    with pytest.raises(ConfigError) as ei:
        validate_job(_small(id="zstd", lvl=3))
    assert ei.value.key == "codec.lvl" and "level" in str(ei.value)
    # nested: the key names the path down to the bad parameter
    with pytest.raises(ConfigError) as ei:
        validate_job(_small(id="ef", inner={"id": "fp16", "bits": 4}))
    assert ei.value.key == "codec.inner.bits"
    with pytest.raises(ConfigError) as ei:
        validate_job(_small(id="zstd", level=99))
    assert ei.value.key == "codec.level" and "<= 22" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        validate_job(_small(id="ef"))
    assert ei.value.key == "codec.inner"


def test_validate_job_disk_dataset_missing_files(tmp_path):
    job = job_from_dict({"data": {"dataset": "mnist", "path": str(tmp_path)}})
    with pytest.raises(UsageError):
        validate_job(job)
    validate_job(job, check_files=False)


def test_validate_job_shards_classes():
    job = job_from_dict({"data": {"partition": "shards", "classes_per_client": 11}})
    with pytest.raises(ConfigError) as ei:
        validate_job(job)
    assert ei.value.key == "data.classes_per_client"


# ------------------------------------------------------------------ CLI

def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI", "PMIX", "OMPI_", "SLURM_", "HYDI", "MPI_", "MV2_", "I_MPI"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _hpcfl(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcfl", *args], capture_output=True, text=True, cwd=cwd,
                          env=_clean_env(), timeout=timeout)


@pytest.mark.parametrize("text, override, key", [
    ("[train]\nlr = -0.5\n", None, "train.lr"),
    ("[trian]\nlr = 0.5\n", None, "trian"),
    ("[run]\nrounds = true\n", None, "run.rounds"),
    ('[codec]\nid = "fp16"\nlevel = 3\n', None, "codec.level"),
    ('[codec]\nid = "nosuchcodec"\n', None, "codec.id"),
    ("", "train.algorithm=fedprox", "train.algorithm"),
])
def test_cli_validate_bad_job(tmp_path, text, override, key):
    job = write(tmp_path, text, "bad.toml")
    args = ["validate", str(job)] + (["--set", override] if override else [])
    r = _hpcfl(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert key in lines[0]
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_validate_good_job(tmp_path):
    job = write(tmp_path, GOOD_TOML)
    r = _hpcfl("validate", str(job), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and load_job(job).hash in r.stdout
    r = _hpcfl("validate", str(job), "--json", "--set", "train.lr=0.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["train"]["lr"] == 0.2
    assert d == load_job(job, ["train.lr=0.2"]).to_dict()


def test_cli_validate_missing_or_binary_file(tmp_path):
    r = _hpcfl("validate", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not found" in r.stderr
    (tmp_path / "run.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)))
    r = _hpcfl("validate", str(tmp_path / "run.h5"), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_run_bad_job_fails_before_mpiexec(tmp_path):
    out = tmp_path / "out.h5"
    job = write(tmp_path, GOOD_TOML + "\n[server]\nmomentum = 1.5\n", "bad.toml")
    t0 = time.monotonic()
    r = _hpcfl("run", str(job), "--out", str(out), cwd=tmp_path, timeout=30)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.momentum" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()
    assert not any(tmp_path.rglob("*.h5"))
    assert elapsed < 15
