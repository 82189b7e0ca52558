"""A real run with per-client links from the shipped trace (docs/links.md, mode "model").

Checks the logged link times against the documented formula for each client's trace row
(client c uses row c mod 40), and that the modelled round waits for its slowest client.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpcfl.results import load_run
from tests.conftest import needs_mpiexec, run_hpcfl, write_job

pytestmark = [pytest.mark.mpi, needs_mpiexec]

ROOT = Path(__file__).resolve().parents[2]
TRACE = "jobs/traces/mobile-sample.csv"  # relative: resolved from the directory `hpcfl run` starts in


def _trace_rows() -> np.ndarray:
    """(uplink_mbps, downlink_mbps, latency_ms) per data row, parsed here without hpcfl."""
    lines = [ln for ln in (ROOT / TRACE).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "client,uplink_mbps,downlink_mbps,latency_ms"
    return np.array([[float(x) for x in ln.split(",")[1:]] for ln in lines[1:]])


def test_trace_links_model_mode(tmp_path, tiny_job):
    rows = _trace_rows()
    assert len(rows) == 40
    n_clients = 45  # more clients than trace rows: clients 40..44 wrap to rows 0..4
    tiny_job["run"].update(rounds=3, ranks=3)
    tiny_job["data"]["n_clients"] = n_clients
    tiny_job["train"].update(client_fraction=0.2, local_steps=1)  # 9 sampled clients per round
    tiny_job["link"] = {"mode": "model", "trace": TRACE}
    job = write_job(tmp_path / "links.toml", tiny_job)
    out = tmp_path / "links.h5"
    r = run_hpcfl(["run", str(job), "--out", str(out), "--progress", "plain"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    run = load_run(out)
    assert run.complete and run.n_rounds == 3

    cl, rd = run.clients, run.rounds
    part = cl["participated"].astype(bool)
    assert (part.sum(axis=1) == 9).all()
    assert part[:, 40:].any(), "no wrapped client (>= 40) was sampled: pick another seed"
    row = rows[np.arange(n_clients) % 40]  # client c -> row c mod rows
    up_bps, down_bps, lat_s = row[:, 0] * 1e6, row[:, 1] * 1e6, row[:, 2] / 1e3  # Mbit/s = 10^6 bit/s

    # uplink: latency + 8 x message_bytes / uplink bandwidth (message = payload + header)
    msg = cl["message_bytes"]
    assert (msg == cl["payload_bytes"] + cl["header_bytes"]).all() and (msg[part] > 0).all()
    up = lat_s + 8.0 * msg / up_bps
    down = lat_s + 8.0 * cl["downlink_bytes"] / down_bps
    np.testing.assert_allclose(cl["link_up_s"][part], np.broadcast_to(up, part.shape)[part], rtol=1e-12)
    np.testing.assert_allclose(cl["link_down_s"][part], np.broadcast_to(down, part.shape)[part], rtol=1e-12)
    for k in ("link_up_s", "link_down_s", "modelled_s"):
        assert np.isnan(cl[k][~part]).all(), k
    # the clients' links really differ (a trace, not one median link)
    assert len(np.unique(np.round(cl["link_up_s"][part], 9))) > 5

    # per client: download + compute + upload
    modelled = cl["link_down_s"] + cl["train_s"] + cl["encode_s"] + cl["link_up_s"]
    np.testing.assert_allclose(cl["modelled_s"][part], modelled[part], rtol=1e-12)

    # per round: the synchronous round waits for its slowest sampled client, then the root decodes and
    # aggregates
    slowest = np.nanmax(cl["modelled_s"], axis=1)
    np.testing.assert_allclose(rd["modelled_round_s"], slowest + rd["decode_s"] + rd["aggregate_s"], rtol=1e-12)
    for t in range(run.n_rounds):
        assert (rd["modelled_round_s"][t] >= cl["modelled_s"][t][part[t]]).all()
    np.testing.assert_allclose(rd["modelled_uplink_s"], np.nanmax(cl["link_up_s"], axis=1), rtol=1e-12)
    np.testing.assert_allclose(rd["modelled_downlink_s"], np.nanmax(cl["link_down_s"], axis=1), rtol=1e-12)

    # model mode does not slow the run
    assert (run.ranks["pace_s"] == 0).all()
