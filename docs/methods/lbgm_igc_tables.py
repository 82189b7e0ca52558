"""Print the result tables of docs/methods/lbgm.md and docs/methods/igc.md from the run files.

    .venv/bin/python docs/methods/lbgm_igc_tables.py lbgm [RUNS_DIR]    (default runs/lbgm)
    .venv/bin/python docs/methods/lbgm_igc_tables.py igc  [RUNS_DIR]    (default runs/igc)
    .venv/bin/python docs/methods/lbgm_igc_tables.py igc-tuning [RUNS_DIR]
    .venv/bin/python docs/methods/lbgm_igc_tables.py lockstep RUN.h5 [RUN.h5 ...]

Every figure comes from the HDF5 run files written by ``hpcfl run`` (the commands are in the docs).
``floats/client`` is the cumulative uplink payload / 4 / number of clients (LBGM's "#params shared";
hpcfl.analysis.recycling); ``lockstep`` compares, from the final checkpoint, each client's codec
state on its worker rank with the root's copy for that client (LBGM's look-back gradients).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hpcfl.analysis.recycling import recycling_summary
from hpcfl.results import load_run

TARGETS = (0.90, 0.95)


def _acc(run):
    acc = run.rounds["accuracy"].astype(float)
    ok = np.isfinite(acc)
    return acc, ok


def _first(acc, ok, target):
    hit = np.flatnonzero(ok & (acc >= target))
    return int(hit[0]) if hit.size else None


def lbgm_row(path: Path) -> dict:
    run = load_run(path)
    s = recycling_summary(path)
    acc, ok = _acc(run)
    cum = np.array([r["cum_floats_per_client"] for r in s["per_round"]])
    row = {"run": path.stem, "status": _status(run), "rounds": run.n_rounds,
           "final": s["final_accuracy"], "best": s["best_accuracy"], "floats": s["cum_floats_per_client"],
           "saved": s["floats_saved"], "recycled": s["mean_recycled_fraction"],
           "root_MB": s["root_state_bytes_max"] / 1e6}
    for t in TARGETS:
        r = _first(acc, ok, t)
        row[f"r{t}"] = r
        row[f"f{t}"] = None if r is None else float(cum[r])
    return row


def _status(run) -> str:
    """'' for a complete run, else a short note (diverged runs stop at their first NaN update)."""
    if run.status == "complete":
        return ""
    if "NumericalFault" in run.status:
        return f" (diverged: NaN update in round {run.n_rounds})"
    return f" ({run.status.split(':')[0]}, {run.n_rounds} rounds)"


def _f(v, fmt):
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


LBGM_GROUPS = [
    ("cnn2, non-IID (3 classes), authors' update (one full-batch gradient), per tensor",
     ["noniid-vanilla", "noniid-d0.2", "noniid-d0.4", "noniid-d0.6", "noniid-d0.8"]),
    ("cnn2, IID", ["iid-vanilla", "iid-d0.2", "iid-d0.4", "iid-d0.6", "iid-d0.8"]),
    ("logreg (the code's FCN), non-IID", ["logreg-vanilla", "logreg-d0.2", "logreg-d0.4", "logreg-d0.6",
                                          "logreg-d0.8"]),
    ("cnn2 non-IID: per tensor vs whole model", [f"noniid-{s}d{d}" for d in ("0.2", "0.4", "0.6", "0.8")
                                                 for s in ("", "model-")]),
    ("cnn2 non-IID: the code's residual (--residual 1)", ["noniid-d0.2", "noniid-lbgm_ef-d0.2"]),
    ("cnn2 non-IID: paper's update (tau = 5 local steps, accumulated)",
     ["tau5-vanilla", "tau5-d0.2", "tau5-d0.4", "tau5-d0.6", "tau5-d0.8"]),
    ("cnn2 non-IID: plug-and-play on top-k 10% + EF (server lr 0.05)",
     ["noniid-topk_ef", "noniid-lbgm_topk_ef-d0.2", "noniid-lbgm_topk_ef-d0.6", "noniid-lbgm_topk_ef-d0.8"]),
    ("cnn2 non-IID: plug-and-play on signSGD (server lr 1e-3)", ["sign", "lbgm_sign-d0.2"]),
    ("cnn2 non-IID: plug-and-play on ATOMO rank 2 (server lr 0.01)", ["atomo-lr0.01", "lbgm_atomo-d0.2-lr0.01"]),
    ("cnn2 non-IID: plug-and-play on ATOMO rank 2 (server lr 0.05)", ["atomo", "lbgm_atomo-d0.2"]),
]


def lbgm_tables(d: Path) -> None:
    for title, names in LBGM_GROUPS:
        print(f"\n**{title}**\n")
        print("| run | final acc | best acc | rounds to 0.90 | floats/client to 0.90 | rounds to 0.95 | "
              "floats/client to 0.95 | floats/client, all rounds | saved vs raw | recycled fraction | root LBG MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n in names:
            p = d / f"{n}.h5"
            if not p.exists():
                print(f"| {n} | (not run) |||||||||| ")
                continue
            r = lbgm_row(p)
            flag = r["status"]
            print(f"| {n}{flag} | {_f(r['final'], '.4f')} | {_f(r['best'], '.4f')} | {_f(r['r0.9'], 'd')} | "
                  f"{_f(r['f0.9'], '.3g')} | {_f(r['r0.95'], 'd')} | {_f(r['f0.95'], '.3g')} | {r['floats']:.3g} | "
                  f"{_f(r['saved'] * 100 if r['saved'] is not None else None, '.1f')}% | "
                  f"{_f(r['recycled'], '.3f')} | {r['root_MB']:.2f} |")


def igc_row(path: Path) -> dict:
    run = load_run(path)
    acc, ok = _acc(run)
    part = run.clients["participated"].astype(bool)
    n = int(run.attrs["n_params"])
    codec = run.codec.get("codec", run.codec)
    pay = run.clients["payload_bytes"][part]
    msg = run.clients["message_bytes"][part]
    down = run.clients["downlink_bytes"][part]
    return {"run": path.stem, "status": _status(run), "rounds": run.n_rounds, "D": n,
            "variant": codec.get("variant", "—") if codec.get("id") == "igc" else "FedSGD",
            "d": codec.get("dim") if codec.get("id") == "igc" else n,
            "lr": run.job.get("server", {}).get("lr"), "norm": codec.get("normalize", "—"),
            "final": float(acc[ok][-1]), "best": float(acc[ok].max()),
            "r0.9": _first(acc, ok, 0.9), "r0.95": _first(acc, ok, 0.95),
            "up_payload": float(pay.mean()), "up_msg": float(msg.mean()),
            "down_mean": float(down.mean()),
            "down_kinds": [(int(k), float((down == k).mean())) for k in np.unique(down)],
            "up_total": float(run.rounds["uplink_bytes"].sum()), "down_total": float(run.rounds["downlink_bytes"].sum())}


def igc_tables(d: Path) -> None:
    for model in ("mlp", "cnn2"):
        print(f"\n**{model}**\n")
        print("| variant | d | server lr | D/d | final acc | best acc | rounds to 0.90 | rounds to 0.95 | upload B/client/round "
              "(payload / message) | download B/client/round (mean; values) | uplink total MB | downlink total MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        names = [f"{model}-identity"] + [f"{model}-{v}-d{k}" for v in ("static", "ksubspace", "timevarying")
                                         for k in (250, 500, 1000, 2000)]
        names += [p.stem for p in sorted(d.glob(f"{model}-*-lr*.h5"))]  # reruns at another server lr
        for n in names:
            p = d / f"{n}.h5"
            if not p.exists():
                print(f"| {n} | (not run) |||||||||||")
                continue
            r = igc_row(p)
            flag = r["status"]
            kinds = ", ".join(f"{k}: {100 * f:.0f}%" for k, f in r["down_kinds"]) if len(r["down_kinds"]) > 1 \
                else str(r["down_kinds"][0][0])
            print(f"| {r['variant']}{flag} | {r['d']} | {r['lr']} | {r['D'] / r['d']:.1f} | {r['final']:.4f} | "
                  f"{r['best']:.4f} | {_f(r['r0.9'], 'd')} | {_f(r['r0.95'], 'd')} | "
                  f"{r['up_payload']:.0f} / {r['up_msg']:.0f} | {r['down_mean']:.0f} ({kinds}) | "
                  f"{r['up_total'] / 1e6:.2f} | {r['down_total'] / 1e6:.2f} |")


def igc_tuning(d: Path) -> None:
    """The server-lr search (200-round runs of the static variant): runs/igc/tune-*.h5."""
    print("| model | normalize | d | server lr | equivalent orthogonal lr | status | rounds | final acc | best acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for p in sorted(d.glob("tune-*.h5")):
        run = load_run(p)
        codec = run.codec.get("codec", run.codec)
        acc, ok = _acc(run)
        model = run.job["model"]["name"]
        lr = float(run.job["server"]["lr"])
        n_pad = 1 << (int(run.attrs["n_params"]) - 1).bit_length()
        if codec.get("id") == "igc":
            dim, norm = int(codec.get("dim", 1000)), codec.get("normalize", "orthogonal")
            eq = lr * n_pad / dim if norm == "unbiased" else lr  # A_u = sqrt(D'/d) A_o: same step at lr_o = lr_u D'/d
        else:
            dim, norm, eq = int(run.attrs["n_params"]), "FedSGD", None
        status = run.status
        if "NumericalFault" in status:
            status = f"diverged (NaN update in round {run.n_rounds})"
        elif status != "complete":
            continue  # interrupted (stopped, or started while the job schema changed): not a result
        rows.append((model, norm, dim, lr, eq, status, run.n_rounds,
                     float(acc[ok][-1]) if ok.any() else None, float(acc[ok].max()) if ok.any() else None))
    for m, norm, dim, lr, eq, status, n, fin, best in sorted(rows, key=lambda r: (r[0], r[1], r[2], r[3])):
        print(f"| {m} | {norm} | {dim} | {lr:g} | {_f(eq, '.3g')} | {status} | {n} | {_f(fin, '.4f')} | "
              f"{_f(best, '.4f')} |")


def lockstep(paths: list[str]) -> None:
    from hpcfl.run import checkpoint

    for f in paths:
        p = Path(f)
        k = checkpoint.latest(p)
        root = checkpoint.read_root(p, k)["states"]
        cl = checkpoint.read_clients(p, k, set(root))
        same = sum(root[c].digest("shared") == cl[c].digest("shared") for c in root)
        nbytes = sum(root[c].nbytes("shared") for c in root)
        print(f"{p.name}: after {k} rounds, {same}/{len(root)} clients bit-identical "
              f"(root holds {nbytes / 1e6:.2f} MB of look-back gradients)")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "lbgm"
    if what == "lbgm":
        lbgm_tables(Path(sys.argv[2] if len(sys.argv) > 2 else "runs/lbgm"))
    elif what == "igc":
        igc_tables(Path(sys.argv[2] if len(sys.argv) > 2 else "runs/igc"))
    elif what == "igc-tuning":
        igc_tuning(Path(sys.argv[2] if len(sys.argv) > 2 else "runs/igc"))
    elif what == "lockstep":
        lockstep(sys.argv[2:])
    else:
        sys.exit(__doc__)
