"""The site enforces its own privacy policy (common/privacy_policy.py), whatever the server asks.

Every handler of the ClientApp goes through here before anything leaves:
:func:`check_training` (DP-SGD required? the run's epsilon / delta within the
per-run maximum?), :func:`check_exact_release` (may exact metrics or statistics
leave, on enough patients?). A request beyond the policy raises
:class:`~hccfed.client.privacy_ledger.PolicyRefusal`; the ClientApp answers it
with :func:`refusal_reply`, a Flower error reply whose code is
:data:`~hccfed.common.privacy_policy.REFUSAL_CODE` and whose reason names the
site and the rule, and logs it here. What was released is in the ledger
(client/privacy_ledger.py); :func:`ledger_record` is the copy of this run's
entries each reply carries, so the coordinator's report lists them.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Error, Message

from hccfed.client.privacy_ledger import PolicyRefusal, PrivacyLedger
from hccfed.common.privacy_policy import LEDGER_RECORD, REFUSAL_CODE, PrivacyPolicy

if TYPE_CHECKING:
    from hccfed.client.privacy import PrivacyBudget

log = logging.getLogger("hccfed.site")


def check_training(policy: PrivacyPolicy, budget: "PrivacyBudget | None") -> None:
    """Refuse a training request beyond the policy (before any training)."""
    if budget is None:
        if policy.dp_required:
            raise PolicyRefusal("this site trains only under DP-SGD (privacy.dp_required), and the run asks "
                                "for none here (dp-epsilon 0 or the site not in dp-sites)")
        return
    if budget.epsilon > policy.max_epsilon_per_run:
        raise PolicyRefusal(f"the run asks for DP-SGD epsilon {budget.epsilon:g}, above this site's "
                            f"privacy.max_epsilon_per_run {policy.max_epsilon_per_run:g}")
    if budget.delta > policy.max_delta_per_run:
        raise PolicyRefusal(f"the run asks for DP-SGD delta {budget.delta:g}, above this site's "
                            f"privacy.max_delta_per_run {policy.max_delta_per_run:g}")


def check_exact_release(policy: PrivacyPolicy, kind: str, n_patients: int) -> None:
    """Refuse an exact (non-private) release that the policy does not allow, or on too few patients."""
    statistics = kind == "statistics"
    allowed = policy.allow_nonprivate_statistics if statistics else policy.allow_nonprivate_metrics
    if not allowed:
        key = "allow_nonprivate_statistics" if statistics else "allow_nonprivate_metrics"
        raise PolicyRefusal(f"exact {kind} may not leave this site (privacy.{key} is false)")
    if n_patients < policy.min_cell_size:
        raise PolicyRefusal(f"exact {kind} on {n_patients} patients: fewer than this site's "
                            f"privacy.min_cell_size {policy.min_cell_size}")


def refusal_reply(msg: Message, site_id: str, reason: str) -> Message:
    """The reply to a refused request: an error naming the site and the rule (and logged here)."""
    log.warning("site %s refuses a %s request: %s", site_id, msg.metadata.message_type, reason)
    return Message(error=Error(code=REFUSAL_CODE, reason=f"site {site_id} refuses: {reason}"), reply_to=msg)


def ledger_record(cache_dir, run_id: str) -> ConfigRecord:
    """This run's ledger entries at this site, for the reply (the report's privacy section)."""
    return ConfigRecord({"run-id": str(run_id), "entries": json.dumps(PrivacyLedger(cache_dir).entries(str(run_id)))})


def site_ledger_record(site, run_id: str, kind: str, op: str = "") -> None:
    """Record one exact (non-private) release of ``site`` (a statistics reply, its fingerprint)."""
    PrivacyLedger(site.config.cache_dir).record(site.config.privacy, run_id, 0, f"{kind} {op}".strip(), "none")


__all__ = ["LEDGER_RECORD", "PolicyRefusal", "check_exact_release", "check_training", "ledger_record",
           "refusal_reply", "site_ledger_record"]
