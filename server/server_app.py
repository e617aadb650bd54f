"""The coordinator's Flower ServerApp: a thin dispatcher on the run config's ``job``.

``train`` (default): server.training_run; ``stats`` / ``stats-combat``: server.stats_job; ``pretrain``:
server.pretrain_job.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hccfed.common.run_config import RunConfig
from hccfed.server.pretrain_job import run_federated_pretraining
from hccfed.server.stats_job import run_federated_stats
from hccfed.server.training_run import run_federated_training

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``train``: the configured strategy over the sites (resuming from a checkpoint with ``resume``),
    then a final federated evaluation on their test splits. ``stats``: the classical models, federated.
    ``pretrain``: the encoder's self-supervised pretraining, federated."""
    run_id = f"flwr-run-{context.run_id}"
    job = RunConfig.from_mapping(context.run_config).job
    if job == "train":
        run_federated_training(grid, dict(context.run_config), run_id=run_id)
    elif job == "pretrain":
        run_federated_pretraining(grid, dict(context.run_config), run_id=run_id)
    else:
        run_federated_stats(grid, dict(context.run_config), run_id=run_id)
