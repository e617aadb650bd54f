"""Local training: augmentations, mixed precision only on CUDA, FedProx, DP-SGD and its budget."""

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from hccfed.client.privacy import (PrivacyBudget, PrivateTraining, epsilon_spent, noise_multiplier_for, sample_rate,
                            steps_per_epoch)
from hccfed.client.site_data import SplitData
from hccfed.client.training import TrainSettings, augment_batch, autocast_for, proximal_term, random_affine, train_local
from hccfed.common.models.fusion import build_model


def _data(n=12, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 5, size, size, size, generator=g)
    images[:, -1] = 0.0
    images[:, -1, 5:11, 5:11, 5:11] = 1.0
    return SplitData(images=images, clinical=torch.randn(n, 7, generator=g),
                     labels=torch.tensor([1, 0, -1] * (n // 3)), times=torch.rand(n, generator=g) * 60,
                     events=torch.randint(0, 2, (n,), generator=g), patient_ids=np.arange(n).astype(str),
                     site_ids=np.full(n, "a"))


def _model(encoder="cnn", seed=0):
    options = {"width": 8, "heads": 2, "depth": 1} if encoder == "vit" else {"width": 4}
    return build_model(encoder, 5, 7, seed=seed, **options)


def _train(model, data, settings, privacy=None):
    torch.manual_seed(0)  # dropout draws from the global generator (the site seeds it per round)
    return train_local(model, data, settings, torch.device("cpu"), privacy)


def test_affine_augmentation_is_seeded_keeps_shape_and_a_binary_mask():
    images = _data().images[:3]
    a = random_affine(images, torch.Generator().manual_seed(1))
    b = random_affine(images, torch.Generator().manual_seed(1))
    c = random_affine(images, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert set(torch.unique(a[:, -1]).tolist()) <= {0.0, 1.0}
    assert a[:, -1].sum() > 0  # the tumour is still in the box after small transforms
    # no rotation, scaling or shift: only flips remain, which keep the mask's volume exactly
    flips_only = random_affine(images, torch.Generator().manual_seed(1), max_rotation_deg=0, max_scaling=0,
                               max_shift_voxels=0)
    assert torch.equal(flips_only[:, -1].sum(dim=(1, 2, 3)), images[:, -1].sum(dim=(1, 2, 3)))


def test_augmentation_choice_and_none_is_identity():
    images = _data().images[:2]
    assert torch.equal(augment_batch(images, torch.Generator(), TrainSettings(augment="none")), images)
    assert torch.equal(augment_batch(images, torch.Generator(), TrainSettings(augment=False)), images)
    with pytest.raises(ValueError, match="augment must be one of"):
        augment_batch(images, torch.Generator(), TrainSettings(augment="elastic"))


def test_mixed_precision_only_on_cuda():
    assert isinstance(autocast_for(torch.device("cpu")), nullcontext)
    assert isinstance(autocast_for(torch.device("cuda"), enabled=False), nullcontext)
    assert isinstance(autocast_for(torch.device("cuda")), torch.autocast)


@pytest.mark.parametrize("augment", ["flip-shift", "affine"])
def test_training_is_reproducible_with_each_augmentation(augment):
    data = _data()
    states = []
    for _ in range(2):
        model = _model()
        metrics = _train(model, data, TrainSettings(batch_size=4, augment=augment))
        states.append(model.state_dict())
    assert np.isfinite(metrics["loss"]) and metrics["num-examples"] == len(data)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fedprox_term_keeps_weights_nearer_the_global_model():
    data = _data()
    start = [p.detach().clone() for p in _model().parameters()]
    drift = {}
    for mu in (0.0, 100.0):
        model = _model()
        _train(model, data, TrainSettings(batch_size=4, epochs=3, learning_rate=0.01, proximal_mu=mu))
        drift[mu] = float(proximal_term(model, start))
    assert drift[100.0] < drift[0.0]


DP = dict(batch_size=4, positive_weight=1.0)


@pytest.mark.parametrize("encoder", ["cnn", "resnet10", "vit"])
def test_dp_sgd_trains_every_encoder_with_secret_noise_in_hooks_mode(encoder):
    """Two DP trainings with the same seed give different weights (the sampling and the noise come from OS
    entropy, not from anything the coordinator knows); two trainings without DP are bit-identical."""
    data = _data()
    runs, plain = [], []
    for _ in range(2):
        model = _model(encoder)
        metrics = _train(model, data, TrainSettings(**DP), PrivateTraining(1.0, 1.0))
        runs.append((model.state_dict(), metrics))
        reference = _model(encoder)
        _train(reference, data, TrainSettings(batch_size=4))
        plain.append(reference.state_dict())
    (a, metrics), (b, _) = runs
    assert metrics["dp-steps"] == steps_per_epoch(len(data), 4) and np.isfinite(metrics["loss"])
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert all(torch.equal(plain[0][k], plain[1][k]) for k in plain[0])
    assert not any(k.startswith("_module") for k in a)  # the plain model's keys, not Opacus' wrapper's
    assert any(not torch.equal(a[k], v) for k, v in _model(encoder).state_dict().items())


def test_dp_noise_changes_the_update():
    data = _data()
    quiet, noisy = _model(), _model()
    _train(quiet, data, TrainSettings(**DP), PrivateTraining(1e-3, 1.0))
    _train(noisy, data, TrainSettings(**DP), PrivateTraining(5.0, 1.0))
    assert any(not torch.equal(a, b) for a, b in zip(quiet.state_dict().values(), noisy.state_dict().values()))


def test_noise_multiplier_spends_the_budget_over_the_planned_steps():
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    n, batch, planned = 120, 16, 30 * steps_per_epoch(120, 16)
    sigma = noise_multiplier_for(budget, n, batch, planned)
    rate = sample_rate(n, batch)
    spent = [epsilon_spent(sigma, rate, k, budget.delta) for k in (0, planned // 3, planned, 2 * planned)]
    assert spent[0] == 0.0 and spent[0] < spent[1] < spent[2] < spent[3]
    assert 7.8 <= spent[2] <= 8.0 + 1e-6  # within Opacus' tolerance, never above
    assert noise_multiplier_for(PrivacyBudget(1.0, 1e-5), n, batch, planned) > sigma


@pytest.mark.parametrize("kwargs", [{"epsilon": 0, "delta": 1e-5}, {"epsilon": 1, "delta": 1.0},
                                    {"epsilon": 1, "delta": 1e-5, "max_grad_norm": 0}])
def test_privacy_budget_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="need epsilon > 0"):
        PrivacyBudget(**kwargs)
    assert math.isfinite(epsilon_spent(1.0, 0.1, 10, 1e-5))


def test_dp_sgd_trains_the_risk_head_with_a_per_patient_survival_loss():
    """Under DP-SGD the risk head still learns (the exponential PH loss replaces Cox's partial likelihood)."""
    from hccfed.common.metrics.discrimination import harrell_c_index

    g = torch.Generator().manual_seed(3)
    n = 96
    clinical = torch.randn(n, 7, generator=g)
    hazard = torch.exp(1.5 * clinical[:, 0])
    times = (-torch.log(torch.rand(n, generator=g)) / hazard * 12).clamp(max=60)
    events = (times < 60).long()
    images = torch.zeros(n, 5, 8, 8, 8)
    images[:, -1, 2:6, 2:6, 2:6] = 1.0
    data = SplitData(images=images, clinical=clinical, labels=torch.full((n,), -1), times=times, events=events,
                     patient_ids=np.arange(n).astype(str), site_ids=np.full(n, "a"))
    model = build_model("none", 5, 7, seed=0)
    _train(model, data, TrainSettings(batch_size=16, epochs=15, learning_rate=0.01, cox_weight=1.0,
                                      positive_weight=1.0), PrivateTraining(0.3, 5.0))
    _, log_risk = model.eval()(images, clinical)
    assert harrell_c_index(times.numpy(), events.numpy(), log_risk.detach().numpy()) > 0.7


def test_dp_sgd_requires_a_configured_class_weight():
    with pytest.raises(ValueError, match="class weight must come from configuration"):
        _train(_model(), _data(), TrainSettings(batch_size=4), PrivateTraining(1.0, 1.0))


def _dp_loss(logits, log_risk, labels, times, events):
    from hccfed.common.models.losses import per_sample_dp_loss

    return per_sample_dp_loss(logits, log_risk, labels, times, events, 2.0, 0.5, 4.0)


def _mean_loss(logits, log_risk, labels, times, events):
    """The former DP loss: means over the batch's known labels and patients."""
    from hccfed.common.models.losses import exponential_hazards_nll, weighted_bce

    return weighted_bce(logits, labels, 2.0) + 0.5 * exponential_hazards_nll(log_risk, times, events)


def _clipped_grad_of_first(model, data, rows, loss_fn=_dp_loss, clip=1.0 / 4.0):
    """Sample rows[0]'s clipped per-sample gradient (Opacus' GradSampleModule in the "sum" mode
    PrivateTraining uses, clipped at max_grad_norm / expected batch, as DP-SGD computes it) when it is
    trained in a batch with the other ``rows``."""
    from opacus import GradSampleModule

    for p in model.parameters():
        p.grad_sample, p.grad = None, None  # Opacus accumulates per-sample gradients across backward passes
    wrapped = GradSampleModule(model, loss_reduction="sum")
    idx = torch.tensor(rows)
    logits, log_risk = wrapped(data.images[idx], data.clinical[idx], None)
    loss = loss_fn(logits, log_risk, data.labels[idx], data.times[idx], data.events[idx])
    wrapped.zero_grad()
    loss.backward()
    params = [p for p in wrapped.parameters() if p.requires_grad and getattr(p, "grad_sample", None) is not None]
    per_sample = torch.cat([p.grad_sample.reshape(len(rows), -1) for p in params], dim=1)
    norms = per_sample.norm(dim=1, keepdim=True)
    clipped = per_sample * torch.clamp(clip / (norms + 1e-6), max=1.0)
    wrapped._close()
    return clipped[0]


def test_one_samples_clipped_gradient_does_not_depend_on_the_rest_of_its_batch():
    """The DP loss sums per-patient terms over a fixed normaliser: patient 0's clipped gradient is the same
    whoever shares its batch (here batches of 3 and 5 patients with different known labels)."""
    data = _data(n=12)
    data.labels[:] = torch.tensor([1, 0, -1, 1, 1, 0, 0, -1, 1, 0, 1, -1])
    model = _model("cnn")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the comparison is of the loss, not of random dropout masks
    for clip in (1.0, 1e6):  # clipped as DP-SGD does, and unclipped
        first = _clipped_grad_of_first(model, data, [0, 1, 2], clip=clip)
        second = _clipped_grad_of_first(model, data, [0, 5, 7, 9, 11], clip=clip)
        assert first.abs().sum() > 0
        torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-7)
    # The former loss (means over the batch) fails this: its normaliser is the other patients'.
    old = [_clipped_grad_of_first(model, data, rows, _mean_loss, 1e6) for rows in ([0, 1, 2], [0, 5, 7, 9, 11])]
    assert not torch.allclose(old[0], old[1], rtol=1e-3)
