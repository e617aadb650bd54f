"""The names of the splits a server asks a site for, shared by both sides.

A site's patients are split at the site (``hccfed.client.site_data``) into "train", "val" and "test";
"dev" is train + val, the development patients; federated cross-validation (run option ``cv-folds``)
names fold k of K's training part (the other folds) and held-out part ``cv-<k>-of-<K>-train`` and
``cv-<k>-of-<K>-val``. The server only sends these names; the patients behind them never leave.
"""

from __future__ import annotations

#: The development patients: the training and validation splits together (what cross-validation folds).
DEV = "dev"
_CV_PARTS = ("train", "val")


def fitted_split(cv_folds: int) -> str:
    """The patients a model learns from: the training split, or with cross-validation (``cv-folds`` >= 2)
    every development patient; the references beside a run learn from the same."""
    return DEV if cv_folds else "train"


def cv_split_name(fold: int, folds: int, part: str) -> str:
    """The split name of fold ``fold`` (1-based) of ``folds``: its ``part`` "train" (the other folds) or
    "val" (the fold itself), as the server names it in its messages."""
    if part not in _CV_PARTS or not 1 <= fold <= folds or folds < 2:
        raise ValueError(f"no cross-validation split: fold {fold} of {folds}, part {part!r}")
    return f"cv-{fold}-of-{folds}-{part}"


def parse_cv_split(name: str) -> tuple[int, int, str] | None:
    """(fold, folds, part) of a :func:`cv_split_name`, or None for any other name."""
    bits = name.split("-")
    if len(bits) != 5 or bits[0] != "cv" or bits[2] != "of" or bits[4] not in _CV_PARTS:
        return None
    try:
        fold, folds = int(bits[1]), int(bits[3])
    except ValueError:
        return None
    return (fold, folds, bits[4]) if 1 <= fold <= folds and folds >= 2 else None
