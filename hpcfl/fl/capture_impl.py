"""Built-in captures (imported by :func:`hpcfl.fl.capture.captures`).

``activations`` -- per-layer second moments of input activations and output gradients, for
codecs that build bases from them (altspace's Protocol B, methods.md §1.3). For every
``nn.Linear`` and ``nn.Conv2d`` whose weight trains, over all of a client's local steps:

* ``act_cov = sum_rows a a^T`` (in x in), ``a`` = the layer input; for a convolution the rows are
  its input patches (``F.unfold`` with the layer's kernel, stride, padding and dilation:
  ``(B*L, in*kh*kw)``, the column order of ``weight.reshape(out, -1)``);
* ``grad_cov = sum_rows d d^T`` (out x out), ``d`` = dLoss/d(layer output) per row (conv: per
  output position, ``(B*L, out)``);
* ``count`` = rows accumulated.

Memory is O(in^2 + out^2) per layer whatever the number of steps: raw activations are never
kept. A side larger than :attr:`ActivationCapture.max_dim` is summarised instead by a Frequent
Directions sketch (Liberty 2013) ``{act,grad}_sketch`` of ``sketch_rows x dim`` with
``S^T S <= A^T A`` and ``||A^T A - S^T S||_2 <= ||A||_F^2 / (sketch_rows / 2)``: memory O(l dim).
Grouped convolutions sum the moments of their groups (patch dim in/groups*kh*kw).

Output gradients come from a tensor hook on the layer's output (registered in the forward
hook): unlike ``register_full_backward_hook`` it tolerates in-place ops after the layer.
Forward passes without autograd (evaluation) are not counted. The moments are summed in
float64 from float32 products. Their cost lands in the client's ``train_s``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from hpcfl.fl.capture import Capture, register_capture

__all__ = ["ActivationCapture", "conv_patches", "FrequentDirections"]


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input rows a convolution multiplies its reshaped weight with: ``(B*L*groups, in/groups*kh*kw)``."""
    pad = getattr(conv, "_reversed_padding_repeated_twice", None)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
        padding: tuple[int, int] | int = 0
    else:
        padding = conv.padding
    p = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    b, d, length = p.shape
    g = conv.groups
    # (B, g * d/g, L) -> (B, L, g, d/g) -> rows of d/g
    return p.reshape(b, g, d // g, length).permute(0, 3, 1, 2).reshape(-1, d // g)


class FrequentDirections:
    """Deterministic streaming sketch of a row stream: ``S^T S`` approximates ``A^T A`` (Liberty 2013)."""

    def __init__(self, dim: int, rows: int):
        self.dim, self.rows = dim, rows
        self.s = torch.zeros(0, dim, dtype=torch.float64)

    def add(self, a: torch.Tensor) -> None:
        for start in range(0, a.shape[0], self.rows):  # blocks of rows; each is one vectorised SVD
            s = torch.cat([self.s, a[start:start + self.rows].to(torch.float64)])
            if s.shape[0] > self.rows:
                _, sv, vh = torch.linalg.svd(s, full_matrices=False)
                keep = self.rows // 2
                shrink = sv[keep] ** 2 if sv.numel() > keep else sv.new_zeros(())
                sv = torch.sqrt(torch.clamp(sv[:keep] ** 2 - shrink, min=0.0))
                s = sv[:, None] * vh[:keep]
            self.s = s

    def value(self) -> torch.Tensor:
        return self.s.clone()


class _Moments:
    def __init__(self, max_dim: int, rows: int):
        self.max_dim, self.rows = max_dim, rows
        self.acc: dict[str, torch.Tensor | FrequentDirections] = {}
        self.count = 0

    def add(self, key: str, a: torch.Tensor) -> None:
        a = a.detach().float()
        d = a.shape[1]
        cur = self.acc.get(key)
        if d > self.max_dim:
            if cur is None:
                cur = self.acc[key] = FrequentDirections(d, self.rows)
            cur.add(a)
            return
        c = (a.T @ a).to(torch.float64)
        if cur is None:
            self.acc[key] = c
        else:
            cur += c

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, v in self.acc.items():
            if isinstance(v, FrequentDirections):
                out[f"{key}_sketch"] = v.value()
            else:
                out[f"{key}_cov"] = v
        out["count"] = torch.tensor([self.count], dtype=torch.int64)
        return out


@register_capture
class ActivationCapture(Capture):
    """Second moments of each Linear/Conv2d layer's inputs and output gradients (see module doc)."""

    name = "activations"
    max_dim = 4096      # sides above this are sketched, not stored as dim x dim moments
    sketch_rows = 256   # Frequent Directions rows (the sketch keeps sketch_rows / 2 directions)

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._handles: list = []
        self._stats: dict[str, _Moments] = {}
        self._layers: list[tuple[str, nn.Module]] = []
        for mname, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and isinstance(w, nn.Parameter):
                self._layers.append((f"{mname}.weight" if mname else "weight", mod))

    def start(self) -> None:
        self.stop()
        self._stats = {}
        for pname, mod in self._layers:
            if mod.weight.requires_grad:
                self._handles.append(mod.register_forward_hook(partial(self._forward, pname)))

    def _forward(self, pname: str, mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        x = inputs[0]
        if isinstance(mod, nn.Conv2d):
            rows = conv_patches(mod, x.detach())
        else:
            rows = x.detach().reshape(-1, x.shape[-1])
        st = self._stats.get(pname)
        if st is None:
            st = self._stats[pname] = _Moments(self.max_dim, self.sketch_rows)
        st.add("act", rows)
        st.count += rows.shape[0]
        output.register_hook(partial(self._backward, st, isinstance(mod, nn.Conv2d)))

    @staticmethod
    def _backward(st: _Moments, conv: bool, g: torch.Tensor) -> None:
        if conv:  # (B, out, H, W) -> one row per output position (grouped: out stays whole)
            g = g.permute(0, 2, 3, 1)
        st.add("grad", g.reshape(-1, g.shape[-1]))

    def stop(self) -> dict[str, dict[str, torch.Tensor]]:
        for h in self._handles:
            h.remove()
        self._handles = []
        out = {name: st.result() for name, st in self._stats.items()}
        self._stats = {}
        return out
