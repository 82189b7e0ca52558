"""``hpcfl bench mpi`` / ``hpcfl bench round`` through the CLI (self-launched mpiexec), and calibrate().

Tiny grids and few iterations: these check the records, tables and files are
sane (sizes as asked, positive finite bandwidths, provenance), never speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpcfl.cli.bench_cmds import parse_pow2_sizes
from hpcfl.errors import UsageError
from tests.conftest import MPIEXEC, hpcfl_env, needs_mpiexec, run_hpcfl

PROVENANCE = ("hpcfl_version", "versions_json", "git_commit", "command", "created", "hostname", "mpi_library",
              "mpi_standard", "world_size", "launcher", "slurm_json", "loadavg_start", "loadavg_end", "units")


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_parse_pow2_sizes():
    assert parse_pow2_sizes("1..8") == [1, 2, 4, 8]
    assert parse_pow2_sizes("1K..16K*4") == [1024, 4096, 16384]
    assert parse_pow2_sizes("8,1M,2..4") == [8, 1 << 20, 2, 4]
    for bad in ("3..8", "8..4", "1..8*3", "1..8*x", "x"):
        with pytest.raises(UsageError):
            parse_pow2_sizes(bad)


@pytest.mark.parametrize("args", [["mpi", "--tests", "pingpong,nope"], ["mpi", "--apis", "json"],
                                  ["round", "--sizes", "6"], ["round", "--codecs", "nosuchcodec"],
                                  ["mpi", "--ranks", "1"]])
def test_usage_errors_before_launch(args, capsys):
    from hpcfl.cli import main

    assert main(["bench", *args]) == 2  # in-process: refused before any mpiexec starts
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@needs_mpiexec
@pytest.mark.mpi
def test_bench_mpi_table_and_h5(tmp_path):
    out = tmp_path / "mpi.h5"
    r = run_hpcfl(["bench", "mpi", "--ranks", "3", "--sizes", "8,64K", "--apis", "buffer,pickle",
                   "--iters", "20", "--warmup", "3", "--budget", "0.05", "--out", str(out), "--quiet"], timeout=120)
    assert r.returncode == 0, r.stderr
    for title in ("ping-pong 0<->1", "windowed bandwidth", "Gather to rank 0", "MB/s = 10^6 bytes/s"):
        assert title in r.stdout
    assert "buffer/pickle" in r.stdout and "64K" in r.stdout
    with h5py.File(out) as f:
        for k in PROVENANCE:
            assert k in f.attrs, k
        assert f.attrs["world_size"] == 3 and f.attrs["launcher"] == "self" and "MPICH" in f.attrs["mpi_library"]
        assert json.loads(f.attrs["sizes_json"]) == [8, 65536]
        d = f["mpi"][:]
        units = json.loads(f["mpi"].attrs["units_json"])
    assert units["MBps_median"] == "MB/s" and units["t_median_s"] == "s"
    rows = {(t.decode(), a.decode(), int(s)) for t, a, s in zip(d["test"], d["api"], d["size"])}
    assert rows == {(t, a, s) for t in ("pingpong", "bw", "gather") for a in ("buffer", "pickle")
                    for s in (8, 65536)}
    assert (d["ranks"] == 3).all()
    for k in ("t_min_s", "t_median_s", "t_max_s", "MBps_median", "MBps_best"):
        assert np.isfinite(d[k]).all() and (d[k] > 0).all(), k
    assert (d["t_min_s"] <= d["t_median_s"]).all() and (d["t_median_s"] <= d["t_max_s"]).all()
    # small messages: 20 iterations asked; large (>= 8 KiB): a tenth (OSU), the budget may cut further
    assert ((d["iters"] >= 2) & (d["iters"] <= 20)).all()
    bw = d[d["test"] == b"bw"]
    assert (bw["window"] == 64).all() and (bw["bytes_moved"] == 64 * bw["size"]).all()
    g = d[d["test"] == b"gather"]
    assert (g["bytes_moved"] == 2 * g["size"]).all()


@needs_mpiexec
@pytest.mark.mpi
def test_bench_round_json_and_h5(tmp_path):
    out = tmp_path / "round.h5"
    r = run_hpcfl(["bench", "round", "--ranks", "3", "--sizes", "4K,64K", "--codecs", "identity,topk_ef",
                   "--repeat", "2", "--budget", "0.05", "--max-gathers", "3", "--clients-per-rank", "2",
                   "--out", str(out), "--json", "--quiet"], timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    recs = doc["records"]
    assert [(x["size"], x["codec"]) for x in recs] == [(4096, "identity"), (4096, "topk_ef"),
                                                         (65536, "identity"), (65536, "topk_ef")]
    for x in recs:
        assert x["ranks"] == 3 and x["workers"] == 2 and x["clients"] == 4
        assert x["raw_bytes"] == 4 * x["size"]
        assert x["wire_bytes"] > x["message_bytes"] > 0  # frame headers
        for k in ("gather_vs_bare", "gather_vs_bare_best", "gather_MBps", "bare_MBps", "effective_MBps",
                  "raw_gather_MBps", "bare_raw_MBps", "speedup_vs_raw", "encode_median_s", "decode_median_s",
                  "gather_median_s", "bare_median_s", "root_transfer_median_s", "framed_median_s", "framed_vs_bare"):
            assert _finite_pos(x[k]), (k, x[k])
        assert x["gather_min_s"] <= x["gather_median_s"] <= x["gather_max_s"]
        assert x["bare_min_s"] <= x["bare_median_s"] <= x["bare_max_s"]
        # framing (workers' pack, root's unpack) is timed apart from the gather and added back in framed_*
        assert x["framed_min_s"] >= x["gather_min_s"] and x["framed_vs_bare"] <= x["gather_vs_bare"]
        assert 2 <= x["gathers"] <= 2 * 3 and x["repeat"] == 2
        # the ratio is the bandwidth ratio: same bytes, so bare time / hpcfl time
        assert x["gather_vs_bare"] == pytest.approx(x["gather_MBps"] / x["bare_MBps"])
    ident = [x for x in recs if x["codec"] == "identity"]
    topk = [x for x in recs if x["codec"] == "topk_ef"]
    assert all(0.9 < x["ratio"] <= 1.0 for x in ident)
    assert all(x["ratio"] > 5 for x in topk)
    for k in ("hpcfl_version", "git_commit", "mpi_library", "world_size"):
        assert k in doc["attrs"]
    with h5py.File(out) as f:
        for k in PROVENANCE:
            assert k in f.attrs, k
        d = f["round"][:]
        assert "gather_vs_bare" in json.loads(f["round"].attrs["doc_json"])
    assert d.shape == (4,) and np.allclose(d["gather_vs_bare"], [x["gather_vs_bare"] for x in recs])


CALIBRATE = """
import json, math
from mpi4py import MPI
from hpcfl.bench.mpi import CALIBRATION_DTYPE, calibrate
comm = MPI.COMM_WORLD
res = calibrate(comm, budget_s=0.2)
t = res.pop("table")
assert t.dtype == CALIBRATION_DTYPE
mine = json.dumps({k: v for k, v in res.items() if k != "elapsed_s"}, sort_keys=True)
everyone = comm.gather(mine, 0)
if comm.rank == 0:
    assert len(set(everyone)) == 1, everyone
    print(json.dumps({"res": res, "rows": [[r["test"].decode(), int(r["peer"]), int(r["size"]), int(r["iters"]),
                                            float(r["MBps_median"])] for r in t]}))
"""


@needs_mpiexec
@pytest.mark.mpi
def test_calibrate(tmp_path):
    script = tmp_path / "calib.py"
    script.write_text(CALIBRATE)
    r = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, "-m", "mpi4py", str(script)],
                       capture_output=True, text=True, timeout=120, env=hpcfl_env(MPIEXEC_TIMEOUT="100"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    res, rows = doc["res"], doc["rows"]
    for k in ("latency_s", "bw_1MiB_Bps", "bw_16MiB_Bps", "gather_s", "gather_Bps"):
        assert _finite_pos(res[k]), (k, res[k])
    assert res["world_size"] == 3 and res["peers"] == 2 and res["budget_s"] == 0.2
    assert res["elapsed_s"] < 5  # budget 0.2 s; generous for a loaded 2-core box
    assert [(t, p, s) for t, p, s, _, _ in rows] == [
        ("pingpong", 1, 8), ("pingpong", 1, 1 << 20), ("pingpong", 1, 16 << 20),
        ("pingpong", 2, 8), ("pingpong", 2, 1 << 20), ("pingpong", 2, 16 << 20), ("gather", -1, 1 << 20)]
    assert all(n >= 3 and bw > 0 for *_, n, bw in rows)
