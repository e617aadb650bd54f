"""Self-supervised pretraining of the image encoders, on scans alone (labelled or not).

Two objectives, one per encoder family, each the one its seed used; :func:`pretraining_model` picks it
from the run's encoder. Both expose ``loss(images, generator)``, ``after_step()`` (called after each
optimiser step) and ``pretrained_encoder()`` (the module whose weights go to the fusion model).

**CNN: a fully convolutional masked autoencoder (FCMAE).**

As in seed 001 (SW-FCMAE), the encoder learns from scans alone, labelled or not: random cubes of
``patch`` voxels of the phase channels are hidden (set to 0, the normalised tissue mean), the encoder
(:class:`~hccfed.common.models.fusion.SmallCNN3d`, the fusion model's, so its weights carry over) sees
the rest and the tumour mask, and a light transposed-convolution decoder reconstructs every phase.
The loss is the squared error on the hidden voxels only, each weighted by ``1 + tumour_weight`` inside
the tumour mask and 1 outside, so the reconstruction of the tumour (enhancement, wash-out, texture:
what predicts recurrence) counts more than that of the liver around it (the sample weighting here is
by voxel; the seed weights samples, which a site's small cohort makes noisy).

GroupNorm, no batch statistics: the model is federated by plain weight averaging.

**ViT: DINO self-distillation with register tokens** (seed 000's DINOv2, scaled to a site's CPU).
A student ViT (the fusion model's :class:`~hccfed.common.models.vit.ViTEncoder3d`, registers included)
and a projection head map each view of a scan to a distribution over ``prototypes``; a teacher, the
exponential moving average of the student (updated after each step, never by gradients), gives the
targets: its outputs on two global views (the whole crop, jittered), centred (a running mean of the
teacher's outputs, against collapse onto one prototype) and sharpened (temperature 0.04). The student
sees the two global views and ``n_local`` local views (random sub-cubes of half the crop's edge: the
multi-crop that makes it relate a part of the tumour region to the whole) and is trained by the
cross-entropy from each teacher target to each of its outputs on the other views. The teacher's
encoder is the one kept (as in DINO). Federated, the student, head, teacher and centre are averaged
alike; each site's teacher follows its own student between averagings.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from hccfed.common.atomic_io import atomic_write
from hccfed.common.models.fusion import SmallCNN3d
from hccfed.common.models.vit import ViTEncoder3d


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

    def after_step(self) -> None:
        """Nothing to do after an optimiser step (the objective has no teacher)."""

    def pretrained_encoder(self) -> nn.Module:
        return self.encoder


class DinoHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> cosine logits over the prototypes."""

    def __init__(self, in_features: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes.weight, dim=-1))


