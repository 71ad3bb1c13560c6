"""Classifiers of the suite. Inputs are float images in [0, 1]; normalisation lives inside the model."""

from __future__ import annotations

from salun_ext.models.classifiers import MODELS, build_model

__all__ = ["MODELS", "build_model"]
