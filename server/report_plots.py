"""Plots of a run's pooled curves, as self-contained PNG data URIs for the HTML report.

Every plot is drawn from aggregate curves already in the metrics dict (ROC
points, calibration bins, net-benefit curves, Kaplan-Meier steps), never from
patient rows. Each function takes ``{model name: curve}`` and returns a
``data:image/png;base64,...`` string, or None when no model has that curve.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # no display at a site or in CI
import matplotlib.pyplot as plt  # noqa: E402


def _data_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def roc_plot(curves: Mapping[str, Mapping[str, Any]]) -> str | None:
    """ROC curves: ``{model: {"fpr": [...], "tpr": [...]}}``."""
    if not curves:
        return None
    fig, ax = _axes("ROC, early recurrence (pooled test patients)", "1 - specificity", "sensitivity")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for name, curve in curves.items():
        ax.step(curve["fpr"], curve["tpr"], where="post", lw=1.4, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    return _data_uri(fig)


def calibration_plot(curves: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Calibration: ``{model: {"predicted": [...], "observed": [...]}}`` per risk bin."""
    if not curves:
        return None
    fig, ax = _axes("Calibration (pooled test patients)", "predicted probability", "observed frequency")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for name, curve in curves.items():
        ax.plot(curve["predicted"], curve["observed"], marker="o", ms=3, lw=1.2, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    return _data_uri(fig)


def decision_plot(curves: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Decision curves: ``{model: {"threshold": [...], "net_benefit": [...], "treat_all": [...]}}``."""
    if not curves:
        return None
    fig, ax = _axes("Decision curves", "threshold probability", "net benefit")
    first = next(iter(curves.values()))
    ax.plot(first["threshold"], first["treat_all"], color="black", lw=1, label="treat all")
    ax.axhline(0.0, color="grey", lw=1, label="treat none")
    for name, curve in curves.items():
        ax.plot(curve["threshold"], curve["net_benefit"], lw=1.3, label=name)
    top = max(max(c["net_benefit"]) for c in curves.values())
    ax.set_ylim(-0.05, max(0.05, top * 1.15))
    ax.legend(fontsize=7, loc="upper right")
    return _data_uri(fig)


def km_plot(groups: Mapping[str, Mapping[str, Any]], title: str) -> str | None:
    """Kaplan-Meier curves of risk groups: ``{group: {"time": [...], "survival": [...]}}``."""
    if not groups:
        return None
    fig, ax = _axes(title, "months", "recurrence-free probability")
    for name, curve in groups.items():
        ax.step(curve["time"], curve["survival"], where="post", lw=1.4, label=name)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    return _data_uri(fig)
