"""Local training and prediction at a site (plain functions; the ClientApp calls them).

The loss is the class-weighted BCE of the early-recurrence head (patients with
a known label) plus ``cox_weight`` times the Cox partial likelihood of the risk
head (every patient). Augmentation: random mirror flips and small shifts,
drawn from the seeded generator, so a run is reproducible on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from client.site_data import SplitData
from common.models.losses import cox_partial_likelihood, weighted_bce


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    learning_rate: float = 0.002
    batch_size: int = 16
    seed: int = 0
    cox_weight: float = 0.5
    weight_decay: float = 1e-4
    augment: bool = True
    max_shift_voxels: int = 2


def detect_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _augment(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    for axis in (2, 3, 4):
        if torch.rand((), generator=generator) < 0.5:
            images = torch.flip(images, dims=(axis,))
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (3,), generator=generator).tolist()
        images = torch.roll(images, shifts=shifts, dims=(2, 3, 4))
    return images


def positive_weight(labels: torch.Tensor) -> float:
    """n_negative / n_positive among known labels (1 when either is absent)."""
    n_pos = int((labels == 1).sum())
    n_neg = int((labels == 0).sum())
    return n_neg / n_pos if n_pos and n_neg else 1.0


def train_local(model: torch.nn.Module, data: SplitData, settings: TrainSettings,
                device: torch.device | None = None) -> dict[str, float]:
    """Train ``model`` in place on ``data``; returns {"loss": mean last-epoch loss, "num-examples": n}."""
    if len(data) == 0:
        raise ValueError("no training patients at this site")
    device = device or detect_device()
    model.to(device).train()
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    pos_weight = positive_weight(data.labels)
    epoch_losses: list[float] = []
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=generator)
        losses = []
        for start in range(0, len(data), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            images = data.images[idx]
            if settings.augment:
                images = _augment(images, generator, settings.max_shift_voxels)
            images, clinical = images.to(device), data.clinical[idx].to(device)
            logits, log_risk = model(images, clinical)
            loss = weighted_bce(logits, data.labels[idx].to(device), pos_weight)
            if settings.cox_weight:
                loss = loss + settings.cox_weight * cox_partial_likelihood(
                    log_risk, data.times[idx].to(device), data.events[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(float(np.mean(losses)))
    return {"loss": epoch_losses[-1], "num-examples": float(len(data))}


@torch.no_grad()
def predict(model: torch.nn.Module, data: SplitData, device: torch.device | None = None,
            batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(early-recurrence logits, Cox log-risks), each shape (n,); higher = higher risk."""
    device = device or detect_device()
    model.to(device).eval()
    logits, risks = [], []
    for start in range(0, len(data), batch_size):
        logit, risk = model(data.images[start:start + batch_size].to(device),
                            data.clinical[start:start + batch_size].to(device))
        logits.append(logit.cpu().numpy())
        risks.append(risk.cpu().numpy())
    if not logits:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(logits).astype(np.float64), np.concatenate(risks).astype(np.float64)
