"""hpcfl.fl: client sampling and placement, local training, aggregation weights, server step, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcfl.config.schema import SCHEMA
from hpcfl.fl.client import LocalTrainer
from hpcfl.fl.evaluate import evaluate
from hpcfl.fl.sampling import clients_of_rank, host_rank, n_sampled, sample_clients
from hpcfl.fl.server import ServerOptimizer, client_weights
from hpcfl.models import build_model, flat_params, load_flat_
from hpcfl.seeding import torch_generator

DIM, K = 12, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------- sampling

@pytest.mark.parametrize("n, fraction, want", [
    (10, 1.0, 10), (10, 0.5, 5), (10, 0.25, 3), (10, 0.35, 4), (10, 0.05, 1), (10, 0.04, 1), (10, 0.01, 1),
    (4, 0.375, 2), (4, 0.125, 1), (3, 0.5, 2), (1000, 0.0005, 1), (1000, 0.0015, 2), (7, 0.999, 7),
    # x.5 in decimal but x.4999.. in binary floating point: still rounded up
    (50, 0.29, 15), (45, 0.7, 32), (100, 0.145, 15), (25, 0.58, 15), (90, 0.35, 32),
])
def test_n_sampled_fraction_rounds_half_up(n, fraction, want):
    assert n_sampled(n, 0, fraction) == want
    assert len(sample_clients(n, 0, 0, fraction=fraction)) == want


def test_n_sampled_matches_exact_decimal_rounding():
    from fractions import Fraction

    for n in range(1, 120):
        for k in range(1, 200):
            f = k / 200
            want = max(1, min(n, int(Fraction(str(f)) * n + Fraction(1, 2))))
            assert n_sampled(n, 0, f) == want, (n, f)


def test_n_sampled_count():
    assert n_sampled(10, 3) == 3
    assert n_sampled(10, 3, 0.9) == 3  # count wins over fraction
    assert n_sampled(10, 12) == 10


def test_sample_clients_properties():
    for seed in (0, 1):
        seen = set()
        for r in range(20):
            s = sample_clients(50, r, seed, count=7)
            assert s.dtype == np.int64 and len(s) == 7
            assert np.all(np.diff(s) > 0) and s.min() >= 0 and s.max() < 50  # sorted, unique, in range
            assert np.array_equal(s, sample_clients(50, r, seed, count=7))  # deterministic
            seen.add(tuple(s.tolist()))
        assert len(seen) >= 15  # rounds differ
    a = [tuple(sample_clients(50, r, 0, count=7)) for r in range(10)]
    b = [tuple(sample_clients(50, r, 1, count=7)) for r in range(10)]
    assert a != b  # seeds differ
    assert sample_clients(5, 3, 0, count=5).tolist() == [0, 1, 2, 3, 4]
    # every client gets picked eventually, roughly uniformly
    counts = np.bincount(np.concatenate([sample_clients(20, r, 3, fraction=0.25) for r in range(400)]),
                         minlength=20)
    assert counts.sum() == 400 * 5 and counts.min() > 50 and counts.max() < 150


def test_sampling_does_not_touch_global_rngs():
    np.random.seed(1)
    torch.manual_seed(1)
    a, b = np.random.rand(), torch.rand(1)
    np.random.seed(1)
    torch.manual_seed(1)
    sample_clients(100, 4, 9, count=10)
    assert np.random.rand() == a and torch.equal(torch.rand(1), b)


@pytest.mark.parametrize("n_clients, n_workers", [(1, 1), (7, 3), (10, 10), (100, 7), (5, 2)])
def test_host_rank_partitions_clients(n_clients, n_workers):
    owned = [clients_of_rank(r, n_clients, n_workers) for r in range(1, n_workers + 1)]
    allc = np.concatenate(owned)
    assert sorted(allc.tolist()) == list(range(n_clients))  # a partition: each client exactly once
    for r, cs in enumerate(owned, start=1):
        assert all(host_rank(int(c), n_workers) == r for c in cs)
        assert list(cs) == sorted(cs)
    sizes = [len(c) for c in owned]
    assert max(sizes) - min(sizes) <= 1  # round-robin balance
    assert len(clients_of_rank(0, n_clients, n_workers)) == 0  # the root hosts nobody
    assert all(1 <= host_rank(c, n_workers) <= n_workers for c in range(n_clients))


# ------------------------------------------------------------------ training

def train_cfg(**kw) -> dict:
    c = {k: f.default for k, f in SCHEMA["train"].items()}
    c.update(kw)
    return c


def data(n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    w = torch.randn(DIM, K, generator=g)
    y = (x @ w).argmax(1)
    return x, y


def model(name: str = "mlp", seed: int = 0):
    return build_model({"name": name, "hidden": [8]}, (DIM,), K, seed)


def trainer(cfg: dict, n: int = 200, seed: int = 0, name: str = "mlp") -> LocalTrainer:
    x, y = data(n)
    return LocalTrainer(model(name), cfg, x, y, seed)


def unflatten(m: torch.nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for n, p in m.named_parameters():
        out[n] = flat[off:off + p.numel()].view(p.shape)
        off += p.numel()
    return out


def batches(idx: torch.Tensor, bs: int, steps: int, gen: torch.Generator):
    """The documented batch order: shuffle, take consecutive batches, reshuffle when one would run short."""
    bs = min(bs, len(idx))
    perm, pos, out = idx[torch.randperm(len(idx), generator=gen)], 0, []
    for _ in range(steps):
        if pos + bs > len(perm):
            perm, pos = idx[torch.randperm(len(idx), generator=gen)], 0
        out.append(perm[pos:pos + bs])
        pos += bs
    return out


INDICES = np.arange(10, 110, 2)  # 50 samples of the 200


def test_fedavg_update_is_model_delta():
    t = trainer(train_cfg(local_steps=5, batch_size=8, lr=0.1))
    g0 = flat_params(t.model)
    res = t.train(g0, INDICES, client=3, round=1)
    end = flat_params(t.model)
    assert res.n_samples == 50 and res.steps == 5 and math.isfinite(res.loss)
    assert list(res.update) == [n for n, _ in t.model.named_parameters()]
    delta = unflatten(t.model, g0 - end)
    for n, u in res.update.items():
        torch.testing.assert_close(u, delta[n], rtol=0, atol=1e-7)
    assert torch.cat([u.reshape(-1) for u in res.update.values()]).abs().max() > 0


def test_fedavg_matches_reference_sgd():
    cfg = train_cfg(local_steps=9, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.01)
    t = trainer(cfg)
    g0 = flat_params(t.model)
    res = t.train(g0, INDICES, client=2, round=4)

    ref = model()
    load_flat_(ref, g0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    gen = torch_generator(0, "local-batches", 4, 2)
    x, y = data()
    losses = []
    for b in batches(torch.from_numpy(INDICES), 16, 9, gen):  # 50 samples, 16 per batch: reshuffles
        opt.zero_grad()
        loss = F.cross_entropy(ref(x[b]), y[b])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    want = unflatten(ref, g0 - flat_params(ref))
    for n, u in res.update.items():
        torch.testing.assert_close(u, want[n], rtol=1e-5, atol=1e-6)
    assert res.loss == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("opt", [dict(momentum=0.5), dict(weight_decay=0.1), dict()])
def test_momentum_and_weight_decay_change_the_update(opt):
    base = trainer(train_cfg(local_steps=4, batch_size=8)).train(flat_params(model()), INDICES, 0, 0)
    other = trainer(train_cfg(local_steps=4, batch_size=8, **opt)).train(flat_params(model()), INDICES, 0, 0)
    same = all(torch.equal(base.update[n], other.update[n]) for n in base.update)
    assert same == (not opt)


def test_training_is_deterministic_and_independent_of_host():
    cfg = train_cfg(local_steps=6, batch_size=8, momentum=0.9)
    g0 = flat_params(model())
    a = trainer(cfg).train(g0, INDICES, client=5, round=2)
    b = trainer(cfg).train(g0, INDICES, client=5, round=2)
    for n in a.update:
        assert torch.equal(a.update[n], b.update[n])
    assert a.loss == b.loss
    # one trainer reused for another client first (as a worker rank does): same result
    t = trainer(cfg)
    t.train(g0, np.arange(0, 40), client=1, round=2)
    c = t.train(g0, INDICES, client=5, round=2)
    for n in a.update:
        assert torch.equal(a.update[n], c.update[n])
    # another round or client draws other batches
    for kw in (dict(client=5, round=3), dict(client=6, round=2)):
        d = trainer(cfg).train(g0, INDICES, **kw)
        assert not all(torch.equal(a.update[n], d.update[n]) for n in a.update), kw
    # another job seed too
    x, y = data()
    e = LocalTrainer(model(), cfg, x, y, seed=1).train(g0, INDICES, client=5, round=2)
    assert not all(torch.equal(a.update[n], e.update[n]) for n in a.update)


def test_training_leaves_global_rngs_alone():
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    trainer(train_cfg(local_steps=3)).train(flat_params(model()), INDICES, 0, 0)
    assert torch.equal(torch.rand(3), want)


def test_local_epochs_sets_steps():
    t = trainer(train_cfg(local_epochs=2.0, batch_size=16, local_steps=1))
    res = t.train(flat_params(t.model), INDICES, 0, 0)
    assert res.steps == math.ceil(2.0 * 50 / 16)
    res = t.train(flat_params(t.model), INDICES[:5], 0, 0)  # batch larger than the data set
    assert res.steps == 1 and res.n_samples == 5


def _full_gradient(m, x, y, wd: float = 0.0):
    m.zero_grad()
    loss = F.cross_entropy(m(x), y)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    return {n: g + wd * p.detach() for (n, p), g in zip(m.named_parameters(), grads)}, float(loss.detach())


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_fedsgd_full_batch_is_exact_gradient(wd):
    n = 2600  # more than one 1024-sample chunk, and a ragged last chunk
    cfg = train_cfg(algorithm="fedsgd", full_batch=True, weight_decay=wd)
    t = trainer(cfg, n=n, name="logreg")
    g0 = flat_params(t.model)
    idx = np.arange(n)[::-1].copy()  # order must not matter
    res = t.train(g0, idx, client=0, round=0)
    x, y = data(n)
    ref = model("logreg")
    load_flat_(ref, g0)
    want, loss = _full_gradient(ref, x, y, wd)
    assert res.steps == 1 and res.n_samples == n
    assert res.loss == pytest.approx(loss, rel=1e-5)
    for name, g in res.update.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6)
    # the model itself is not moved by fedsgd
    assert torch.equal(flat_params(t.model), g0)
    # chunking does not matter: the same client data in one small chunk
    small = trainer(cfg, n=n, name="logreg").train(g0, idx[:700], client=0, round=0)
    load_flat_(ref, g0)
    want_small, _ = _full_gradient(ref, x[torch.from_numpy(idx[:700])], y[torch.from_numpy(idx[:700])], wd)
    for name, g in small.update.items():
        torch.testing.assert_close(g, want_small[name], rtol=1e-4, atol=1e-6)


def test_fedsgd_minibatch_gradient():
    cfg = train_cfg(algorithm="fedsgd", batch_size=16)
    t = trainer(cfg)
    g0 = flat_params(t.model)
    res = t.train(g0, INDICES, client=4, round=7)
    (b,) = batches(torch.from_numpy(INDICES), 16, 1, torch_generator(0, "local-batches", 7, 4))
    x, y = data()
    ref = model()
    load_flat_(ref, g0)
    want, loss = _full_gradient(ref, x[b], y[b])
    for name, g in res.update.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)
    assert res.loss == pytest.approx(loss, rel=1e-6) and res.steps == 1


# -------------------------------------------------------------- aggregation

def test_client_weights():
    assert client_weights([10, 30], "samples") == [0.25, 0.75]
    assert client_weights([10, 30], "equal") == [0.5, 0.5]
    assert client_weights([0, 0, 0], "samples") == pytest.approx([1 / 3] * 3)
    w = client_weights([3, 5, 11, 1], "samples")
    assert sum(w) == pytest.approx(1.0) and w == pytest.approx([3 / 20, 5 / 20, 11 / 20, 1 / 20])
    assert client_weights([7], "samples") == [1.0]


@pytest.mark.parametrize("lr, mu", [(1.0, 0.0), (0.5, 0.9), (2.0, 0.3)])
def test_server_optimizer_heavy_ball(lr, mu):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(5)]
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    want = theta.clone()
    opt = ServerOptimizer(lr, mu)
    v = torch.zeros(6, dtype=torch.float64)
    for gr in grads:
        g_before = gr.clone()
        opt.step(theta, gr)
        v = mu * v + g_before
        want = want - lr * v
        torch.testing.assert_close(theta, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(gr, g_before)  # the aggregated update is not modified
    sd = opt.state_dict()
    assert sd["lr"] == lr and sd["momentum"] == mu
    if mu:
        torch.testing.assert_close(sd["velocity"], v)
    else:
        assert sd["velocity"] is None


def test_plain_fedavg_step_is_weighted_mean_of_models():
    # lr = 1, mu = 0, update = global - local: the new global model is the weighted mean of local models
    theta = torch.tensor([1.0, 2.0, 3.0])
    locals_ = [torch.tensor([0.0, 2.0, 4.0]), torch.tensor([2.0, 2.0, 0.0])]
    w = client_weights([1, 3], "samples")
    g = sum(wi * (theta - m) for wi, m in zip(w, locals_))
    ServerOptimizer(1.0).step(theta, g)
    torch.testing.assert_close(theta, 0.25 * locals_[0] + 0.75 * locals_[1])


# --------------------------------------------------------------- evaluation

def test_evaluate_known_outputs():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.5, 0.2, 0.1],
                           [0.0, 0.0, 1.0], [3.0, 2.0, 1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 2, 2, 1])
    m = torch.nn.Identity()  # the "model" outputs its input: logits are known
    want_acc = 5 / 7  # rows 2 and 5 are wrong
    want_loss = float(F.cross_entropy(logits, y))
    for batch in (2048, 3, 1):
        loss, acc = evaluate(m, logits, y, batch=batch)
        assert acc == pytest.approx(want_acc) and loss == pytest.approx(want_loss, rel=1e-6)
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        lin.bias.zero_()
    lin.train()
    loss, acc = evaluate(lin, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert acc == 0.5 and not lin.training
