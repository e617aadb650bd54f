"""SecAgg+ secure aggregation of one training round (Flower's legacy workflow, as 1.41 requires).

In Flower 1.41 SecAgg+ is available only as ``SecAggPlusWorkflow``, a legacy
workflow driven by a ``LegacyContext`` (legacy FedAvg strategy, client
manager, parameters in the context's state). ``SecureAggregator.aggregate``
wraps one such round so it can replace the plain "send, aggregate" step of
server/training_run.py: the server receives only masked, quantized weights
and learns their weighted sum (weights = training patients, at most
``max_weight``), i.e. the FedAvg average, without any single site's update.
The site side is client/secagg_client.py.

What SecAgg+ rules out: the server cannot check individual replies (shapes,
non-finite values), clip them (central DP) or run FedAdam / FedBN on them, so
a run with ``secagg`` uses plain weighted averaging. Quantization limits the
precision: each site quantizes weight x (n_i / max_weight) in steps of
``2 * clipping_range / quantization_range``, so the average is off by up to
about that step x max_weight / sum(n_i) per site (measured: 4e-4 with 3 sites
of ~6 training patients at max_weight 1000, 1e-5 at max_weight 16); weights must
lie within +-``clipping_range``. Set ``max_weight`` near the largest site's count.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
import flwr.compat.common.recorddict_compat as compat
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key


class SecureAggregator:
    """One SecAgg+ FedAvg round at a time over the given sites.

    ``num_shares`` / ``reconstruction_threshold``: Flower's SecAgg+ settings
    (a float is a fraction of the sampled sites); every site takes part.
    """

    def __init__(self, n_sites: int, num_shares: int | float = 1.0, reconstruction_threshold: int | float = 1.0,
                 clipping_range: float = 8.0, quantization_range: int = 2 ** 22, max_weight: float = 1000.0):
        if n_sites < 2:
            raise ValueError(f"SecAgg+ needs at least 2 sites, got {n_sites}")
        self.n_sites = n_sites
        self.workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=reconstruction_threshold,
                                           clipping_range=clipping_range, quantization_range=quantization_range,
                                           max_weight=max_weight)

    def aggregate(self, grid: Any, server_round: int, arrays: ArrayRecord,
                  config: ConfigRecord) -> tuple[ArrayRecord | None, dict[str, float]]:
        """Run one secure round; (the weighted average of the sites' new weights, aggregated metrics)."""
        keys = list(arrays.keys())
        fit_config = {**dict(config), "server-round": server_round}
        strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=self.n_sites,
                                min_available_clients=self.n_sites, on_fit_config_fn=lambda _: dict(fit_config),
                                fit_metrics_aggregation_fn=_weighted_metrics)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                config=ServerConfig(num_rounds=1), strategy=strategy,
                                client_manager=SimpleClientManager())
        run_id = getattr(getattr(grid, "run", None), "run_id", 0)
        for node_id in sorted(grid.get_node_ids()):
            context.client_manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=run_id))
        parameters = ndarrays_to_parameters([arrays[k].numpy() for k in keys])
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round, Key.START_TIME: time.time()})
        before = context.state.array_records[MAIN_PARAMS_RECORD]
        self.workflow(grid, context)
        after = context.state.array_records[MAIN_PARAMS_RECORD]
        if after is before:
            return None, {}
        ndarrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
        aggregated = ArrayRecord({k: Array(np.asarray(v, dtype=arrays[k].numpy().dtype))
                                  for k, v in zip(keys, ndarrays)})
        metrics = context.history.metrics_distributed_fit
        return aggregated, {k: float(v[-1][1]) for k, v in metrics.items()}


def _weighted_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
    total = sum(n for n, _ in results)
    keys = set().union(*(m.keys() for _, m in results)) if results else set()
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in results) / total for k in keys}
