"""The aggregation strategies a run can choose, built from the run config.

Flower's FedAvg, FedProx and FedAdam (``flwr.serverapp.strategy``), each
weighted by the sites' numbers of training patients ("num-examples"), with one
change: which sites take part in a round is drawn from the run's seed. Flower
samples with Python's unseeded ``random``; here the connected node ids are
sorted and sampled with a numpy Generator seeded by (seed, round, purpose),
so the same run samples the same sites (all of them at fraction 1).
Optionally wrapped in Flower's central DP (server-side fixed clipping).
FedBN-style local normalization needs nothing here: the server averages
the norm parameters as any others and the sites ignore them (client/federated.py).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx, Strategy

from hccfed.common.run_config import STRATEGIES, RunConfig

_PURPOSES = {MessageType.TRAIN: 1, MessageType.EVALUATE: 2}


def seeded_sample(node_ids: Iterable[int], size: int, seed: int, server_round: int, purpose: int) -> list[int]:
    """``size`` distinct node ids, the same for the same (ids, seed, round, purpose); sorted."""
    ids = sorted(int(n) for n in node_ids)
    if not 0 <= size <= len(ids):
        raise ValueError(f"cannot sample {size} of {len(ids)} nodes")
    rng = np.random.default_rng([int(seed), int(server_round), int(purpose)])
    # Draw positions, not ids: Flower's node ids are unsigned 64-bit and overflow numpy's int64.
    return sorted(ids[int(i)] for i in rng.choice(len(ids), size=size, replace=False))


class SeededSampling(FedAvg):
    """FedAvg whose configure_* sample nodes from ``sampling_seed`` (see the module docstring)."""

    sampling_seed: int = 0

    def _sampled(self, grid: Grid, fraction: float, minimum: int, server_round: int, message_type: str) -> list[int]:
        wanted = max(minimum, self.min_available_nodes)
        while len(node_ids := list(grid.get_node_ids())) < wanted:
            time.sleep(1)  # as Flower's sample_nodes: wait for enough sites to connect
        size = min(len(node_ids), max(int(len(node_ids) * fraction), minimum))
        return seeded_sample(node_ids, size, self.sampling_seed, server_round, _PURPOSES[message_type])

    def _configure(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                   message_type: str, fraction: float, minimum: int) -> Iterable[Message]:
        if fraction == 0.0:
            return []
        node_ids = self._sampled(grid, fraction, minimum, server_round, message_type)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, message_type)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, MessageType.TRAIN,
                               self.fraction_train, self.min_train_nodes)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, MessageType.EVALUATE,
                               self.fraction_evaluate, self.min_evaluate_nodes)


class SeededFedAvg(SeededSampling):
    """FedAvg with seeded sampling."""


class SeededFedProx(FedProx, SeededSampling):
    """FedProx (sends "proximal-mu"; the sites add the proximal term) with seeded sampling."""


class SeededFedAdam(FedAdam, SeededSampling):
    """FedAdam (server-side Adam on the averaged update) with seeded sampling."""


def make_strategy(config: RunConfig, n_sites: int,
                  evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None
                  ) -> Strategy:
    """The run's strategy: ``config.strategy``, seeded sampling, optional central DP wrapper.

    Every site evaluates every round; ``fraction-train`` of them train.
    """
    if config.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {config.strategy!r}")
    n_train = max(1, int(n_sites * config.fraction_train))
    common: dict[str, Any] = dict(fraction_train=config.fraction_train, fraction_evaluate=1.0,
                                  min_train_nodes=n_train, min_evaluate_nodes=n_sites,
                                  min_available_nodes=n_sites, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
    strategy: FedAvg
    if config.strategy == "fedprox":
        strategy = SeededFedProx(proximal_mu=config.proximal_mu, **common)
    elif config.strategy == "fedadam":
        strategy = SeededFedAdam(eta=config.server_learning_rate, **common)
    else:
        strategy = SeededFedAvg(**common)
    strategy.sampling_seed = config.seed
    if config.central_dp_noise > 0:
        return DifferentialPrivacyServerSideFixedClipping(strategy, config.central_dp_noise,
                                                          config.central_dp_clipping_norm, n_train)
    return strategy


def base_strategy(strategy: Strategy) -> Strategy:
    """The strategy inside a DP wrapper (or the strategy itself)."""
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """What a strategy carries between rounds (FedAdam's moments), for checkpoints."""
    inner = base_strategy(strategy)
    return {name: {k: np.array(v) for k, v in getattr(inner, name).items()}
            for name in ("m_t", "v_t") if getattr(inner, name, None)}


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put back what ``strategy_state`` saved."""
    inner = base_strategy(strategy)
    for name, arrays in state.items():
        setattr(inner, name, {k: np.array(v) for k, v in arrays.items()})
