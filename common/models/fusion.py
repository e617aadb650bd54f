"""Fusion model: a 3D CNN over the phase channels plus the clinical vector.

As in the seeds (DLRCR, RDC, ViT-fDL) the image embedding and the harmonized
clinical vector are concatenated and layer-normalised, then a small head gives
two outputs: the early-recurrence logit and a Cox log-risk. Higher outputs mean
higher risk. GroupNorm (no batch statistics) and no in-place operations, so the
model is federated without per-site running statistics and works under Opacus.
"""

from __future__ import annotations

import torch
from torch import nn

ENCODERS = ("cnn", "none")


def _block(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    groups = max(1, out_ch // 4)
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(),
        nn.Conv3d(out_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(),
    )


class SmallCNN3d(nn.Module):
    """A compact 3D CNN: four stride-2 stages, global average pooling.

    Input (batch, in_channels, D, H, W) with D, H, W >= 16; output (batch, 8 * width).
    Sized for CPU sites; the full ResNet-10 / ViT encoders are for GPU sites.
    """

    def __init__(self, in_channels: int, width: int = 12):
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        self.stages = nn.Sequential(
            _block(in_channels, width, stride=2),
            _block(width, 2 * width, stride=2),
            _block(2 * width, 4 * width, stride=2),
            _block(4 * width, 8 * width, stride=2),
        )
        self.out_features = 8 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3, 4))


class FusionNet(nn.Module):
    """Image encoder + clinical vector -> (early-recurrence logit, Cox log-risk).

    ``encoder="none"`` gives the clinical-only model through the same code path.
    forward(images (B, C, D, H, W) float32, clinical (B, F) float32)
    -> (logit (B,), log_risk (B,)).
    """

    def __init__(self, in_channels: int, n_clinical: int, encoder: str = "cnn",
                 width: int = 12, hidden: int = 32, dropout: float = 0.2):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if n_clinical < 0:
            raise ValueError(f"n_clinical must be >= 0, got {n_clinical}")
        self.encoder_name = encoder
        self.encoder = SmallCNN3d(in_channels, width) if encoder == "cnn" else None
        n_image = self.encoder.out_features if self.encoder is not None else 0
        if n_image + n_clinical == 0:
            raise ValueError("the model needs an image encoder or clinical features")
        self.norm = nn.LayerNorm(n_image + n_clinical)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(n_image + n_clinical, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )

    def forward(self, images: torch.Tensor, clinical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [clinical]
        if self.encoder is not None:
            parts.insert(0, self.encoder(images))
        out = self.head(self.norm(torch.cat(parts, dim=1)))
        return out[:, 0], out[:, 1]


def build_model(encoder: str, in_channels: int, n_clinical: int, width: int = 12, seed: int = 0) -> FusionNet:
    """A freshly initialised FusionNet; the same seed gives the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = FusionNet(in_channels, n_clinical, encoder=encoder, width=width)
    torch.random.set_rng_state(generator_state)
    return model
