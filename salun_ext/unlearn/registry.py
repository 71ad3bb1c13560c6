"""Method names -> classes, in the order of the paper's Table 1 (then the methods beyond the paper)."""

from __future__ import annotations

from typing import Any

from salun_ext.unlearn.base import UnlearnMethod
from salun_ext.unlearn.boundary import BoundaryExpanding, BoundaryShrink
from salun_ext.unlearn.finetune import FineTune, L1Sparse, Retrain
from salun_ext.unlearn.gradient import GradientAscent, NegGradPlus
from salun_ext.unlearn.influence import InfluenceUnlearning
from salun_ext.unlearn.random_label import RandomLabel, SalUn, SalUnSoft
from salun_ext.unlearn.scrub import SCRUB
from salun_ext.unlearn.ssd import SSD

METHODS: dict[str, type[UnlearnMethod]] = {
    cls.name: cls
    for cls in (
        Retrain,
        FineTune,
        RandomLabel,
        GradientAscent,
        InfluenceUnlearning,
        BoundaryExpanding,
        BoundaryShrink,
        L1Sparse,
        SalUn,
        SalUnSoft,
        SCRUB,
        NegGradPlus,
        SSD,
    )
}
PAPER_METHODS = [name for name, cls in METHODS.items() if cls.in_paper]
EXTRA_METHODS = [name for name, cls in METHODS.items() if not cls.in_paper]

# other spellings users type (the paper code's names, table labels)
ALIASES = {
    "wfisher": "iu",
    "woodfisher": "iu",
    "boundary_expanding": "be",
    "boundary_shrink": "bs",
    "ft_l1": "l1_sparse",
    "ft_prune": "l1_sparse",
    "l1": "l1_sparse",
    "rl_proximal": "salun_soft",
    "neggrad+": "neggrad_plus",
    "neggradplus": "neggrad_plus",
}


def method_key(name: str) -> str:
    """Canonical method name ('SalUn-soft' -> 'salun_soft', 'wfisher' -> 'iu'); ValueError when unknown."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return key


def get_method(name: str, config: Any = None, **overrides: Any) -> UnlearnMethod:
    """An instance of the named method with its paper defaults, changed by `overrides`."""
    return METHODS[method_key(name)](config, **overrides)
