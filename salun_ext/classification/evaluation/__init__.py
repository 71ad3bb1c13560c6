"""Evaluation of classification unlearning: the paper's metrics, multi-trial gaps to Retrain, reports.

metrics = evaluate_unlearning(model, split.forget, split.retain, split.test)   # UA, RA, TA, MIA, ...
summary = summarize(run_records)                                              # mean ± std, gaps, Avg. Gap
print(markdown_table(summary)); plot_gaps(summary, "gaps.png")
"""

from __future__ import annotations

from salun_ext.classification.evaluation.metrics import (
    MIA_FEATURES,
    accuracy,
    accuracy_from_probs,
    confidence,
    entropy,
    evaluate_unlearning,
    mia_efficacy,
    modified_entropy,
    predict_proba,
    shadow_indices,
    svc_attack,
)
from salun_ext.classification.evaluation.report import extra_mia_table, markdown_table, plot_gaps
from salun_ext.classification.evaluation.summary import GAP_METRICS, avg_gap, gaps, mean_std, ranking, summarize

__all__ = [
    "GAP_METRICS",
    "MIA_FEATURES",
    "accuracy",
    "accuracy_from_probs",
    "avg_gap",
    "confidence",
    "entropy",
    "evaluate_unlearning",
    "extra_mia_table",
    "gaps",
    "markdown_table",
    "mean_std",
    "mia_efficacy",
    "modified_entropy",
    "plot_gaps",
    "predict_proba",
    "ranking",
    "shadow_indices",
    "summarize",
    "svc_attack",
]
