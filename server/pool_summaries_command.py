"""`hccfed pool-summaries`: site summary JSONs in, pooled figures, report and round-2 requests out.

Reads the files `hccfed site-summary` wrote at each hospital, checks and
pools them (:mod:`server.pooling`) and writes to the output folder:

- ``figures.json``: per model the pooled figures (AUC with DeLong CI, C-index,
  time-dependent AUC at 24 months, operating point at the declared
  threshold, Brier, calibration, Hosmer-Lemeshow, net benefit, Kaplan-Meier
  by risk group with log-rank), the same per site, a random-effects
  meta-analysis of the per-site AUCs, and the paired DeLong tests with
  Holm-adjusted p-values when the files carry round-2 sums;
- ``report.html`` / ``report.md``: the same as tables and plots;
- ``round2/<site id>.json``: each site's round-2 request for the paired
  DeLong tests (exact summaries of two or more models), to send to that site only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hccfed.common.metrics.summary_checks import MinimumCells
from hccfed.common.metrics.summary_codec import encode_request
from hccfed.server.clinical_report import write_pooled_report
from hccfed.server.pooling import load_site_summary, pool_report


def parse_thresholds(texts: list[str] | None) -> dict[str, float]:
    """``["0.3"]`` (every model) or ``["a=0.3", "b=1.2"]`` (per model) -> {model or "*": threshold}."""
    out: dict[str, float] = {}
    for text in texts or []:
        model, _, value = text.rpartition("=") if "=" in text else ("*", "", text)
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--threshold {text!r}: expected VALUE or MODEL=VALUE with a number") from None
        if model in out:
            raise ValueError(f"--threshold given twice for {'every model' if model == '*' else repr(model)}")
        out[model] = number
    return out


def _request_files(requests: dict[str, dict]) -> dict[str, str]:
    names: dict[str, str] = {}
    for site in requests:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", site) + ".json"
        if name in names.values():
            raise ValueError(f"site ids {site!r} and {next(k for k, v in names.items() if v == name)!r} "
                             f"give one file name {name}: rename a site")
        names[site] = name
    return names


def write_pool_report(paths: list[str | Path], out_dir: str | Path, alpha: float = 0.05,
                      thresholds: dict[str, float] | None = None,
                      minimum: MinimumCells = MinimumCells()) -> Path:
    """Load and pool the site summaries at ``paths``; write the outputs above to ``out_dir``; returns figures.json."""
    figures, requests = pool_report([load_site_summary(p) for p in paths], alpha, thresholds, minimum)
    out = Path(out_dir)
    inputs = {Path(p).resolve() for p in paths}
    out.mkdir(parents=True, exist_ok=True)
    if (out / "figures.json").resolve() in inputs:
        raise ValueError(f"{out / 'figures.json'} is one of the input files: give another --out")
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    if requests:
        folder = out / "round2"
        folder.mkdir(exist_ok=True)
        for site, name in _request_files(requests).items():
            if (folder / name).resolve() in inputs:
                raise ValueError(f"{folder / name} is one of the input files: give another --out")
            (folder / name).write_text(json.dumps(encode_request(requests[site])))
    write_pooled_report(figures, out)
    return out / "figures.json"
