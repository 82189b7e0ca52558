"""The ``activations`` capture: second moments equal the ones computed by hand, memory stays bounded,
hooks go away, and a trained client's moments give altspace Protocol B bases end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcfl.codecs import CodecState, UpdateCodec
from hpcfl.fl.capture import captures, make_captures
from hpcfl.fl.capture_impl import ActivationCapture, FrequentDirections, conv_patches
from hpcfl.fl.client import LocalTrainer
from hpcfl.errors import ConfigError


# torch warns that an even kernel with padding="same" pads a copy of the input: that is the case tested
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Net(nn.Module):
    """Conv with 'same' padding and an even kernel, a strided dilated conv, a grouped conv, a linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 4, padding="same")
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(4, 6, 1, groups=2)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.keep: list[torch.Tensor] = []

    def forward(self, x):
        outs = []
        for layer in (self.c1, self.c2, self.c3):
            x = layer(x)
            if x.requires_grad:
                x.retain_grad()
            outs.append(x)
            x = torch.relu(x)
        y = self.fc(x.flatten(1))
        if y.requires_grad:
            y.retain_grad()
        self.keep = outs + [y]
        return y


def _by_hand(net: Net, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Moments from retained inputs/output gradients of one forward/backward."""
    out = net(x)
    F.cross_entropy(out, torch.arange(x.shape[0]) % 5).backward()
    o1, o2, o3, y = net.keep
    res = {}
    for name, layer, inp, o in (("c1", net.c1, x, o1), ("c2", net.c2, torch.relu(o1), o2),
                                ("c3", net.c3, torch.relu(o2), o3)):
        inp = inp.detach()
        if layer.groups == 1:
            k = layer.kernel_size
            pad = (1, 2, 1, 2) if layer.padding == "same" else (layer.padding[0],) * 4
            p = F.unfold(F.pad(inp, pad), k, dilation=layer.dilation, stride=layer.stride)
            a = p.transpose(1, 2).reshape(-1, p.shape[1])
        else:  # 1x1 grouped conv: each group's channels are rows of their own
            g = layer.groups
            a = inp.permute(0, 2, 3, 1).reshape(-1, g, inp.shape[1] // g).reshape(-1, inp.shape[1] // g)
        d = o.grad.permute(0, 2, 3, 1).reshape(-1, o.shape[1])
        res[f"{name}.weight"] = (a.double().T @ a.double(), d.double().T @ d.double(), a.shape[0])
    a = torch.relu(o3).detach().flatten(1)
    res["fc.weight"] = (a.double().T @ a.double(), y.grad.double().T @ y.grad.double(), a.shape[0])
    return res


def test_moments_equal_hand_computed_over_several_batches():
    torch.manual_seed(0)
    net = Net()
    cap = make_captures(["activations"], net)[0]
    assert isinstance(cap, ActivationCapture) and "activations" in captures()
    xs = [torch.randn(3, 2, 8, 8) for _ in range(2)]
    want: dict = {}
    for x in xs:  # by hand, without hooks
        net.zero_grad()
        for name, (ac, gc, n) in _by_hand(net, x).items():
            a0, g0, n0 = want.get(name, (0, 0, 0))
            want[name] = (a0 + ac, g0 + gc, n0 + n)
    cap.start()
    for x in xs:
        net.zero_grad()
        F.cross_entropy(net(x), torch.arange(3) % 5).backward()
        with torch.no_grad():  # an evaluation pass is not counted
            net(x)
    side = cap.stop()
    assert set(side) == set(want)
    for name, (ac, gc, n) in want.items():
        got = side[name]
        assert set(got) == {"act_cov", "grad_cov", "count"} and int(got["count"]) == n, name
        w = dict(nn.Module.named_parameters(net))[name]
        assert got["act_cov"].shape[0] == w[0].numel() and got["grad_cov"].shape[0] == w.shape[0], name
        torch.testing.assert_close(got["act_cov"], ac, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["grad_cov"], gc, rtol=1e-5, atol=1e-9)
    for layer in (net.c1, net.c2, net.c3, net.fc):  # hooks removed
        assert not layer._forward_hooks
    assert cap.stop() == {}


def test_conv_patches_reproduce_the_convolution():
    torch.manual_seed(1)
    for conv in (nn.Conv2d(3, 5, 4, padding="same"), nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2),
                 nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")):
        x = torch.randn(2, 3, 9, 9)
        y = conv(x)
        p = conv_patches(conv, x)
        z = (p @ conv.weight.reshape(5, -1).T + conv.bias).reshape(2, y.shape[2], y.shape[3], 5).permute(0, 3, 1, 2)
        torch.testing.assert_close(z, y, rtol=1e-5, atol=1e-5)


def test_large_sides_are_sketched_with_bounded_error(monkeypatch):
    monkeypatch.setattr(ActivationCapture, "max_dim", 40)
    monkeypatch.setattr(ActivationCapture, "sketch_rows", 16)
    net = nn.Sequential(nn.Linear(60, 30), nn.ReLU(), nn.Linear(30, 3))
    cap = make_captures(["activations"], net)[0]
    cap.start()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(25, 60, generator=g) * torch.logspace(0, -2, 60) for _ in range(4)]
    for x in xs:
        net(x).pow(2).sum().backward()
    side = cap.stop()
    assert set(side["0.weight"]) == {"act_sketch", "grad_cov", "count"}  # 60 > 40: sketched
    assert set(side["2.weight"]) == {"act_cov", "grad_cov", "count"}
    s = side["0.weight"]["act_sketch"]
    assert s.shape[0] <= 16 and s.shape[1] == 60
    a = torch.cat(xs).double()
    err = torch.linalg.matrix_norm(a.T @ a - s.T @ s, ord=2)
    assert err <= a.pow(2).sum() / 8 + 1e-9  # Frequent Directions: ||A^T A - S^T S||_2 <= ||A||_F^2 / (l/2)
    fd = FrequentDirections(60, 16)
    for x in xs:
        fd.add(x)
    assert torch.equal(fd.value(), s)  # deterministic: the same batches give the same sketch


def test_trainer_side_feeds_client_bases_end_to_end():
    """LocalTrainer + capture -> ctx.side -> altspace basis=client; the root decodes the same update."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    uc = UpdateCodec({"id": "altspace_ef", "basis": "client", "ratio": 0.2, "rank": 3}, {"min_ndim": 2}, params)
    assert uc.side_inputs == ("activations",)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 4, (64,), generator=g)
    train = {"algorithm": "fedavg", "local_epochs": 1, "local_steps": 0, "batch_size": 16, "lr": 0.1,
             "momentum": 0.0, "weight_decay": 0.0, "full_batch": False}
    tr = LocalTrainer(model, train, x, y, seed=0, captures=make_captures(uc.side_inputs, model))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    res = tr.train(flat, np.arange(64), client=0, round=0)
    assert set(res.side) == {"1.weight", "3.weight"} and int(res.side["1.weight"]["count"]) == 64
    enc = uc.encode(res.update, client=0, round=0, state=CodecState(), want_recon=True, side=res.side)
    dec = uc.decode(enc.data, client=0, round=0, state=CodecState())
    for n, _ in params:
        assert torch.equal(enc.recon[n], dec.update[n])
    assert dec.flags["1.weight"] == dec.flags["3.weight"] == 3  # mapped, bases on the wire
    assert enc.payload_bytes >= 4 * 3 * (12 + 16 + 4 + 12)


def test_unknown_side_input_is_a_config_error():
    with pytest.raises(ConfigError, match="no capture provides"):
        make_captures(["nope"], nn.Linear(2, 2))
