"""The hospital's Flower ClientApp: thin handlers around client.federated."""

from __future__ import annotations

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hccfed.client.classical_site import cached_endpoint
from hccfed.client.evaluation import CLINICAL_PREFIX
from hccfed.client.federated import evaluate_round, site_config_path, site_id_of, train_round
from hccfed.client.secagg_client import is_secagg_message, secagg_app
from hccfed.common.run_config import RunConfig
from hccfed.common.record_codec import flatten, unflatten

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split; reply with weights and metrics.

    The messages of a SecAgg+ round go to the SecAgg+ client (client/secagg_client.py).
    """
    if is_secagg_message(msg):
        return secagg_app(msg, context)
    state, metrics = train_round(msg.content["arrays"].to_torch_state_dict(),
                                 dict(msg.content["config"]), context.run_config, context.node_config)
    site_id = site_id_of(RunConfig.from_mapping(context.run_config), context.node_config)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"site-id": site_id})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model; reply with counts and fixed-size histograms only."""
    metrics, summary, site_id = evaluate_round(msg.content["arrays"].to_torch_state_dict(),
                                               dict(msg.content["config"]), context.run_config,
                                               context.node_config)
    records = {"summary": {k: v for k, v in summary.items() if not k.startswith(CLINICAL_PREFIX)},
               "clinical": {k[len(CLINICAL_PREFIX):]: v for k, v in summary.items() if k.startswith(CLINICAL_PREFIX)}}
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site_id}),
                          **{name: ArrayRecord.from_array_dict({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
                             for name, arrays in records.items() if arrays}})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer one federated-statistics request (server/stats_messages.py) with aggregates only.

    The site's rows (clinical vector + radiomics, train / test split) are built on the first request
    and kept for the run (client/classical_site.py); the reply's arrays never have a patient axis.
    """
    run_config = RunConfig.from_mapping(context.run_config)
    setup = msg.content["setup"]
    endpoint = cached_endpoint(site_config_path(run_config, context.node_config), run_config.seed,
                               int(setup["n-folds"]), str(setup["radiomics"]), f"{context.run_id}")
    request = unflatten({k: v.numpy() for k, v in msg.content["arrays"].items()}, dict(msg.content["config"]))
    arrays, config = flatten(endpoint.handle(request))
    content = RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config), "site": ConfigRecord({"site-id": endpoint.site.site_id})})
    return Message(content=content, reply_to=msg)
