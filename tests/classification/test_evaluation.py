"""Metrics against hand-computed values; aggregation, gaps and reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from salun_ext.classification.evaluation import (
    accuracy_from_probs,
    confidence,
    entropy,
    evaluate_unlearning,
    markdown_table,
    mean_std,
    mia_efficacy,
    modified_entropy,
    plot_gaps,
    ranking,
    shadow_indices,
    summarize,
    svc_attack,
)
from salun_ext.data import ImageDataset
from salun_ext.utils import write_json

PROBS = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.1, 0.2, 0.7]])
LABELS = torch.tensor([0, 1, 2])


def test_confidence_and_accuracy():
    assert confidence(PROBS, LABELS).tolist() == pytest.approx([0.5, 0.0, 0.7])
    assert accuracy_from_probs(PROBS, LABELS) == pytest.approx(200 / 3)  # rows 0 and 2 are right
    assert math.isnan(accuracy_from_probs(PROBS[:0], LABELS[:0]))


def test_entropy_by_hand():
    ln = math.log
    expected = [-(0.5 * ln(0.5) + 2 * 0.25 * ln(0.25)), 0.0, -(0.1 * ln(0.1) + 0.2 * ln(0.2) + 0.7 * ln(0.7))]
    assert entropy(PROBS).tolist() == pytest.approx(expected)


def test_modified_entropy_by_hand():
    ln = math.log
    # -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    row0 = -(0.5 * ln(0.5)) - 2 * 0.25 * ln(0.75)
    row1 = -(1.0 * ln(1e-30)) - 1.0 * ln(1e-30)  # p_y = 0 and an off-label p_i = 1: log floors at 1e-30
    row2 = -(0.3 * ln(0.7)) - 0.1 * ln(0.9) - 0.2 * ln(0.8)
    assert modified_entropy(PROBS, LABELS).tolist() == pytest.approx([row0, row1, row2])
    # a confident correct prediction has a small modified entropy, a confident wrong one a large one
    sure = torch.tensor([[0.98, 0.01, 0.01]])
    assert modified_entropy(sure, torch.tensor([0])) < 0.1 < modified_entropy(sure, torch.tensor([1]))


def test_svc_attack_on_separable_features():
    members = np.linspace(0.9, 1.0, 50)
    non_members = np.linspace(0.0, 0.3, 50)
    assert svc_attack(members, non_members, np.full(10, 0.1)) == 100.0  # all called non-members
    assert svc_attack(members, non_members, np.full(10, 0.95)) == 0.0
    assert svc_attack(members, non_members, np.r_[np.full(3, 0.1), np.full(1, 0.95)]) == 75.0


def test_shadow_sets_follow_the_paper_and_subsample_when_asked():
    members, non_members = shadow_indices(n_retain=100, n_test=30, shadow_size=None)
    assert members.tolist() == list(range(30)) and non_members.tolist() == list(range(30))
    members, non_members = shadow_indices(100, 30, shadow_size=10, seed=0)
    assert len(members) == len(non_members) == 10 and members.max() < 100 and non_members.max() < 30


def _synthetic_mia_sets(seed=14):
    """Fixed synthetic softmax outputs with overlapping member / non-member confidences (3 classes).

    retain: 40 confident rows (the first len(test): the attack's members) + 60 unsure rows the attack must not
    use; test: 40 rows (non-members); forget: 30 rows in between. Legacy RandomState: the same on every machine."""
    rng = np.random.RandomState(seed)

    def rows(n, concentration):
        y = rng.randint(0, 3, n)
        alpha = np.ones((n, 3))
        alpha[np.arange(n), y] = concentration
        p = np.array([rng.dirichlet(a) for a in alpha])
        return torch.tensor(p, dtype=torch.float32), torch.tensor(y)

    head, tail = rows(40, 6.0), rows(60, 1.0)
    retain = (torch.cat([head[0], tail[0]]), torch.cat([head[1], tail[1]]))
    test, forget = rows(40, 2.0), rows(30, 3.5)
    return retain, test, forget


def test_mia_efficacy_matches_the_paper_codes_svc_mia():
    # Expected numbers computed once (not by this library) from the definition in the paper code's
    # Classification/evaluation/SVC_MIA.py (OPTML-Group/Unlearn-Saliency): SVC(C=3, gamma='auto', kernel='rbf')
    # fit on shadow_train = the first len(test) retain rows (label 1) and shadow_test = the test rows (label 0),
    # target_test = the forget rows, efficacy = 1 - mean(predict(target)); features p_y (gather of the true
    # label's probability, shape (n, 1)) and the entropy -sum p log p, with scikit-learn's SVC on these inputs.
    # They pin the attack: C=1 gives 43.33, gamma='scale' 36.67, C=100 43.33, all retain rows / the last 40 as
    # members give other numbers (the last 40: 96.67).
    retain, test, forget = _synthetic_mia_sets()
    result = mia_efficacy(retain, test, forget, features=["confidence", "entropy"])
    assert result["confidence"] == pytest.approx(100 * 16 / 30)  # 53.33
    assert result["entropy"] == pytest.approx(100 * 22 / 30)  # 73.33
    assert svc_attack(confidence(*retain)[:40], confidence(*test), confidence(*forget)) == pytest.approx(100 * 16 / 30)
    with pytest.raises(ValueError, match="unknown MIA feature"):
        mia_efficacy(retain, test, forget, features=["loss"])


def test_mia_efficacy_uses_each_feature_of_the_softmax():
    # members confident, non-members unsure; the forget set: confident rows for p_y and entropy, but with the
    # wrong label for half of it -> only the label-aware features (confidence, m-entropy) call that half non-member
    confident = torch.tensor([[0.9, 0.05, 0.05]] * 20 + [[0.97, 0.02, 0.01]] * 20)
    unsure = torch.tensor([[0.5, 0.3, 0.2]] * 20 + [[0.4, 0.35, 0.25]] * 20)
    zeros = torch.zeros(40, dtype=torch.long)
    forget_labels = torch.tensor([0] * 5 + [1] * 5)
    result = mia_efficacy((confident, zeros), (unsure, zeros), (confident[:10], forget_labels))
    assert result == {"confidence": 50.0, "entropy": 0.0, "m_entropy": 50.0}


class _FixedModel(torch.nn.Module):
    """Predicts class = the image's first pixel value (0 or 1), with confidence 0.9."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        first = (x[:, 0, 0, 0] > 0.5).long()
        logits = torch.full((len(x), 2), math.log(0.1), device=x.device) + self.dummy
        logits[torch.arange(len(x)), first] = math.log(0.9)
        return logits


def _ds(pixels, labels):
    images = torch.tensor(pixels, dtype=torch.uint8).view(-1, 1, 1, 1) * 255
    return ImageDataset(images, torch.tensor(labels), ["a", "b"], "toy")


def test_evaluate_unlearning_accuracies():
    model = _FixedModel()
    forget = _ds([0, 1, 1, 0], [0, 0, 0, 0])  # 2 of 4 right -> UA 50
    retain = _ds([1] * 10, [1] * 9 + [0])  # 9 of 10 right
    test = _ds([0, 1, 0, 1, 0], [0, 1, 1, 1, 0])  # 4 of 5 right
    metrics = evaluate_unlearning(model, forget, retain, test)
    assert metrics["UA"] == pytest.approx(50.0) and metrics["RA"] == pytest.approx(90.0)
    assert metrics["TA"] == pytest.approx(80.0)
    # p_y: members (first 5 retain rows) all 0.9; non-members (test) 0.9 x 4 and 0.1; forget 0.9, 0.1, 0.1, 0.9.
    # The SVC calls 0.9 a member (5 vs 4) and 0.1 a non-member: 2 of 4 forget samples -> 50
    assert metrics["MIA"] == pytest.approx(50.0)
    # every row's entropy is H(0.9, 0.1): members and non-members look alike, the SVC calls all members
    assert metrics["MIA_entropy"] == pytest.approx(0.0)
    assert set(metrics) == {"UA", "RA", "TA", "MIA", "MIA_entropy", "MIA_m_entropy"}


def _record(method, seed, ua, ra=99.0, ta=90.0, mia=10.0, rte=60.0, scenario="random 10%", ratio=0.1):
    return {
        "scenario": scenario,
        "ratio": ratio,
        "method": method,
        "label": {"retrain": "Retrain", "salun": "SalUn", "ft": "FT"}[method],
        "seed": seed,
        "metrics": {"UA": ua, "RA": ra, "TA": ta, "MIA": mia},
        "rte_seconds": rte,
    }


RECORDS = [
    _record("retrain", 1, 5.0, mia=12.0, rte=600),
    _record("retrain", 2, 7.0, mia=14.0, rte=600),
    _record("salun", 1, 4.0, ra=98.0, mia=13.0, rte=120),
    _record("salun", 2, 6.0, ra=98.0, mia=13.0, rte=180),
    _record("ft", 1, 1.0, ta=91.0, mia=3.0),
    _record("retrain", 1, 8.0, scenario="random 50%", ratio=0.5),
    _record("ft", 1, 2.0, scenario="random 50%", ratio=0.5),
]


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_summarize_gaps_and_avg_gap_by_hand():
    summary = summarize(RECORDS)
    ten = summary["scenarios"][0]
    assert ten["scenario"] == "random 10%" and ten["ratio"] == 0.1
    salun, ft, retrain = ten["methods"]["salun"], ten["methods"]["ft"], ten["methods"]["retrain"]
    assert retrain["mean"]["UA"] == 6.0 and retrain["std"]["UA"] == pytest.approx(math.sqrt(2.0))
    # the gaps are taken to the reference method's means: another reference gives other gaps, none without one
    to_ft = summarize(RECORDS, reference="ft")["scenarios"][0]["methods"]
    assert to_ft["salun"]["gap"] == pytest.approx({"UA": 4.0, "RA": 1.0, "TA": 1.0, "MIA": 10.0})
    assert to_ft["retrain"]["avg_gap"] == pytest.approx((5 + 0 + 1 + 10) / 4)
    no_retrain = summarize([r for r in RECORDS if r["method"] != "retrain"])["scenarios"][0]["methods"]
    assert no_retrain["salun"]["gap"] is None and no_retrain["salun"]["avg_gap"] is None
    # SalUn: UA 5 vs 6, RA 98 vs 99, TA 90 vs 90, MIA 13 vs 13 -> gaps 1, 1, 0, 0 -> Avg. Gap 0.5
    assert salun["gap"] == pytest.approx({"UA": 1.0, "RA": 1.0, "TA": 0.0, "MIA": 0.0})
    assert salun["avg_gap"] == pytest.approx(0.5)
    assert salun["rte_minutes"]["mean"] == pytest.approx(2.5) and salun["trials"] == 2 and salun["seeds"] == [1, 2]
    # FT: UA 1 vs 6, TA 91 vs 90, MIA 3 vs 13 -> (5 + 0 + 1 + 10) / 4
    assert ft["avg_gap"] == pytest.approx(4.0)
    assert ranking(ten) == [("salun", 0.5), ("ft", 4.0)]
    assert summary["scenarios"][1]["methods"]["ft"]["avg_gap"] == pytest.approx(1.5)


def test_markdown_table_layout():
    table = markdown_table(summarize(RECORDS))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Methods | random 10%: UA | RA | TA | MIA | Avg. Gap | RTE (min) | random 50%: UA")
    assert lines[2].startswith("| Retrain | 6.00 ± 1.41 (0.00) |")
    salun = next(line for line in lines if line.startswith("| SalUn"))
    assert "5.00 ± 1.41 (1.00)" in salun and "| 0.50 | 2.50 |" in salun
    assert salun.rstrip().endswith("| – | – | – | – | – | – |")  # no 50% run for SalUn
    ft = next(line for line in lines if line.startswith("| FT"))
    assert "| 1.00 (5.00) |" in ft  # a single trial prints no std


def test_plot_and_json(tmp_path):
    summary = summarize(RECORDS)
    assert plot_gaps(summary, tmp_path / "gaps.png")
    assert (tmp_path / "gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_gaps({"scenarios": [{"ratio": None, "methods": {}}]}, tmp_path / "none.png")
    write_json({"a": float("nan"), "b": [1.0, float("inf")]}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None]}
