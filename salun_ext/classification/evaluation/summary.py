"""Multi-trial aggregation: mean ± std per method and scenario, gaps to Retrain, Avg. Gap, RTE.

A run record is a dict with at least "scenario" (e.g. "random 10%"), "method", "label", "seed", "metrics"
({"UA": .., "RA": .., "TA": .., "MIA": .., ...}) and "rte_seconds". Gap of a metric = |mean(method) -
mean(Retrain)| over the trials of the scenario (the paper's numbers in parentheses); Avg. Gap = the mean of the
four gaps of UA, RA, TA and MIA. std is the sample standard deviation (ddof = 1; 0 for a single trial).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

GAP_METRICS = ("UA", "RA", "TA", "MIA")
REFERENCE = "retrain"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def gaps(method_means: dict[str, float], reference_means: dict[str, float]) -> dict[str, float]:
    """|method - reference| per gap metric."""
    return {m: abs(method_means[m] - reference_means[m]) for m in GAP_METRICS}


def avg_gap(metric_gaps: dict[str, float]) -> float:
    return float(np.mean([metric_gaps[m] for m in GAP_METRICS]))


def summarize(runs: Iterable[dict[str, Any]], reference: str = REFERENCE) -> dict[str, Any]:
    """{"scenarios": [{"scenario", "ratio", "methods": {name: {...}}}, ...]} in first-seen order."""
    by_scenario: dict[str, dict[str, list[dict]]] = {}
    info: dict[str, dict] = {}
    labels: dict[str, str] = {}
    for run in runs:
        scenario = run["scenario"]
        by_scenario.setdefault(scenario, {}).setdefault(run["method"], []).append(run)
        info.setdefault(scenario, {"ratio": run.get("ratio"), "classes": run.get("classes")})
        labels[run["method"]] = run.get("label", run["method"])
    scenarios = []
    for scenario, methods in by_scenario.items():
        entries: dict[str, dict] = {}
        for name, trials in methods.items():
            metric_names = list(trials[0]["metrics"])
            stats = {m: mean_std([t["metrics"].get(m) for t in trials]) for m in metric_names}
            rte = mean_std([t["rte_seconds"] / 60.0 for t in trials])
            entries[name] = {
                "label": labels[name],
                "trials": len(trials),
                "seeds": sorted(t["seed"] for t in trials),
                "mean": {m: s[0] for m, s in stats.items()},
                "std": {m: s[1] for m, s in stats.items()},
                "rte_minutes": {"mean": rte[0], "std": rte[1]},
            }
        ref = entries.get(reference)
        for entry in entries.values():
            if ref is not None and all(m in entry["mean"] for m in GAP_METRICS):
                entry["gap"] = gaps(entry["mean"], ref["mean"])
                entry["avg_gap"] = avg_gap(entry["gap"])
            else:
                entry["gap"], entry["avg_gap"] = None, None
        scenarios.append({"scenario": scenario, **info[scenario], "methods": entries})
    return {"reference": reference, "gap_metrics": list(GAP_METRICS), "scenarios": scenarios}


def ranking(summary_scenario: dict[str, Any], exclude: Sequence[str] = (REFERENCE,)) -> list[tuple[str, float]]:
    """Methods of one scenario sorted by Avg. Gap (best first)."""
    rows = [
        (name, e["avg_gap"])
        for name, e in summary_scenario["methods"].items()
        if name not in exclude and e.get("avg_gap") is not None and not math.isnan(e["avg_gap"])
    ]
    return sorted(rows, key=lambda r: r[1])
