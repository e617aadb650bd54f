"""Self-supervised pretraining of the CNN encoder: a fully convolutional masked autoencoder (FCMAE).

As in seed 001 (SW-FCMAE), the encoder learns from scans alone, labelled or not: random cubes of
``patch`` voxels of the phase channels are hidden (set to 0, the normalised tissue mean), the encoder
(:class:`~hccfed.common.models.fusion.SmallCNN3d`, the fusion model's, so its weights carry over) sees
the rest and the tumour mask, and a light transposed-convolution decoder reconstructs every phase.
The loss is the squared error on the hidden voxels only, each weighted by ``1 + tumour_weight`` inside
the tumour mask and 1 outside, so the reconstruction of the tumour (enhancement, wash-out, texture:
what predicts recurrence) counts more than that of the liver around it (the sample weighting here is
by voxel; the seed weights samples, which a site's small cohort makes noisy).

GroupNorm, no batch statistics: the model is federated by plain weight averaging.
"""

from __future__ import annotations

import torch
from torch import nn

from hccfed.common.models.fusion import SmallCNN3d


def _up(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(in_ch, out_ch, kernel_size=2, stride=2), nn.GroupNorm(max(1, out_ch // 4), out_ch),
                         nn.ReLU())


class MaskedAutoencoder3d(nn.Module):
    """The CNN encoder with a reconstruction decoder; ``loss(images, generator)`` is the objective.

    images (B, C, D, H, W): the phase channels then the tumour mask (the fusion model's input), with D,
    H, W multiples of 8 and of ``patch``.
    """

    def __init__(self, in_channels: int, width: int = 12, patch: int = 4, mask_ratio: float = 0.6,
                 tumour_weight: float = 4.0):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0 or patch < 1 or tumour_weight < 0:
            raise ValueError(f"need 0 < mask_ratio < 1, patch >= 1, tumour_weight >= 0; got {mask_ratio}, {patch}, "
                             f"{tumour_weight}")
        self.encoder = SmallCNN3d(in_channels, width)
        self.decoder = nn.Sequential(_up(4 * width, 2 * width), _up(2 * width, width),
                                     nn.ConvTranspose3d(width, in_channels - 1, kernel_size=2, stride=2))
        self.patch, self.mask_ratio, self.tumour_weight = patch, mask_ratio, tumour_weight

    def hidden(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 1, D, H, W) 1 where a voxel is hidden: whole cubes of ``patch`` voxels, each with
        probability ``mask_ratio``."""
        b, _, *size = images.shape
        if any(s % 8 or s % self.patch for s in size):
            raise ValueError(f"the masked autoencoder needs crops whose edges are multiples of 8 and of the patch "
                             f"({self.patch}); got {tuple(size)}")
        grid = [s // self.patch for s in size]
        cubes = (torch.rand((b, 1, *grid), generator=generator) < self.mask_ratio).to(images.dtype)
        for axis in (2, 3, 4):
            cubes = cubes.repeat_interleave(self.patch, dim=axis)
        return cubes.to(images.device)

    def reconstruct(self, images: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The phases reconstructed from the visible voxels (and the whole tumour mask)."""
        visible = torch.cat([images[:, :-1] * (1.0 - hidden), images[:, -1:]], dim=1)
        return self.decoder(self.encoder.stages(visible))

    def loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hidden = self.hidden(images, generator)
        error = (self.reconstruct(images, hidden) - images[:, :-1]) ** 2
        weight = hidden * (1.0 + self.tumour_weight * images[:, -1:])
        return (error * weight).sum() / (weight.sum() * error.shape[1]).clamp(min=1.0)


def load_pretrained_encoder(model: nn.Module, path: str) -> dict:
    """Put the encoder weights of ``hccfed pretrain``'s file into a fusion model (in place); returns the
    file's description. The encoder must be the file's (same kind and width)."""
    saved = torch.load(path, weights_only=True)
    if getattr(model, "encoder_name", None) != saved["meta"]["encoder"]:
        raise ValueError(f"{path}: a pretrained {saved['meta']['encoder']} encoder, but the model's encoder is "
                         f"{getattr(model, 'encoder_name', None)!r}")
    try:
        model.encoder.load_state_dict(saved["encoder"])
    except RuntimeError as err:
        raise ValueError(f"{path}: the pretrained encoder does not fit the model ({saved['meta']}): "
                         f"{str(err).splitlines()[0]}") from None
    return dict(saved["meta"])
