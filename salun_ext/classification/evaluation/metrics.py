"""The paper's metrics: UA, RA, TA and MIA-Efficacy (plus the entropy and modified-entropy attacks).

UA = 100 - accuracy on the forget set; RA = accuracy on the retain set; TA = accuracy on the test set (all without
augmentation). MIA-Efficacy: an SVC (C=3, gamma='auto', RBF, as the paper) learns member vs non-member from one
feature of the model's softmax output, with the first len(test) retain samples as members and the test set as
non-members; the score is the share (%) of forget samples it calls non-members. Features:
    confidence  p_y, the softmax probability of the true label (the paper's MIA-Efficacy)
    entropy     -sum_i p_i log p_i
    m_entropy   Song & Mittal's modified entropy -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
The paper code's modified entropy indexes whole columns by the label vector and takes log(p) where it means
log(1 - p); these are computed as defined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from salun_ext.data import ImageDataset
from salun_ext.utils import resolve_device
from salun_ext.utils.errors import UsageError

_LOG_FLOOR = 1e-30  # log(0) -> log(1e-30), as the reference attack code


@torch.no_grad()
def predict_proba(
    model: nn.Module, dataset: ImageDataset, *, batch_size: int = 512, device: str | torch.device | None = None
) -> torch.Tensor:
    """Softmax outputs (N x C, float32, on the CPU) of the model in eval mode, images as float [0, 1]."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device).float().div_(255.0)
            outs.append(torch.softmax(model(x).float(), dim=1).cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


def accuracy_from_probs(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (NaN for an empty set)."""
    if labels.numel() == 0:
        return float("nan")
    return float((probs.argmax(dim=1) == labels.cpu()).float().mean() * 100.0)


def accuracy(model: nn.Module, dataset: ImageDataset, *, batch_size: int = 512) -> float:
    return accuracy_from_probs(predict_proba(model, dataset, batch_size=batch_size), dataset.labels)


def confidence(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_y: the probability of the true label."""
    return probs.gather(1, labels.cpu().long()[:, None]).squeeze(1)


def entropy(probs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Shannon entropy of each row (0 log 0 = 0). `labels` is ignored (same signature as the other features)."""
    return -torch.where(probs > 0, probs * probs.clamp_min(_LOG_FLOOR).log(), torch.zeros_like(probs)).sum(dim=1)


def modified_entropy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Song & Mittal (2021): -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)."""
    labels = labels.cpu().long()
    p_y = confidence(probs, labels)
    true_term = -(1 - p_y) * p_y.clamp_min(_LOG_FLOOR).log()
    others = -probs * (1 - probs).clamp_min(_LOG_FLOOR).log()
    others = others.scatter(1, labels[:, None], 0.0).sum(dim=1)
    return true_term + others


MIA_FEATURES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "confidence": confidence,
    "entropy": entropy,
    "m_entropy": modified_entropy,
}


def svc_attack(
    members: torch.Tensor | np.ndarray, non_members: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray
) -> float:
    """Fit SVC(C=3, gamma='auto', rbf) on member (1) vs non-member (0) features; return the share (%) of
    `targets` predicted non-member."""
    from sklearn.svm import SVC

    def as_2d(a) -> np.ndarray:
        a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        return a.reshape(len(a), -1).astype(np.float64)

    x_in, x_out, x_target = as_2d(members), as_2d(non_members), as_2d(targets)
    if len(x_in) == 0 or len(x_out) == 0:
        raise UsageError("the membership attack needs members and non-members (retain and test sets are empty?)")
    if len(x_target) == 0:
        return float("nan")
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(np.concatenate([x_in, x_out]), np.concatenate([np.ones(len(x_in)), np.zeros(len(x_out))]))
    return float((1.0 - clf.predict(x_target).mean()) * 100.0)


def shadow_indices(n_retain: int, n_test: int, shadow_size: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(member rows of the retain set, non-member rows of the test set) for the attack's training data.

    Default (the paper): the first len(test) retain samples and the whole test set (when the retain set is the
    smaller one, the first len(retain) of each, so both classes stay balanced). With `shadow_size`, a seeded random
    subset of that many samples from each (for CPU budgets: the SVC fit is quadratic in its size).
    """
    n = min(n_retain, n_test)
    if shadow_size is None or shadow_size >= n:
        return np.arange(n), np.arange(n)
    if shadow_size < 1:
        raise UsageError(f"shadow_size must be >= 1, got {shadow_size}")
    rng = np.random.RandomState(seed)
    return np.sort(rng.choice(n_retain, shadow_size, replace=False)), np.sort(
        rng.choice(n_test, shadow_size, replace=False)
    )


def mia_efficacy(
    retain: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    forget: tuple[torch.Tensor, torch.Tensor],
    *,
    features: Sequence[str] = ("confidence", "entropy", "m_entropy"),
    shadow_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """MIA-Efficacy (%) per feature from (probs, labels) pairs of the retain, test and forget sets."""
    unknown = [f for f in features if f not in MIA_FEATURES]
    if unknown:
        raise UsageError(f"unknown MIA feature(s) {unknown}; available: {sorted(MIA_FEATURES)}")
    member_rows, non_member_rows = shadow_indices(len(retain[1]), len(test[1]), shadow_size, seed)
    out = {}
    for name in features:
        fn = MIA_FEATURES[name]
        members = fn(retain[0][member_rows], retain[1].cpu()[member_rows])
        non_members = fn(test[0][non_member_rows], test[1].cpu()[non_member_rows])
        out[name] = svc_attack(members, non_members, fn(forget[0], forget[1]))
    return out


def evaluate_unlearning(
    model: nn.Module,
    forget: ImageDataset,
    retain: ImageDataset,
    test: ImageDataset,
    *,
    batch_size: int = 512,
    mia_features: Sequence[str] = ("confidence", "entropy", "m_entropy"),
    mia_shadow_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """UA, RA, TA, MIA (= MIA-Efficacy with the confidence feature) and MIA_<feature> for the others, in %.

    A model with NaN / Inf weights is refused up front (naming the tensor): its probabilities would be NaN, and
    the MIA's SVC would fail deep inside scikit-learn.
    """
    state = model.state_dict().items()
    bad = next((n for n, t in state if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise UsageError(f"model: {bad!r} holds NaN or Inf values; there is nothing meaningful to evaluate")
    probs = {
        name: (predict_proba(model, ds, batch_size=batch_size), ds.labels.cpu())
        for name, ds in (("forget", forget), ("retain", retain), ("test", test))
    }
    metrics = {
        "UA": 100.0 - accuracy_from_probs(*probs["forget"]),
        "RA": accuracy_from_probs(*probs["retain"]),
        "TA": accuracy_from_probs(*probs["test"]),
    }
    mia = mia_efficacy(
        probs["retain"], probs["test"], probs["forget"], features=mia_features, shadow_size=mia_shadow_size, seed=seed
    )
    for name, value in mia.items():
        metrics["MIA" if name == "confidence" else f"MIA_{name}"] = value
    return metrics
