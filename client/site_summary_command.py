"""`hccfed site-summary`: read a predictions CSV, write the site's summary JSON (files in, files out).

The work is in :mod:`client.site_summary`; here only the files: the output
never replaces the predictions CSV or the round-2 request, nor any existing
file unless ``force``; it is written whole or not at all (a temporary file
renamed into place), so a failed run leaves no half-written summary.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hccfed.client.site_summary import load_round2_request, read_predictions, site_summary_document
from hccfed.common.metrics.summary_checks import MinimumCells
from hccfed.common.metrics.summary_dp import DP_GRID, DPGrid


def _refuse_to_replace(out: Path, inputs: list[Path], force: bool) -> None:
    for given in inputs:
        if out.resolve() == given.resolve():
            raise ValueError(f"--out {out} is the input file {given}: give another name (the input is never replaced)")
    if out.exists() and not force:
        raise ValueError(f"{out} exists: give another --out, or --force to replace it")


def write_json(out: Path, doc: dict) -> None:
    """Write ``doc`` to ``out`` atomically (a temporary file in the same folder, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_site_summary(predictions: str | Path, out: str | Path, site_id: str | None = None,
                       pooled: str | Path | None = None, epsilon: float | None = None,
                       test_noise_seed: int | None = None, force: bool = False,
                       minimum: MinimumCells = MinimumCells(),
                       dp_score_range: tuple[float, float] | None = None) -> Path:
    """Read ``predictions``, write the site summary JSON to ``out``; returns ``out``.

    ``pooled``: this site's round-2 request from pool-summaries (paired DeLong
    sums). ``dp_score_range``: the score range of the DP grid under ``epsilon``.
    ``test_noise_seed``: test mode only, a reproducible (so not private) noise.
    """
    predictions, out = Path(predictions), Path(out)
    _refuse_to_replace(out, [predictions] + ([Path(pooled)] if pooled else []), force)
    if test_noise_seed is not None and epsilon is None:
        raise ValueError("--test-noise-seed applies only with --epsilon")
    if dp_score_range is not None and epsilon is None:
        raise ValueError("--dp-score-range applies only with --epsilon")
    grid = DP_GRID if dp_score_range is None else DPGrid(score_min=float(dp_score_range[0]),
                                                          score_max=float(dp_score_range[1]))
    preds = read_predictions(predictions)
    site = site_id or predictions.stem
    try:
        doc = site_summary_document(preds, site, round2=load_round2_request(pooled) if pooled else None,
                                    epsilon=epsilon, test_noise_seed=test_noise_seed, dp_grid=grid, minimum=minimum)
    except ValueError as err:
        raise ValueError(f"{predictions.name}: {err}") from None
    write_json(out, doc)
    return out
