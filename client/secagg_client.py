"""The site's side of SecAgg+ secure aggregation (Flower's legacy stack, as 1.41 requires).

In Flower 1.41, SecAgg+ works only through the legacy workflow: on the site,
``secaggplus_mod`` around a ``NumPyClient``. The mod runs the protocol stages
(setup, share keys, collect masked vectors, unmask); at "collect masked
vectors" it calls the client's ``fit``, which trains exactly as a plain round
does (client.federated.train_round), then masks the weighted, quantized
weights so the server only learns their sum over the sites. No training
metric is sent (it would travel in clear beside the masked vector). A site that
fails or refuses at any stage is a dropout: with the run's
``secagg-reconstruction-threshold`` below 1 the others' key shares unmask the
sum without it.

The hospital's ClientApp hands SecAgg+ messages here (``is_secagg_message``);
everything else goes through the Message API handlers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from hccfed.client.privacy_ledger import PolicyRefusal
from hccfed.common.plan import FederationPlan
from hccfed.common.run_config import RunConfig

log = logging.getLogger("hccfed.site")


def is_secagg_message(msg: Message) -> bool:
    """True for the messages of a SecAgg+ round (they carry the protocol's config record)."""
    return not msg.has_error() and RECORD_KEY_CONFIGS in msg.content.config_records


def state_keys(run_config: RunConfig) -> list[str]:
    """The model's state-dict keys, in the order the legacy (list of arrays) format uses."""
    from hccfed.common.models.fusion import model_from_run_config  # torch: loaded by the handler, not at import
    from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names

    return list(model_from_run_config(run_config, len(IMAGE_CHANNELS), len(clinical_feature_names())).state_dict())


class SecAggSiteClient(NumPyClient):
    """A NumPyClient whose ``fit`` is one local training round of this site."""

    def __init__(self, context: Context):
        self.context = context
        self.run_config = RunConfig.from_mapping(context.run_config)

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        import torch  # heavy modules load here, after the ClientApp process has started (client_app.py)

        from hccfed.client.federated import train_round
        from hccfed.client.site import NODE_SITES

        keys = state_keys(self.run_config)
        if len(keys) != len(parameters):
            raise ValueError(f"received {len(parameters)} arrays, the model has {len(keys)}")
        state = OrderedDict((k, torch.from_numpy(np.array(p))) for k, p in zip(keys, parameters))
        plan = FederationPlan.from_json(str(config["plan"])) if "plan" in config else None
        site = NODE_SITES.for_node(self.run_config, self.context.node_config, str(self.context.run_id), plan)
        try:
            new_state, metrics = train_round(site, state, config, self.run_config)
        except PolicyRefusal as err:  # beyond this site's policy: it drops out of the round, saying why
            log.warning("site %s refuses to train in this SecAgg+ round: %s", site.site_id, err)
            raise PolicyRefusal(f"site {site.site_id} refuses: {err}") from None
        # Only the weights travel, masked: the training metrics (loss, epsilon) would sit beside them in clear,
        # so none is sent; the site's ledger (carried by its evaluate replies) records what it spent.
        return [v.numpy() for v in new_state.values()], int(metrics["num-examples"]), {}


def _client_fn(context: Context):
    return SecAggSiteClient(context).to_client()


secagg_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