class DinoViT3d(nn.Module):
    """The ViT encoder trained by self-distillation (see the module's docstring); ``loss(images,
    generator)`` is the objective for a batch (B, C, D, H, W) of phase channels then the tumour mask,
    D, H, W multiples of the patch size and at least twice it (the local views are half the crop)."""

    def __init__(self, in_channels: int, width: int = 12, patch_size: int = 8, depth: int = 4, heads: int = 4,
                 registers: int = 4, prototypes: int = 64, hidden: int = 64, bottleneck: int = 32,
                 n_local: int = 2, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 teacher_momentum: float = 0.99, center_momentum: float = 0.9, jitter: float = 0.1):
        super().__init__()
        if not 0.0 <= teacher_momentum < 1.0 or not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"momenta must be in [0, 1); got teacher {teacher_momentum}, centre {center_momentum}")
        if student_temperature <= 0 or teacher_temperature <= 0 or n_local < 0 or prototypes < 2 or jitter < 0:
            raise ValueError("need temperatures > 0, n_local >= 0, prototypes >= 2, jitter >= 0")
        self.encoder = ViTEncoder3d(in_channels, width, patch_size=patch_size, depth=depth, heads=heads,
                                    registers=registers)
        self.head = DinoHead(self.encoder.out_features, hidden, bottleneck, prototypes)
        self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(prototypes))
        self.patch_size, self.n_local, self.jitter = patch_size, n_local, jitter
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.teacher_momentum, self.center_momentum = teacher_momentum, center_momentum

    def _jittered(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A view: per-sample mirror flips and, on the phases, a random gain, offset and noise (the
        mask channel only flipped)."""
        b, c = images.shape[:2]
        out = images
        for axis in (2, 3, 4):
            flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
            out = torch.where(flip[:, None, None, None, None], torch.flip(out, dims=(axis,)), out)
        gain = 1.0 + self.jitter * torch.randn((b, c - 1, 1, 1, 1), generator=generator)
        offset = self.jitter * torch.randn((b, c - 1, 1, 1, 1), generator=generator)
        noise = self.jitter * torch.randn((b, c - 1, *images.shape[2:]), generator=generator)
        phases = out[:, :-1] * gain.to(images) + offset.to(images) + noise.to(images)
        return torch.cat([phases, out[:, -1:]], dim=1)

    def _local(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random sub-cube of each scan, half the crop's edge (rounded down to the patch size)."""
        size = [max(self.patch_size, (s // 2) // self.patch_size * self.patch_size) for s in images.shape[2:]]
        crops = []
        for sample in images:
            start = [int(torch.randint(0, s - k + 1, (), generator=generator)) for s, k in zip(images.shape[2:], size)]
            crops.append(sample[:, start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                                start[2]:start[2] + size[2]])
        return torch.stack(crops)

    def loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        edges = images.shape[2:]
        if any(s % self.patch_size or s < 2 * self.patch_size for s in edges):
            raise ValueError(f"DINO pretraining needs crop edges that are multiples of the ViT patch "
                             f"({self.patch_size}) and at least twice it; got {tuple(edges)}")
        global_views = [self._jittered(images, generator) for _ in range(2)]
        local_views = [self._jittered(self._local(images, generator), generator) for _ in range(self.n_local)]
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_encoder(v)) for v in global_views]
            targets = [torch.softmax((t - self.center) / self.teacher_temperature, dim=-1) for t in teacher]
        student = [torch.log_softmax(self.head(self.encoder(v)) / self.student_temperature, dim=-1)
                   for v in global_views + local_views]
        terms = [-(target * student[j]).sum(dim=-1).mean()
                 for i, target in enumerate(targets) for j in range(len(student)) if j != i]
        with torch.no_grad():
            batch_center = torch.cat(teacher).mean(dim=0)
            self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))
        return torch.stack(terms).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        """The teacher moves toward the student (exponential moving average of the weights)."""
        m = self.teacher_momentum
        for student, teacher in ((self.encoder, self.teacher_encoder), (self.head, self.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach() * (1.0 - m))

    def pretrained_encoder(self) -> nn.Module:
        return self.teacher_encoder


#: The local optimiser's learning rate of a pretraining round (in process and over Flower alike).
PRETRAIN_LEARNING_RATE = 1e-3


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> OrderedDict:
    """FedAvg of state dicts, in the order given: each entry the weighted mean of the sites' entries,
    summed in float64 and cast back to the entry's dtype (the in-process and the Flower pretraining use
    this one function, so that the same replies in the same order give the same weights bit for bit)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"weighted_average: {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weighted_average: the weights must sum to more than 0, got {list(weights)}")
    return OrderedDict((k, sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype))
                       for k in states[0])


def encoder_meta(run, rounds: int, scans: Mapping[str, int], seconds: float) -> dict:
    """What an encoder file says of itself: the encoder (kind, width, ViT shape), objective, rounds, seed
    and each site's number of scans."""
    return {"encoder": run.encoder, "width": run.encoder_width, "objective": PRETRAINING_OBJECTIVES[run.encoder],
            **({"vit_patch_size": run.vit_patch_size, "vit_depth": run.vit_depth, "vit_heads": run.vit_heads,
                "vit_registers": run.vit_registers} if run.encoder == "vit" else {}),
            "rounds": int(rounds), "seed": run.seed, "scans": {s: int(n) for s, n in scans.items()},
            "seconds": float(seconds)}


def save_encoder(model: nn.Module, meta: dict, out) -> None:
    """The file ``--pretrained-encoder`` reads: {"encoder": the kept encoder's state, "meta": meta}."""
    state = {"encoder": model.pretrained_encoder().state_dict(), "meta": meta}
    atomic_write(Path(out), lambda tmp: torch.save(state, tmp))


PRETRAINING_OBJECTIVES = {"cnn": "masked autoencoder (FCMAE)", "vit": "DINO self-distillation with register tokens"}


def pretraining_model(run, in_channels: int) -> nn.Module:
    """The self-supervised model for ``run``'s encoder (its width and ViT options, so the encoder's
    weights fit the run's fusion model), seeded by the run's seed."""
    if run.encoder not in PRETRAINING_OBJECTIVES:
        raise ValueError(f"pretraining is implemented for the {' and '.join(PRETRAINING_OBJECTIVES)} encoders "
                         f"({', '.join(PRETRAINING_OBJECTIVES.values())}); got {run.encoder!r}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(run.seed)
    try:
        if run.encoder == "cnn":
            return MaskedAutoencoder3d(in_channels, run.encoder_width)
        return DinoViT3d(in_channels, run.encoder_width, patch_size=run.vit_patch_size, depth=run.vit_depth,
                         heads=run.vit_heads, registers=run.vit_registers)
    finally:
        torch.random.set_rng_state(generator_state)


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
