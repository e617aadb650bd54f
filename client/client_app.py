"""The hospital's Flower ClientApp: thin handlers around hccfed.client.federated and the site's endpoint.

Each handler parses the run config once, finds this node's :class:`~hccfed.client.site.Site` for the
run (built once per run and kept, in this process and on disk for the next process), and calls a
plain function with it.

A SuperNode starts a fresh process of this app for every message, so the module imports only Flower
and light modules: the site, training and evaluation code (torch, Opacus, MONAI, SimpleITK, scipy)
is imported inside the handlers that need it (``make bench``: ``clientapp_import_s``).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hccfed.client.identify import identify_reply, is_identify_message
from hccfed.client.privacy_guard import LEDGER_RECORD, PolicyRefusal, check_exact_release, ledger_record, \
    refusal_reply, site_ledger_record
from hccfed.client.secagg_client import is_secagg_message, secagg_app
from hccfed.common.plan import PLAN_RECORD, FederationPlan
from hccfed.common.record_codec import flatten, unflatten
from hccfed.common.run_config import RunConfig

if TYPE_CHECKING:
    from hccfed.client.site import Site

log = logging.getLogger("hccfed.site")

app = ClientApp()


def _site(context: Context, config: ConfigRecord | None = None) -> tuple[Site, RunConfig]:
    """This node's Site for the run, prepared by the federation plan the message carries (if any)."""
    from hccfed.client.site import NODE_SITES  # the site's code (SimpleITK, torch): loaded on the first message

    run_config = RunConfig.from_mapping(context.run_config)
    plan = FederationPlan.from_json(str(config["plan"])) if config is not None and "plan" in config else None
    return NODE_SITES.for_node(run_config, context.node_config, str(context.run_id), plan), run_config


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split; reply with weights and metrics.
    A ``pretrain`` job's message (config "task" = "pretrain") trains its self-supervised model on the
    split's scans instead (client/pretraining.py).

    The messages of a SecAgg+ round go to the SecAgg+ client (client/secagg_client.py).
    """
    if is_secagg_message(msg):
        return secagg_app(msg, context)
    if msg.content["config"].get("task") == "pretrain":  # a pretrain job's round: the scans only
        from hccfed.client.pretraining import pretrain_round as local_round
    else:
        from hccfed.client.federated import train_round as local_round

    site, run_config = _site(context, msg.content["config"])
    try:
        state, metrics = local_round(site, msg.content["arrays"].to_torch_state_dict(),
                                     dict(msg.content["config"]), run_config)
    except PolicyRefusal as err:  # beyond this site's privacy policy: nothing leaves but the reason
        return refusal_reply(msg, site.site_id, str(err))
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"site-id": site.site_id}),
                          LEDGER_RECORD: ledger_record(site.config.cache_dir, msg.content["config"]["run-token"])})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model; reply with counts and fixed-size histograms only."""
    from hccfed.client.evaluation import CLINICAL_PREFIX
    from hccfed.client.federated import evaluate_round

    site, run_config = _site(context, msg.content["config"])
    try:
        metrics, summary = evaluate_round(site, msg.content["arrays"].to_torch_state_dict(),
                                          dict(msg.content["config"]), run_config)
    except PolicyRefusal as err:
        return refusal_reply(msg, site.site_id, str(err))
    records = {"summary": {k: v for k, v in summary.items() if not k.startswith(CLINICAL_PREFIX)},
               "clinical": {k[len(CLINICAL_PREFIX):]: v for k, v in summary.items() if k.startswith(CLINICAL_PREFIX)}}
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site.site_id}),
                          LEDGER_RECORD: ledger_record(site.config.cache_dir, msg.content["config"]["run-token"]),
                          **{name: ArrayRecord.from_array_dict({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
                             for name, arrays in records.items() if arrays}})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer one federated-statistics request (server/stats_messages.py) with aggregates only.

    The site's rows for the classical models (clinical vector + radiomics, train / test split) come
    from its Site, built on the run's first request; the reply's arrays never have a patient axis.
    """
    if is_identify_message(msg):
        return identify_reply(msg, context)
    if PLAN_RECORD in msg.content:
        return _plan_step(msg, context)
    site, _ = _site(context)
    run_id = f"flwr-run-{context.run_id}"
    setup = msg.content["setup"]
    reader = int(setup["second-reader"]) if "second-reader" in setup else None
    icc_patients = int(setup["icc-patients"]) if "icc-patients" in setup else None
    endpoint = site.stats_endpoint(int(setup["n-folds"]), str(setup["radiomics"]), reader, icc_patients)
    try:  # exact aggregates: only where this site's policy allows them, on enough patients
        check_exact_release(site.config.privacy, "statistics", len(endpoint.site.patient_ids))
        site_ledger_record(site, run_id, "statistics", str(msg.content["config"].get("op", "")))
    except PolicyRefusal as err:
        return refusal_reply(msg, site.site_id, str(err))
    request = unflatten({k: v.numpy() for k, v in msg.content["arrays"].items()}, dict(msg.content["config"]))
    arrays, config = flatten(endpoint.handle(request))
    content = RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config), "site": ConfigRecord({"site-id": site.site_id}),
                          LEDGER_RECORD: ledger_record(site.config.cache_dir, run_id)})
    return Message(content=content, reply_to=msg)


def _plan_step(msg: Message, context: Context) -> Message:
    """The run's first messages (server/plan_step.py): this site's fingerprint, then whether it can
    prepare by the server's plan (and why not)."""
    site, _ = _site(context)
    step = msg.content[PLAN_RECORD]
    if step["step"] == "fingerprint":
        answer = {"fingerprint": json.dumps(site.fingerprint())}
        site_ledger_record(site, f"flwr-run-{context.run_id}", "fingerprint (percentiles of counts, spacing, "
                           "tumour size, intensities; from 10 patients)")
    else:
        from hccfed.client.site import site_plan_problems

        problems = site_plan_problems(site.config, FederationPlan.from_json(str(step["plan"])))
        for problem in problems:
            log.warning("refusing the federation plan: %s", problem)
        answer = {"accepted": not problems, "problems": json.dumps(problems)}
    content = RecordDict({PLAN_RECORD: ConfigRecord(answer), "site": ConfigRecord({"site-id": site.site_id}),
                          LEDGER_RECORD: ledger_record(site.config.cache_dir, f"flwr-run-{context.run_id}")})
    return Message(content=content, reply_to=msg)
