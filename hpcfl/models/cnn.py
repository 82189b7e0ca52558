"""The two-conv CNN of LBGM's experiments (Azam et al., ICLR 2022; methods.md §5.7).

conv(C→20, 5×5) → ReLU → maxpool 2 → conv(20→50, 5×5) → ReLU → maxpool 2 →
FC(→500) → ReLU → FC(500→classes). ``padding="valid"`` is the original
(431,080 parameters on 1×28×28 with 10 classes); ``"same"`` pads by 2 so that
small images such as digits' 8×8 survive both conv+pool stages.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CNN2", "cnn2_feature_hw", "cnn2_min_side"]

_PAD = {"valid": 0, "same": 2}
_K = 5


def _side(n: int, pad: int) -> int:
    """Spatial size after the two conv+pool stages, or 0 if it collapses."""
    for _ in range(2):
        n = n + 2 * pad - _K + 1
        if n < 1:
            return 0
        n //= 2
        if n < 1:
            return 0
    return n


def cnn2_feature_hw(h: int, w: int, padding: str) -> tuple[int, int]:
    """(H, W) of the last feature map; a 0 means the image is too small."""
    pad = _PAD[padding]
    return _side(h, pad), _side(w, pad)


def cnn2_min_side(padding: str) -> int:
    """Smallest image side that this padding accepts."""
    pad = _PAD[padding]
    n = 1
    while _side(n, pad) < 1:
        n += 1
    return n


class CNN2(nn.Module):
    """LBGM's CNN; the FC input size is derived from the (checked) input shape."""

    def __init__(self, input_shape: tuple[int, int, int], n_classes: int, padding: str = "valid"):
        super().__init__()
        c, h, w = input_shape
        fh, fw = cnn2_feature_hw(h, w, padding)
        if fh < 1 or fw < 1:
            raise ValueError(f"input {input_shape} too small for cnn2 padding {padding!r}")
        pad = _PAD[padding]
        self.conv1 = nn.Conv2d(c, 20, _K, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, _K, padding=pad)
        self.fc1 = nn.Linear(50 * fh * fw, 500)
        self.fc2 = nn.Linear(500, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
