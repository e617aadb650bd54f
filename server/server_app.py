"""The coordinator's Flower ServerApp: a thin handler around server.training_run."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.training_run import run_federated_training

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The configured strategy over the sites (resuming from a checkpoint with ``resume``),
    then a final federated evaluation on their test splits."""
    run_federated_training(grid, dict(context.run_config))
