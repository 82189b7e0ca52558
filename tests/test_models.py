"""Models: shapes, parameter counts, seeding, no buffers, flat views, trainability."""

from __future__ import annotations

import pytest
import torch

from hpcfl.config.schema import SCHEMA
from hpcfl.errors import ConfigError
from hpcfl.models import build_model, flat_params, load_flat_, model_numel, param_table
from hpcfl.models.resnet import gn_groups

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
VECTOR_SHAPE = (60,)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cfg(name: str, **over) -> dict:
    c = {k: f.default for k, f in SCHEMA["model"].items()}
    c.update(name=name, **over)
    return c


def conv_cfg(name: str, shape: tuple[int, ...]) -> dict:
    # digits-sized images need 'same' padding for cnn2
    return cfg(name, cnn_padding="same" if shape[-1] < 16 else "valid")


CASES = (
    [(cfg(n), s) for n in ("logreg", "mlp") for s in IMAGE_SHAPES + [VECTOR_SHAPE]]
    + [(conv_cfg(n, s), s) for n in ("cnn2", "resnet") for s in IMAGE_SHAPES]
    + [(cfg("cnn2", cnn_padding="same"), (1, 28, 28)), (cfg("resnet", resnet_stages=4), (1, 8, 8)),
       (cfg("resnet", resnet_width=12, resnet_stages=1), (3, 32, 32)), (cfg("mlp", hidden=[]), VECTOR_SHAPE),
       (cfg("mlp", hidden=[32, 16]), (1, 28, 28))]
)


def case_id(case) -> str:
    c, s = case
    return f"{c['name']}-{'x'.join(map(str, s))}"


def batch(shape: tuple[int, ...], n: int = 8, n_classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, n_classes, (n,), generator=g)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_output_shape_and_no_buffers(case):
    c, shape = case
    model = build_model(c, shape, 10, seed=0)
    x, _ = batch(shape, n=3)
    assert model(x).shape == (3, 10)
    assert list(model.buffers()) == []
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cnn2_valid_mnist_param_count():
    model = build_model(cfg("cnn2", cnn_padding="valid"), (1, 28, 28), 10, seed=0)
    assert model_numel(model) == 431_080
    assert dict(param_table(model))["fc1.weight"] == (500, 800)


def test_cnn2_fc_size_follows_input():
    assert dict(param_table(build_model(cfg("cnn2"), (3, 32, 32), 10, 0)))["fc1.weight"] == (500, 1250)
    same8 = build_model(cfg("cnn2", cnn_padding="same"), (1, 8, 8), 10, 0)
    assert dict(param_table(same8))["fc1.weight"] == (500, 200)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 15, 15), (1, 28, 8)])
def test_cnn2_valid_too_small_names_padding(shape):
    with pytest.raises(ConfigError) as ei:
        build_model(cfg("cnn2", cnn_padding="valid"), shape, 10, 0)
    assert ei.value.key == "model.cnn_padding"
    assert "model.cnn_padding" in str(ei.value) and "'same'" in str(ei.value)


def test_cnn2_no_padding_fits():
    with pytest.raises(ConfigError, match="model.cnn_padding.*no cnn_padding fits"):
        build_model(cfg("cnn2", cnn_padding="same"), (1, 3, 3), 10, 0)


@pytest.mark.parametrize("name", ["cnn2", "resnet"])
def test_conv_model_rejects_vector_input(name):
    with pytest.raises(ConfigError) as ei:
        build_model(cfg(name), VECTOR_SHAPE, 10, 0)
    assert ei.value.key == "model.name"
    assert "(60,)" in str(ei.value)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(cfg("vgg"), VECTOR_SHAPE, 10, 0)
    with pytest.raises(ConfigError, match="model.hidden"):
        build_model(cfg("mlp", hidden=[0]), VECTOR_SHAPE, 10, 0)


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_seeded_init(case):
    c, shape = case
    torch.manual_seed(123)
    a = flat_params(build_model(c, shape, 10, seed=7))
    torch.manual_seed(456)  # the global RNG must not matter
    b = flat_params(build_model(c, shape, 10, seed=7))
    other = flat_params(build_model(c, shape, 10, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, other)


def test_global_rng_untouched():
    torch.manual_seed(99)
    before = torch.get_rng_state()
    for c, shape in CASES:
        build_model(c, shape, 10, seed=1)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flat_round_trip(case):
    c, shape = case
    model = build_model(c, shape, 10, seed=0)
    table = param_table(model)
    assert [n for n, _ in table] == [n for n, _ in model.named_parameters()]
    flat = flat_params(model)
    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.numel() == model_numel(model)
    # order: the flat vector is the concatenation in param_table order
    params = dict(model.named_parameters())
    off = 0
    for name, shp in table:
        n = params[name].numel()
        assert tuple(params[name].shape) == shp
        assert torch.equal(flat[off:off + n], params[name].detach().reshape(-1))
        off += n
    # a copy, not a view
    flat[0] += 1.0
    assert not torch.equal(flat, flat_params(model))
    # load a different vector, read it back exactly
    new = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(3))
    load_flat_(model, new)
    assert torch.equal(flat_params(model), new)
    assert all(p.requires_grad for p in model.parameters())


def test_load_flat_rejects_wrong_size():
    model = build_model(cfg("logreg"), VECTOR_SHAPE, 10, 0)
    with pytest.raises(ValueError, match="elements"):
        load_flat_(model, torch.zeros(model_numel(model) + 1))


def test_gn_groups_divide():
    for c in (1, 3, 6, 12, 16, 20, 64):
        g = gn_groups(c)
        assert c % g == 0 and g <= 8
    assert gn_groups(16) == 8 and gn_groups(12) == 6


@pytest.mark.parametrize(
    "case",
    [(cfg("logreg"), VECTOR_SHAPE), (cfg("mlp"), (1, 8, 8)), (cfg("cnn2", cnn_padding="same"), (1, 8, 8)),
     (cfg("cnn2"), (1, 28, 28)), (cfg("resnet"), (3, 32, 32)), (cfg("resnet", resnet_stages=4), (1, 8, 8))],
    ids=case_id)
def test_sgd_reduces_loss(case):
    c, shape = case
    model = build_model(c, shape, 10, seed=0)
    x, y = batch(shape, n=16, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        first = loss_fn(model(x), y).item()
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn(model(x), y).item()
    assert last < 0.9 * first
