"""The site's privacy ledger: every release about its patients, one JSON line each, append-only.

The file is ``<cache_dir>/privacy_ledger.jsonl`` (the site's own disk; never sent
whole). Each line is one release: ``time`` (UTC, ISO 8601), ``run_id``, ``round``,
``kind`` (what left: ``model-update``, ``training-loss``, ``evaluation-tables``,
``statistics``, ``fingerprint``, ``site-summary``...), ``mechanism`` (``dp-sgd``,
``laplace``, ``none``), ``epsilon`` and ``delta`` (null for a non-private
release), ``guarantee`` (in words, with the neighbouring relation) and, for
DP-SGD, ``rdp`` = {noise_multiplier, sample_rate, steps} of that round.

How epsilon adds up (what :meth:`PrivacyLedger.spent` returns):

- within one run, the DP-SGD rounds compose by RDP (Opacus' accountant over
  the rounds' (sigma, rate, steps), at the run's delta);
- Laplace releases (pure epsilon-DP, delta 0) add up;
- across runs and mechanisms, basic composition: epsilons and deltas add.

Non-private releases cost no epsilon figure: they have none. They are listed
(``guarantee`` says so) and the site's policy decides whether they may happen.
Writers hold an exclusive ``flock`` on ``privacy_ledger.lock`` while they read the
total and append, so two processes of one site (a SuperNode may start one per
message) never both spend the last of the budget.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from hccfed.common.privacy_policy import PrivacyPolicy

LEDGER_FILE = "privacy_ledger.jsonl"
log = logging.getLogger("hccfed.site")

NEIGHBOURS = "add / remove one patient"


class PolicyRefusal(Exception):
    """A request beyond the site's privacy policy; ``str()`` is the reason sent to the server."""


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not accountant.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": a looser, still valid bound
        return float(accountant.get_epsilon(delta=delta))


def run_spending(entries: list[dict[str, Any]]) -> tuple[float, float]:
    """(epsilon, delta) of one run's releases: RDP over its DP-SGD rounds, plus its Laplace releases."""
    dp_sgd = [e for e in entries if e["mechanism"] == "dp-sgd"]
    epsilon, delta = 0.0, 0.0
    if dp_sgd:
        delta = max(float(e["delta"]) for e in dp_sgd)
        epsilon = _rdp_epsilon([(e["rdp"]["noise_multiplier"], e["rdp"]["sample_rate"], e["rdp"]["steps"])
                                for e in dp_sgd], delta)
    for e in entries:
        if e["mechanism"] not in ("dp-sgd", "none"):
            epsilon += float(e["epsilon"])
            delta += float(e["delta"] or 0.0)
    return epsilon, delta


class PrivacyLedger:
    """The append-only ledger of one site (its ``cache_dir``)."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / LEDGER_FILE
        self.lock_path = self.path.with_suffix(".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every release (of ``run_id`` only, when given), oldest first."""
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}: line {number} is not JSON; the ledger was damaged "
                                 "(restore it: it is the site's record of what it spent)") from None
            if run_id is None or entry["run_id"] == run_id:
                out.append(entry)
        return out

    def spent(self, exclude_run: str | None = None) -> tuple[float, float]:
        """(epsilon, delta) over every run (but ``exclude_run``): RDP within a run, basic composition across."""
        runs: dict[str, list[dict[str, Any]]] = {}
        for entry in self.entries():
            if entry["run_id"] != exclude_run:
                runs.setdefault(entry["run_id"], []).append(entry)
        totals = [run_spending(e) for e in runs.values()]
        return sum(t[0] for t in totals), sum(t[1] for t in totals)

    def record(self, policy: PrivacyPolicy, run_id: str, server_round: int, kind: str, mechanism: str,
               epsilon: float | None = None, delta: float | None = None, guarantee: str = "",
               rdp: dict[str, float] | None = None, planned_run_epsilon: float = 0.0) -> dict[str, Any]:
        """Append one release after checking the lifetime budget; PolicyRefusal (nothing written) beyond it.

        ``planned_run_epsilon``: what the run will have spent at its end (a DP-SGD run's target), so a
        run is refused at its first round rather than stopped half-way.
        """
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": str(run_id),
                 "round": int(server_round), "kind": kind, "mechanism": mechanism,
                 "epsilon": None if epsilon is None else float(epsilon),
                 "delta": None if delta is None else float(delta),
                 "guarantee": guarantee or ("none: exact values, not differentially private"
                                            if mechanism == "none" else ""),
                 **({"rdp": rdp} if rdp is not None else {})}
        with self._locked():
            if mechanism != "none":
                others, _ = self.spent(exclude_run=str(run_id))
                this_run, _ = run_spending(self.entries(str(run_id)) + [entry])
                total = others + max(this_run, planned_run_epsilon)
                if total > policy.lifetime_epsilon + 1e-9:
                    reason = (f"lifetime privacy budget: this release would bring the site's epsilon to "
                              f"{total:.3g}, above its lifetime_epsilon {policy.lifetime_epsilon:g} "
                              f"(already spent by other runs: {others:.3g})")
                    log.warning("refusing %s of run %s: %s", kind, run_id, reason)
                    raise PolicyRefusal(reason)
                if math.isfinite(this_run) and mechanism == "dp-sgd":
                    entry["epsilon"] = this_run  # the run's RDP-composed epsilon so far
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
        return entry

    def remaining(self, policy: PrivacyPolicy, exclude_run: str | None = None) -> float:
        return policy.lifetime_epsilon - self.spent(exclude_run)[0]
