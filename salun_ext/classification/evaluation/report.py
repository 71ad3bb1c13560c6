"""Reports: a Markdown table laid out like the paper's Table 1 and a PNG of the gaps vs the forgetting ratio
(the paper's Figure 1), both from `summarize(...)`'s output."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salun_ext.classification.evaluation.summary import GAP_METRICS

TABLE_METRICS = ("UA", "RA", "TA", "MIA")


def _cell(mean: float, std: float, gap: float | None, trials: int) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    text = f"{mean:.2f} ± {std:.2f}" if trials > 1 else f"{mean:.2f}"
    return text + (f" ({gap:.2f})" if gap is not None else "")


def _rte(entry: dict[str, Any]) -> str:
    minutes = entry["rte_minutes"]["mean"]
    return f"{minutes:.2f}" if minutes >= 0.995 else f"{minutes:.3f}"


def markdown_table(summary: dict[str, Any], methods: Sequence[str] | None = None) -> str:
    """One row per method; per scenario the columns UA, RA, TA, MIA (mean ± std (gap to Retrain)), Avg. Gap, RTE."""
    scenarios = summary["scenarios"]
    if not scenarios:
        return "(no runs)\n"
    order = list(methods) if methods is not None else list(dict.fromkeys(m for s in scenarios for m in s["methods"]))
    header = ["Methods"]
    for s in scenarios:
        title = s["scenario"]
        header += [f"{title}: UA", "RA", "TA", "MIA", "Avg. Gap", "RTE (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for name in order:
        label = next((s["methods"][name]["label"] for s in scenarios if name in s["methods"]), name)
        row = [label]
        for s in scenarios:
            entry = s["methods"].get(name)
            if entry is None:
                row += ["–"] * 6
                continue
            gap = entry.get("gap") or {}
            row += [_cell(entry["mean"][m], entry["std"][m], gap.get(m), entry["trials"]) for m in TABLE_METRICS]
            row.append(f"{entry['avg_gap']:.2f}" if entry.get("avg_gap") is not None else "–")
            row.append(_rte(entry))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def extra_mia_table(summary: dict[str, Any]) -> str:
    """The entropy and modified-entropy MIA-Efficacy (mean ± std) per scenario and method."""
    lines = [
        "| Scenario | Method | MIA (confidence) | MIA (entropy) | MIA (m-entropy) |",
        "|---|---|:---:|:---:|:---:|",
    ]
    for s in summary["scenarios"]:
        for entry in s["methods"].values():
            cells = [
                _cell(entry["mean"].get(k, float("nan")), entry["std"].get(k, float("nan")), None, entry["trials"])
                for k in ("MIA", "MIA_entropy", "MIA_m_entropy")
            ]
            lines.append(f"| {s['scenario']} | {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_gaps(summary: dict[str, Any], path: str | os.PathLike, *, exclude: Sequence[str] = ("retrain",)) -> bool:
    """Figure-1-style PNG: per method, Avg. Gap and the four metric gaps to Retrain vs the forgetting ratio.

    Only random-forgetting scenarios have a ratio; returns False (and writes nothing) when there are none.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted((s for s in summary["scenarios"] if s.get("ratio") is not None), key=lambda s: s["ratio"])
    if not scenarios:
        return False
    methods = list(dict.fromkeys(m for s in scenarios for m in s["methods"] if m not in exclude))
    panels = [("Avg. Gap", None), *[(f"{m} gap", m) for m in GAP_METRICS]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), sharex=True)
    cmap = plt.get_cmap("tab20")
    for ax, (title, metric) in zip(axes, panels):
        for i, name in enumerate(methods):
            xs, ys = [], []
            for s in scenarios:
                entry = s["methods"].get(name)
                if entry is None or entry.get("gap") is None:
                    continue
                xs.append(100 * s["ratio"])
                ys.append(entry["avg_gap"] if metric is None else entry["gap"][metric])
            if xs:
                label = next(s["methods"][name]["label"] for s in scenarios if name in s["methods"])
                style = "-" if name.startswith("salun") else "--"
                ax.plot(xs, ys, style, marker="o", color=cmap(i % 20), label=label, linewidth=2 if style == "-" else 1)
        ax.set_title(title)
        ax.set_xlabel("forgetting ratio (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gap to Retrain (percentage points)")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Gap to Retrain vs forgetting ratio ({summary.get('title', '')})".replace(" ()", ""))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
