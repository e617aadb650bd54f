import numpy as np
import pytest
import torch

from hccfed.common.models.losses import cox_partial_likelihood, weighted_bce


def naive_breslow(log_risk, times, events):
    """Obvious O(n^2) negative partial log-likelihood, Breslow ties, mean over events."""
    total, n_events = 0.0, 0
    for i in range(len(times)):
        if events[i]:
            at_risk = times >= times[i]
            total -= log_risk[i] - np.log(np.exp(log_risk[at_risk]).sum())
            n_events += 1
    return total / max(n_events, 1)


@pytest.mark.parametrize("seed", range(5))
def test_cox_loss_matches_naive_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 40
    times = rng.integers(1, 12, n).astype(float)  # many tied times
    events = rng.integers(0, 2, n)
    log_risk = rng.normal(size=n)
    got = cox_partial_likelihood(torch.tensor(log_risk), torch.tensor(times), torch.tensor(events))
    assert float(got) == pytest.approx(naive_breslow(log_risk, times, events), rel=1e-9)


def test_cox_loss_does_not_overflow():
    # exp(1000) overflows float64; the naive form returns inf/nan, this one must not.
    log_risk = torch.tensor([1000.0, 999.0, -1000.0, 5.0], requires_grad=True)
    loss = cox_partial_likelihood(log_risk, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(log_risk.grad).all()


def test_cox_loss_invariant_to_shift_of_risk_and_time_scale():
    rng = np.random.default_rng(1)
    times, events, risk = torch.tensor(rng.exponential(10, 30)), torch.tensor(rng.integers(0, 2, 30)), torch.randn(30)
    base = cox_partial_likelihood(risk, times, events)
    assert float(cox_partial_likelihood(risk + 7.0, times, events)) == pytest.approx(float(base), rel=1e-5)
    assert float(cox_partial_likelihood(risk, times * 3 + 1, events)) == pytest.approx(float(base), rel=1e-6)


def test_cox_loss_without_events_is_zero_and_differentiable():
    risk = torch.randn(5, requires_grad=True)
    loss = cox_partial_likelihood(risk, torch.arange(5.0), torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and risk.grad is not None


def test_weighted_bce_ignores_unknown_labels():
    logits = torch.tensor([2.0, -1.0, 50.0])
    labels = torch.tensor([1, 0, -1])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:2], labels[:2].float())
    assert float(weighted_bce(logits, labels, 1.0)) == pytest.approx(float(expected))
    assert float(weighted_bce(logits, torch.tensor([-1, -1, -1]), 1.0)) == 0.0


def test_exponential_hazards_nll_is_a_per_patient_sum_with_the_closed_form_optimum():
    from hccfed.common.models.losses import PRIOR_ANNUAL_HAZARD, exponential_hazards_nll

    rng = np.random.default_rng(4)
    times = torch.tensor(rng.exponential(20, 50))
    events = torch.tensor(rng.integers(0, 2, 50))
    risk = torch.randn(50, dtype=torch.float64)
    # a mean of per-patient terms: the batch loss is the average of the one-patient losses (DP-SGD needs this)
    singles = torch.stack([exponential_hazards_nll(risk[i:i + 1], times[i:i + 1], events[i:i + 1])
                           for i in range(50)])
    assert float(exponential_hazards_nll(risk, times, events)) == pytest.approx(float(singles.mean()), rel=1e-12)
    # a common log relative hazard is optimal at the exponential MLE, log(events / person-years) less the
    # log prior baseline: zero gradient there
    mle = np.log(float(events.sum()) / float(times.sum() / 12.0)) - np.log(PRIOR_ANNUAL_HAZARD)
    for c0, sign in ((mle, 0), (mle - 0.5, -1), (mle + 0.5, 1)):
        c = torch.tensor(c0, dtype=torch.float64, requires_grad=True)
        exponential_hazards_nll(c.expand(50), times, events).backward()
        assert (abs(float(c.grad)) < 1e-12) if sign == 0 else (np.sign(float(c.grad)) == sign)
    # higher risk for earlier events lowers the loss
    ordered = -torch.log(times) * events
    assert exponential_hazards_nll(ordered, times, events) < exponential_hazards_nll(-ordered, times, events)
