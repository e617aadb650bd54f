"""The site's privacy policy and ledger: epsilon adds up over runs, a release beyond the lifetime budget
is refused, writers of several processes never overspend, and the policy is read from the YAML."""

from __future__ import annotations

import multiprocessing

import pytest
import yaml

from hccfed.client.privacy import PrivacyBudget, epsilon_spent, noise_multiplier_for, sample_rate
from hccfed.client.privacy_guard import check_exact_release, check_training
from hccfed.client.privacy_ledger import PolicyRefusal, PrivacyLedger, run_spending
from hccfed.common.errors import ConfigError
from hccfed.common.privacy_policy import PrivacyPolicy, parse_privacy_policy

N, BATCH, STEPS = 60, 8, 40  # one run of 40 DP-SGD steps at epsilon 8


def _sigma(epsilon: float = 8.0) -> float:
    return noise_multiplier_for(PrivacyBudget(epsilon, 1e-5), N, BATCH, STEPS)


def _dp_run(ledger: PrivacyLedger, policy: PrivacyPolicy, run: str, rounds: int = 2, epsilon: float = 8.0) -> None:
    sigma = _sigma(epsilon)
    for r in range(1, rounds + 1):
        ledger.record(policy, run, r, "model-update", "dp-sgd", delta=1e-5,
                      rdp={"noise_multiplier": sigma, "sample_rate": sample_rate(N, BATCH), "steps": STEPS // rounds},
                      planned_run_epsilon=epsilon)


def test_ledger_sums_epsilon_over_runs_and_refuses_a_run_beyond_the_lifetime_budget(tmp_path):
    policy = PrivacyPolicy(max_epsilon_per_run=8.0, lifetime_epsilon=20.0)
    ledger = PrivacyLedger(tmp_path)
    _dp_run(ledger, policy, "run-1")
    _dp_run(ledger, policy, "run-2")
    ledger.record(policy, "run-2", 1, "training-loss", "none")  # a non-private release: listed, no epsilon
    one_run = epsilon_spent(_sigma(), sample_rate(N, BATCH), STEPS, 1e-5)  # RDP over both rounds of a run
    spent, delta = ledger.spent()
    assert 7.8 < one_run <= 8.0 + 1e-6
    assert spent == pytest.approx(2 * one_run, rel=1e-9) and delta == pytest.approx(2e-5)
    # Within a run the rounds compose by RDP: less than the sum of the rounds' own epsilons.
    half = epsilon_spent(_sigma(), sample_rate(N, BATCH), STEPS // 2, 1e-5)
    assert run_spending(ledger.entries("run-1"))[0] < 2 * half
    lines = (tmp_path / "privacy_ledger.jsonl").read_text().splitlines()
    with pytest.raises(PolicyRefusal, match="lifetime_epsilon 20"):
        _dp_run(ledger, policy, "run-3")  # 2 x 8 spent + 8 planned > 20: refused at its first round
    assert (tmp_path / "privacy_ledger.jsonl").read_text().splitlines() == lines  # nothing written
    entry = ledger.entries("run-1")[-1]
    assert set(entry) >= {"time", "run_id", "round", "kind", "mechanism", "epsilon", "delta", "guarantee", "rdp"}
    assert entry["epsilon"] == pytest.approx(one_run)
    assert ledger.entries("run-2")[-1]["guarantee"].startswith("none")
    # A Laplace release (pure epsilon-DP) adds to the total by basic composition, up to the budget.
    ledger.record(policy, "summary-1", 0, "site-summary", "laplace", epsilon=20.0 - spent - 0.01, delta=0.0)
    with pytest.raises(PolicyRefusal):
        ledger.record(policy, "summary-2", 0, "site-summary", "laplace", epsilon=0.1, delta=0.0)


def _spend_one(folder: str, results) -> None:
    try:
        PrivacyLedger(folder).record(PrivacyPolicy(max_epsilon_per_run=1.0, lifetime_epsilon=5.0),
                                     f"run-{multiprocessing.current_process().pid}", 0, "site-summary", "laplace",
                                     epsilon=1.0, delta=0.0)
        results.put(True)
    except PolicyRefusal:
        results.put(False)


def test_concurrent_processes_never_overspend(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_spend_one, args=(str(tmp_path), results)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = [results.get(timeout=5) for _ in procs]
    assert outcomes.count(True) == 5 and outcomes.count(False) == 3
    assert PrivacyLedger(tmp_path).spent()[0] == pytest.approx(5.0)


def test_the_site_refuses_requests_beyond_its_policy():
    strict = PrivacyPolicy(dp_required=True, max_epsilon_per_run=4.0, max_delta_per_run=1e-6,
                           lifetime_epsilon=10.0, allow_nonprivate_statistics=False,
                           allow_nonprivate_metrics=False, min_cell_size=10)
    with pytest.raises(PolicyRefusal, match="dp_required"):
        check_training(strict, None)
    with pytest.raises(PolicyRefusal, match="epsilon 8, .*max_epsilon_per_run 4"):
        check_training(strict, PrivacyBudget(8.0, 1e-6))
    with pytest.raises(PolicyRefusal, match="delta 1e-05, .*max_delta_per_run 1e-06"):
        check_training(strict, PrivacyBudget(4.0, 1e-5))
    check_training(strict, PrivacyBudget(4.0, 1e-6))  # within the policy: no refusal
    with pytest.raises(PolicyRefusal, match="allow_nonprivate_statistics"):
        check_exact_release(strict, "statistics", 100)
    with pytest.raises(PolicyRefusal, match="allow_nonprivate_metrics"):
        check_exact_release(strict, "evaluation tables", 100)
    with pytest.raises(PolicyRefusal, match="9 patients.*min_cell_size 10"):
        check_exact_release(PrivacyPolicy(), "evaluation tables", 9)


def test_the_policy_is_read_from_the_site_yaml_and_typos_are_refused():
    policy = parse_privacy_policy(yaml.safe_load("dp_required: true\nlifetime_epsilon: 30\nmin_cell_size: 5"), "s.yaml")
    assert policy.dp_required and policy.lifetime_epsilon == 30.0 and policy.min_cell_size == 5
    assert parse_privacy_policy(None, "s.yaml") == PrivacyPolicy()
    for raw, message in (({"dp_requird": True}, "unknown keys"), ({"dp_required": "yes"}, "true or false"),
                         ({"lifetime_epsilon": -1}, "> 0"), ({"min_cell_size": 2.5}, "whole number"),
                         ({"max_epsilon_per_run": 50, "lifetime_epsilon": 10}, "exceeds")):
        with pytest.raises(ConfigError, match=rf"s\.yaml: key 'privacy.*{message}"):
            parse_privacy_policy(raw, "s.yaml")
