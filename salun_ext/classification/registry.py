"""Method names -> classes, in the order of the paper's Table 1 (then the methods beyond the paper)."""

from __future__ import annotations

from typing import Any

from salun_ext.classification.methods.base import UnlearnMethod
from salun_ext.classification.methods.boundary import BoundaryExpanding, BoundaryShrink
from salun_ext.classification.methods.finetune import FineTune, L1Sparse, Retrain
from salun_ext.classification.methods.gradient import GradientAscent, NegGradPlus
from salun_ext.classification.methods.influence import InfluenceUnlearning
from salun_ext.classification.methods.random_label import RandomLabel, SalUn, SalUnSoft
from salun_ext.classification.methods.scrub import SCRUB
from salun_ext.classification.methods.ssd import SSD
from salun_ext.train import Registry

METHODS: Registry[type[UnlearnMethod]] = Registry("method")
for _cls in (
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
):
    METHODS.register(_cls)
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


METHODS.alias(**ALIASES)


def method_key(name: str) -> str:
    """Canonical method name ('SalUn-soft' -> 'salun_soft', 'wfisher' -> 'iu'); UsageError when unknown."""
    return METHODS.key(name)


def get_method(name: str, config: Any = None, **overrides: Any) -> UnlearnMethod:
    """An instance of the named method with its paper defaults, changed by `overrides`."""
    return METHODS.get_class(name)(config, **overrides)
