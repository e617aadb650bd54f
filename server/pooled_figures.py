"""Every clinical figure of one model from its (pooled or one site's) summary tables.

One function, :func:`model_figures`, used by `hccfed pool-summaries`, by the
Flower training run's final evaluation and by the simulation, so all three
report the same figures the same way. The operating point (sensitivity,
specificity, PPV, NPV) is computed only at a threshold given from outside:
declared before pooling, or chosen on a validation split; never picked on
the patients it is reported on. A figure undefined on the data (one class
only, no comparable pair...) is ``{"error": "..."}``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from hccfed.common.metrics import summary_calibration as cal
from hccfed.common.metrics import summary_discrimination as disc
from hccfed.common.metrics import summary_survival as surv

__all__ = ["HORIZON_MONTHS", "NET_BENEFIT_THRESHOLDS", "model_figures", "try_figure", "jsonable"]

HORIZON_MONTHS = 24.0
NET_BENEFIT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
NO_THRESHOLD = ("no threshold was given: sensitivity, specificity, PPV and NPV need a threshold declared before "
                "pooling (pool-summaries --threshold [MODEL=]VALUE) or chosen on a validation split; one picked "
                "on these patients would flatter the model")


def try_figure(f: Callable[[], Any]) -> Any:
    """f(), or {"error": message} when the figure is undefined on the data (ValueError)."""
    try:
        return f()
    except ValueError as err:
        return {"error": str(err)}


def jsonable(x: Any) -> Any:
    """``x`` with numpy arrays and scalars turned into lists and numbers; non-finite floats become None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def _threshold_block(m: dict, threshold: float | None, source: str | None) -> dict:
    if threshold is None:
        raise ValueError(NO_THRESHOLD)
    return {"threshold": float(threshold), "chosen_on": source or "declared before pooling",
            **disc.threshold_metrics_from_summary(m, float(threshold))}


def _survival_block(m: dict) -> dict:
    cut = surv.score_quantile_cutpoints(m, (0.5,))
    curves = surv.kaplan_meier_by_group_from_summary(m, cut)
    return {"cutpoints": cut, "rule": "high risk iff score >= cutpoint (the median score of these patients)",
            "kaplan_meier": [{"group": ("low", "high")[g], **c} for g, c in enumerate(curves)],
            "logrank": try_figure(lambda: surv.logrank_from_summary(m, cut))}


def model_figures(m: dict, threshold: float | None = None, threshold_source: str | None = None,
                  alpha: float = 0.05) -> dict:
    """The figures of one model from its tables (:data:`common.metrics.summaries.MODEL_KEYS`).

    ``threshold`` (score units; positive iff score >= threshold) and
    ``threshold_source`` (where it came from, shown in the report) give the
    operating point; without a threshold that block is an error saying how
    to get one. The ROC curve leaves out its thresholds (each would be a
    patient's score).
    """
    return {
        "auc": try_figure(lambda: disc.auc_from_summary(m, alpha)),
        "roc": try_figure(lambda: {k: v for k, v in disc.roc_curve_from_summary(m).items() if k != "threshold"}),
        "c_index": try_figure(lambda: disc.cindex_from_summary(m)),
        "threshold": try_figure(lambda: _threshold_block(m, threshold, threshold_source)),
        "brier": try_figure(lambda: cal.brier_from_summary(m)),
        "calibration_curve": try_figure(lambda: cal.calibration_curve_from_summary(m, 10)),
        "calibration": try_figure(lambda: cal.calibration_intercept_slope_from_summary(m)),
        "hosmer_lemeshow": try_figure(lambda: cal.hosmer_lemeshow_from_summary(m, 10)),
        "net_benefit": try_figure(lambda: cal.net_benefit_from_summary(m, NET_BENEFIT_THRESHOLDS)),
        "risk_groups": try_figure(lambda: _survival_block(m)),
        "time_dependent_auc_24m": try_figure(lambda: surv.time_dependent_auc_from_summary(m, HORIZON_MONTHS)),
    }
