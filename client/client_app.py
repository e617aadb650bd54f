"""The hospital's Flower ClientApp: thin handlers around client.federated."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.federated import evaluate_round, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    state, metrics = train_round(msg.content["arrays"].to_torch_state_dict(),
                                 dict(msg.content["config"]), context.run_config, context.node_config)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model; reply with counts and fixed-size histograms only."""
    metrics, summary, site_id = evaluate_round(msg.content["arrays"].to_torch_state_dict(),
                                      dict(msg.content["config"]), context.run_config, context.node_config)
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "summary": ArrayRecord.from_array_dict({k: Array(v) for k, v in summary.items()}),
                          "site": ConfigRecord({"site-id": site_id})})
    return Message(content=content, reply_to=msg)
