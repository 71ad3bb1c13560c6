"""Classifiers of the suite. Inputs are float images in [0, 1]; normalisation lives inside the model."""

from __future__ import annotations

from salun_ext.models.checkpoint import ModelSpec, load_classifier, load_weights, read_spec, save_classifier
from salun_ext.models.classifiers import MODELS, build_model, last_linear, reinitialize, replace_module

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "last_linear",
    "load_classifier",
    "load_weights",
    "read_spec",
    "reinitialize",
    "replace_module",
    "save_classifier",
]
