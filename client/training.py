"""Local training and prediction at a site (plain functions; the ClientApp calls them).

The loss is the class-weighted BCE of the early-recurrence head (patients with
a known label) plus ``cox_weight`` times the Cox partial likelihood of the risk
head (every patient; under DP-SGD the exponential proportional-hazards
likelihood, which is per patient), plus FedProx's proximal term when ``proximal_mu`` > 0.
Augmentation ("flip-shift": mirror flips and small shifts; "affine": MONAI-style
small rotations, scaling, flips and shifts) is drawn from the seeded generator,
so a run is reproducible on CPU. Mixed precision (bf16 autocast) is used on
CUDA only: on CPU it is ~26x slower (measured). With ``privacy`` set, training
is DP-SGD through Opacus (client/privacy.py).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hccfed.client.site_data import SplitData
from hccfed.common.models.losses import cox_partial_likelihood, per_sample_dp_loss, weighted_bce
from hccfed.common.run_config import AUGMENTATIONS

from hccfed.client.privacy import expected_batch_size

if TYPE_CHECKING:
    from hccfed.client.privacy import PrivateTraining



@dataclass(frozen=True)
class TrainSettings:
    """Local training hyper-parameters.

    ``augment``: one of AUGMENTATIONS (True / False mean "flip-shift" / "none").
    ``proximal_mu``: FedProx's mu; the loss gets (mu / 2) * ||w - w_global||^2.
    ``mixed_precision``: bf16 autocast, applied on CUDA devices only.
    """

    epochs: int = 1
    learning_rate: float = 0.002
    batch_size: int = 16
    seed: int = 0
    cox_weight: float = 0.5
    weight_decay: float = 1e-4
    augment: bool | str = True
    max_shift_voxels: int = 2
    max_rotation_deg: float = 10.0
    max_scaling: float = 0.1
    proximal_mu: float = 0.0
    mixed_precision: bool = True
    #: the BCE weight of recurrence-positive patients; None: n_negative / n_positive of the training split
    #: (not under DP-SGD, where it must come from configuration: estimated from the data it would leak)
    positive_weight: float | None = None

    @property
    def augmentation(self) -> str:
        mode = {True: "flip-shift", False: "none"}.get(self.augment, self.augment)  # type: ignore[call-overload]
        if mode not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        return str(mode)


def detect_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _augment(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random mirror flips per axis and an integer circular shift (one draw per batch)."""
    for axis in (2, 3, 4):
        if torch.rand((), generator=generator) < 0.5:
            images = torch.flip(images, dims=(axis,))
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (3,), generator=generator).tolist()
        images = torch.roll(images, shifts=shifts, dims=(2, 3, 4))
    return images


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(n, 3) angles in radians -> (n, 3, 3) rotation matrices Rz @ Ry @ Rx."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def random_affine(images: torch.Tensor, generator: torch.Generator, max_rotation_deg: float = 10.0,
                  max_scaling: float = 0.1, max_shift_voxels: int = 2) -> torch.Tensor:
    """MONAI-style spatial augmentation, one random transform per patient.

    images (n, C, D, H, W) with the tumour mask last. Rotation about each axis
    uniform in +-max_rotation_deg, isotropic scaling in 1 +- max_scaling,
    mirror flip per axis with probability 0.5, shift uniform in
    +-max_shift_voxels. Phases are resampled trilinearly (border padding), the
    mask with nearest neighbour (zero padding) so it stays binary.
    """
    n, size = images.shape[0], torch.tensor(images.shape[2:], dtype=torch.float32)
    angles = (torch.rand(n, 3, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)
    scale = 1 + (torch.rand(n, 1, 1, generator=generator) * 2 - 1) * max_scaling
    flips = torch.where(torch.rand(n, 3, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 3, generator=generator) * 2 - 1) * max_shift_voxels * 2 / size.flip(0)
    matrix = _rotation(angles) * scale * flips[:, None, :]
    theta = torch.cat([matrix, shift[:, :, None]], dim=2).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    phases = F.grid_sample(images[:, :-1], grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = F.grid_sample(images[:, -1:], grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return torch.cat([phases, mask], dim=1)


def augment_batch(images: torch.Tensor, generator: torch.Generator, settings: TrainSettings) -> torch.Tensor:
    """The augmentation ``settings`` names (identity for "none")."""
    mode = settings.augmentation
    if mode == "flip-shift":
        return _augment(images, generator, settings.max_shift_voxels)
    if mode == "affine":
        return random_affine(images, generator, settings.max_rotation_deg, settings.max_scaling,
                             settings.max_shift_voxels)
    return images


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU autocast is far slower)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def proximal_term(model: torch.nn.Module, global_params: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_global||^2 over the trainable parameters (FedProx)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(((p - g) ** 2).sum() for p, g in zip(params, global_params))  # type: ignore[return-value]


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def local_setup(model: torch.nn.Module, settings: TrainSettings, device: torch.device | None
                ) -> tuple[torch.device, torch.Generator, torch.optim.Optimizer]:
    """What a local round starts from: the device (CUDA when present), the model on it in training mode,
    the round's generator (batches, augmentation) and a fresh AdamW."""
    device = device or detect_device()
    model.to(device).train()
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return device, generator, optimizer


def positive_weight(labels: torch.Tensor) -> float:
    """n_negative / n_positive among known labels (1 when either is absent)."""
    n_pos = int((labels == 1).sum())
    n_neg = int((labels == 0).sum())
    return n_neg / n_pos if n_pos and n_neg else 1.0


def train_local(model: torch.nn.Module, data: SplitData, settings: TrainSettings,
                device: torch.device | None = None, privacy: "PrivateTraining | None" = None) -> dict[str, float]:
    """Train ``model`` in place on ``data``; returns {"loss": mean last-epoch loss, "num-examples": n}.

    With ``privacy``, the model is trained with DP-SGD (Opacus, Poisson
    sampling, per-sample clipping and noise) on :func:`per_sample_dp_loss`
    (a sum of per-patient terms over a fixed normaliser, the class weight from
    ``settings.positive_weight``); the risk head then learns from
    the exponential proportional-hazards likelihood instead of Cox's partial
    likelihood (whose risk sets couple the patients of a batch, so per-sample
    clipping would not bound one patient's influence) and FedProx's pull is applied after each
    step instead of through the loss. Returns also "dp-steps" then: every
    Poisson draw counts, an empty one too (it is skipped, not released),
    so the accounting never undercounts.
    """
    if len(data) == 0:
        raise ValueError("no training patients at this site")
    device, generator, optimizer = local_setup(model, settings, device)
    global_params = ([p.detach().clone() for p in model.parameters() if p.requires_grad]
                     if settings.proximal_mu > 0 else [])
    if privacy is not None and settings.positive_weight is None:
        raise ValueError("under DP-SGD the class weight must come from configuration (TrainSettings.positive_weight)")
    pos_weight = positive_weight(data.labels) if settings.positive_weight is None else settings.positive_weight
    trained, batches, expected_batch = model, None, 0.0
    if privacy is not None:
        trained, optimizer, batches = privacy.attach(model, optimizer, len(data), settings.batch_size)
        expected_batch = expected_batch_size(len(data), settings.batch_size)
    epoch_losses: list[float] = []
    steps = 0
    for _ in range(settings.epochs):
        losses = []
        epoch = batches() if batches is not None else _shuffled_batches(len(data), settings.batch_size, generator)
        for idx in epoch:
            if len(idx) == 0:  # Poisson sampling can draw an empty batch: no update, but counted as a step
                steps += 1
                continue
            images = augment_batch(data.images[idx], generator, settings)
            images, clinical = images.to(device), data.clinical[idx].to(device)
            radiomics = None if data.radiomics is None else data.radiomics[idx].to(device)
            with autocast_for(device, settings.mixed_precision and privacy is None):
                logits, log_risk = trained(images, clinical, radiomics)
            logits, log_risk = logits.float(), log_risk.float()
            labels, times, events = data.labels[idx].to(device), data.times[idx].to(device), data.events[idx].to(device)
            if privacy is not None:
                loss = per_sample_dp_loss(logits, log_risk, labels, times, events, pos_weight, settings.cox_weight,
                                          expected_batch)
            else:
                loss = weighted_bce(logits, labels, pos_weight)
                if settings.cox_weight:
                    loss = loss + settings.cox_weight * cox_partial_likelihood(log_risk, times, events)
            if global_params and privacy is None:
                loss = loss + settings.proximal_mu / 2 * proximal_term(model, global_params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if global_params and privacy is not None:
                with torch.no_grad():  # decoupled FedProx pull: data-independent, so DP is unaffected
                    for p, g in zip([p for p in model.parameters() if p.requires_grad], global_params):
                        p.sub_(settings.learning_rate * settings.proximal_mu * (p - g))
            losses.append(float(loss.detach()))
        epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
    if privacy is not None:
        privacy.detach(trained)
    metrics = {"loss": epoch_losses[-1], "num-examples": float(len(data))}
    if privacy is not None:
        metrics["dp-steps"] = float(steps)
    return metrics


@torch.no_grad()
def predict(model: torch.nn.Module, data: SplitData, device: torch.device | None = None,
            batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(early-recurrence logits, Cox log-risks), each shape (n,); higher = higher risk."""
    device = device or detect_device()
    model.to(device).eval()
    logits, risks = [], []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        radiomics = None if data.radiomics is None else data.radiomics[rows].to(device)
        logit, risk = model(data.images[rows].to(device), data.clinical[rows].to(device), radiomics)
        logits.append(logit.cpu().numpy())
        risks.append(risk.cpu().numpy())
    if not logits:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(logits).astype(np.float64), np.concatenate(risks).astype(np.float64)
