"""Local differential privacy at a site: DP-SGD through Opacus, with an RDP budget.

A site's budget (epsilon, delta) covers the whole federated run: the noise
multiplier is fixed once from the target over the planned number of rounds x
local epochs (Poisson sampling at rate batch_size / n, RDP accountant), and
the spent epsilon after the steps actually taken is recomputed from that
history each round. A site whose next round would exceed its budget does not
train (client/federated.py returns the received weights with
``dp-budget-exhausted`` = 1).

Where the settings come from: the run config keys ``dp-epsilon`` (0 = off),
``dp-delta``, ``dp-max-grad-norm`` and ``dp-sites`` (which sites; empty = all)
ask; the site's own privacy policy (``privacy:`` in its YAML,
client/privacy_policy.py) decides, and its ledger (client/privacy_ledger.py)
records what was spent.

Secret randomness: the Poisson sampling and the Gaussian noise are drawn from
generators reseeded from the operating system's entropy (``secrets``) before
every epoch and every step, never from the run seed, the round or the site id
(all known to the coordinator, who could otherwise regenerate the noise and
subtract it). A DP run is therefore not reproducible, on purpose; a run
without DP still is. Opacus' own ``secure_mode`` needs torchcsprng, which is
not installed here; a 63-bit OS-entropy seed per step gives an attacker who
sees only the noisy weights no seed to replay.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

# Opacus' hooks fire on the first layer although the images need no gradient; harmless, and noisy in logs.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass(frozen=True)
class PrivacyBudget:
    """A site's DP target over the whole run."""

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or not 0 < self.delta < 1 or self.max_grad_norm <= 0:
            raise ValueError(f"need epsilon > 0, 0 < delta < 1, max_grad_norm > 0; got "
                             f"{self.epsilon}, {self.delta}, {self.max_grad_norm}")


def steps_per_epoch(n_patients: int, batch_size: int) -> int:
    """DP-SGD steps per epoch: ceil(n / batch_size), as Opacus' DPDataLoader draws them."""
    if n_patients < 1:
        raise ValueError("no training patients")
    return math.ceil(n_patients / batch_size)


def expected_batch_size(n_patients: int, batch_size: int) -> float:
    """The Poisson sampling's expected batch size, n x rate: the DP loss's fixed normaliser."""
    return n_patients * sample_rate(n_patients, batch_size)


def sample_rate(n_patients: int, batch_size: int) -> float:
    """Poisson sampling rate, 1 / steps per epoch (Opacus' DPDataLoader): expected batch <= batch_size."""
    return 1.0 / steps_per_epoch(n_patients, batch_size)


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(budget: PrivacyBudget, n_patients: int, batch_size: int, planned_steps: int) -> float:
    """Sigma that spends exactly the budget (within 0.01) after ``planned_steps`` (RDP).

    Memoised: a pure function of its arguments that costs ~1.7 s (a search over
    RDP orders), asked by every site every round with the same values.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=budget.epsilon, target_delta=budget.delta,
                                          sample_rate=sample_rate(n_patients, batch_size), steps=planned_steps,
                                          accountant="rdp"))


def epsilon_spent(noise_multiplier: float, rate: float, steps: int, delta: float) -> float:
    """RDP epsilon at ``delta`` after ``steps`` DP-SGD steps (0 before any)."""
    if steps <= 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, rate, int(steps))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": a looser, still valid bound
        return float(accountant.get_epsilon(delta=delta))


def secret_seed() -> int:
    """A 63-bit seed from the operating system's CSPRNG (what DP sampling and noise start from)."""
    return secrets.randbits(63)


class PrivateTraining:
    """Attaches Opacus to one local training call (train_local's ``privacy`` argument).

    ``attach`` wraps the model (GradSampleModule, standard ``hooks`` mode) and
    optimizer (DPOptimizer, Gaussian noise of ``noise_multiplier``), and
    returns a callable giving one epoch of Poisson-sampled index batches.
    The loss is a sum of per-patient terms divided by the fixed expected batch
    size B (training.per_sample_dp_loss), so Opacus runs with
    ``loss_reduction="sum"`` (per-sample gradients are those of each term
    alone, never rescaled by the realised batch) and clips at
    ``max_grad_norm / B``: each patient's term, before the division, is clipped
    at ``max_grad_norm``, and the noise is ``noise_multiplier`` x that bound. The sampling generator is reseeded from OS
    entropy before each epoch and the noise generator (on the model's device)
    before each step: nothing the coordinator knows determines either.
    """

    def __init__(self, noise_multiplier: float, max_grad_norm: float):
        if noise_multiplier <= 0 or max_grad_norm <= 0:
            raise ValueError(f"need noise_multiplier > 0 and max_grad_norm > 0, got {noise_multiplier}, "
                             f"{max_grad_norm}")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, n_patients: int, batch_size: int,
               ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], Iterator[torch.Tensor]]]:
        indices = TensorDataset(torch.arange(n_patients))
        sampling = torch.Generator().manual_seed(secret_seed())
        device = next(model.parameters()).device
        noise = torch.Generator(device=device).manual_seed(secret_seed())
        loader = DPDataLoader.from_data_loader(DataLoader(indices, batch_size=batch_size), generator=sampling)
        clip = self.max_grad_norm / expected_batch_size(n_patients, batch_size)
        with warnings.catch_warnings():
            # Opacus warns that its secure_mode is off: our generators are reseeded from OS entropy instead.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            dp_model, dp_optimizer, dp_loader = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                max_grad_norm=clip, poisson_sampling=False, noise_generator=noise, loss_reduction="sum")

        def epoch() -> Iterator[torch.Tensor]:
            sampling.manual_seed(secret_seed())
            for (batch,) in dp_loader:
                noise.manual_seed(secret_seed())  # the next step's noise: fresh entropy, never replayable
                yield batch

        return dp_model, dp_optimizer, epoch

    @staticmethod
    def detach(dp_model: torch.nn.Module) -> None:
        """Remove Opacus' hooks so the plain model can be reused."""
        if hasattr(dp_model, "_close"):
            dp_model._close()
