"""A small ResNet-style CNN with GroupNorm.

GroupNorm instead of BatchNorm for two reasons: it has no running-statistics
buffers, so the model state is exactly its parameters (all the FL loop
communicates), and BatchNorm degrades under non-IID client data while
GroupNorm does not (Hsieh et al., "The Non-IID Data Quagmire of Decentralized
Machine Learning", ICML 2020), which made it the usual FL choice.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ResNet", "BasicBlock", "gn_groups"]


def gn_groups(channels: int) -> int:
    """The largest group count <= 8 that divides ``channels``."""
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups(channels), channels)


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the GroupNorm that follows has its own shift.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with GroupNorm plus an identity or 1×1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3(cin, cout, stride)
        self.gn1 = _gn(cout)
        self.conv2 = _conv3(cout, cout)
        self.gn2 = _gn(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(cin, cout, 1, stride=stride, bias=False), gn=_gn(cout)))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3×3(C→w)+GN+ReLU, one BasicBlock per stage (width w·2^s, stride 2
    from stage 1 on), global average pool, Linear. Padding 1 and stride-2 convs
    keep every spatial size ≥ 1, so 8×8 inputs work with up to 4 stages.
    """

    def __init__(self, in_channels: int, n_classes: int, width: int = 16, stages: int = 3):
        super().__init__()
        self.stem = _conv3(in_channels, width)
        self.stem_gn = _gn(width)
        blocks = []
        cin = width
        for s in range(stages):
            cout = width * 2**s
            blocks.append(BasicBlock(cin, cout, stride=1 if s == 0 else 2))
            cin = cout
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_gn(self.stem(x)))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))
