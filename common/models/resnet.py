"""A 3D ResNet-10 image encoder (one basic block per stage), made for federation and DP.

Layout as MONAI's / Med3D's ResNet-10 (stem, four stages of one basic block,
widths ``w, 2w, 4w, 8w``), with two changes that matter here:
GroupNorm instead of BatchNorm (no per-site running statistics to average, and
Opacus cannot clip per-sample gradients through batch statistics), and no
in-place operation anywhere (the residual sum is ``out + identity``, ReLUs are
not in-place), so Opacus' standard ``hooks`` mode computes per-sample
gradients; MONAI's ResNet fails there on its in-place residual add.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= ``max_groups``) of >= 2 channels each that divide ``channels``.

    Two channels per group at least, so a 1x1x1 feature map (16^3 input) still normalises.
    """
    groups = max([g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= 2] or [1])
    return nn.GroupNorm(groups, channels)


class BasicBlock3d(nn.Module):
    """conv3-GN-ReLU-conv3-GN plus a (projected when the shape changes) shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.norm2 = group_norm(out_ch)
        self.act = nn.ReLU()
        self.shortcut = (nn.Sequential(nn.Conv3d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                                       group_norm(out_ch))
                         if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet10Encoder3d(nn.Module):
    """3D ResNet-10 encoder: (batch, in_channels, D, H, W) -> (batch, 2 * widths[-1]).

    ``in_channels`` = phases + tumour mask (the mask is the last channel).
    ``widths``: the four stage widths (default ``(w, 2w, 4w, 8w)`` for
    ``width`` = w). The stem is a stride-2 3x3x3 convolution, stages 2-4
    halve the resolution again, so D, H, W >= 16. The embedding is the global
    average of the last feature map concatenated with its average inside the
    (downsampled) tumour mask, as the small CNN does.
    """

    def __init__(self, in_channels: int, width: int = 16, widths: Sequence[int] | None = None):
        super().__init__()
        if in_channels < 2:
            raise ValueError(f"in_channels must be >= 2 (phases + mask), got {in_channels}")
        if widths is None:
            if width < 1:
                raise ValueError(f"width must be >= 1, got {width}")
            widths = (width, 2 * width, 4 * width, 8 * width)
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive stage widths, got {widths}")
        self.stem = nn.Sequential(nn.Conv3d(in_channels, widths[0], kernel_size=3, stride=2, padding=1, bias=False),
                                  group_norm(widths[0]), nn.ReLU())
        blocks, in_ch = [], widths[0]
        for i, out_ch in enumerate(widths):
            blocks.append(BasicBlock3d(in_ch, out_ch, stride=1 if i == 0 else 2))
            in_ch = out_ch
        self.stages = nn.Sequential(*blocks)
        self.out_features = 2 * widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        mask = nn.functional.adaptive_avg_pool3d(x[:, -1:], features.shape[2:])
        inside = (features * mask).sum(dim=(2, 3, 4)) / mask.sum(dim=(2, 3, 4)).clamp(min=1e-3)
        return torch.cat([features.mean(dim=(2, 3, 4)), inside], dim=1)
