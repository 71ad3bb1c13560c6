"""Language-model unlearning with transformers causal LMs: SalUn's mask + the methods of lm/methods.py.

See docs/lm.md. Needs `transformers` (pip install salun-ext[lm]).
"""

from salun_ext.lm.data import TextExample, collate, encode, load_texts
from salun_ext.lm.evaluate import evaluate_lm, sequence_logps, text_loss, verbatim_completion
from salun_ext.lm.losses import kl_to_reference, npo_loss, simnpo_loss, target_logprobs
from salun_ext.lm.methods import METHODS, LMMethod
from salun_ext.lm.model import load_causal_lm, save_causal_lm
from salun_ext.lm.tasks import LMUnlearnTask
from salun_ext.lm.unlearn import LMUnlearnConfig, LMUnlearnResult, lm_saliency, unlearn_lm

__all__ = [
    "METHODS",
    "LMMethod",
    "LMUnlearnConfig",
    "LMUnlearnResult",
    "LMUnlearnTask",
    "TextExample",
    "collate",
    "encode",
    "evaluate_lm",
    "kl_to_reference",
    "lm_saliency",
    "load_causal_lm",
    "load_texts",
    "npo_loss",
    "save_causal_lm",
    "sequence_logps",
    "simnpo_loss",
    "target_logprobs",
    "text_loss",
    "unlearn_lm",
    "verbatim_completion",
]
