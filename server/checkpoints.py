"""Per-round checkpoints of a federated run, and resuming from the last one.

After every completed round the server writes, under ``<run-dir>/checkpoints/``:
``round-NNNNN.pt`` (the global model after that round, the strategy's own
state such as FedAdam's moments, and the bookkeeping of the run: validation
history, best round so far and its pooled validation score table (for the
recalibration), train metrics, the run token the sites key their local state by) and ``run_config.json``; ``latest.json`` names the newest
complete round and is replaced atomically last, so a crash mid-write leaves
the previous checkpoint in force. Every round's model is kept (the best round's
is reloaded at the end). Only weights and aggregates: nothing about patients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from hccfed.common.atomic_io import atomic_write
from hccfed.common.run_config import RunConfig

FOLDER = "checkpoints"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FOLDER


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.array(v.numpy()) for k, v in arrays.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def save_checkpoint(run_dir: str | Path, server_round: int, arrays: ArrayRecord, config: RunConfig,
                    strategy_state: dict[str, Any], progress: dict[str, Any]) -> Path:
    """Write round ``server_round``'s checkpoint; returns its path."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{server_round:05d}.pt"
    payload = {"round": server_round, "arrays": arrays_to_numpy(arrays), "strategy_state": strategy_state,
               "progress": progress}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    atomic_write(folder / "run_config.json",
                  lambda tmp: tmp.write_text(json.dumps(config.to_flwr(), indent=2, default=float)))
    atomic_write(folder / "latest.json",
                  lambda tmp: tmp.write_text(json.dumps({"round": server_round, "file": path.name})))
    return path


def load_checkpoint(run_dir: str | Path, server_round: int | None = None) -> dict[str, Any] | None:
    """A round's checkpoint (the latest complete one by default), or None if there is none."""
    folder = checkpoint_dir(run_dir)
    if server_round is None:
        latest = folder / "latest.json"
        if not latest.exists():
            return None
        server_round = int(json.loads(latest.read_text())["round"])
    path = folder / f"round-{server_round:05d}.pt"
    if not path.exists():
        return None
    payload = torch.load(path, weights_only=False)
    payload["arrays"] = numpy_to_arrays(payload["arrays"])
    return payload
