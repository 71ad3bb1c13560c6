"""Classifier checkpoints: safetensors weights + JSON metadata that name the architecture (no pickle).

save_classifier("model.safetensors", model, ModelSpec("resnet18", 3, 10, 32), extra={"dataset": "cifar10"})
model, spec, extra = load_classifier("model.safetensors")
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import nn

from salun_ext.models.classifiers import MODELS, build_model
from salun_ext.utils.errors import MissingFileError, UsageError

FORMAT_NAME = "salun_ext.classifier"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ModelSpec:
    """Everything build_model needs: the architecture and the dataset's shape."""

    arch: str
    in_channels: int
    num_classes: int
    image_size: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # builder options, e.g. small_cnn width

    def build(self) -> nn.Module:
        return build_model(self.arch, self.in_channels, self.num_classes, self.image_size, **self.options)

    def describe(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.arch} ({self.in_channels} channel(s), {self.num_classes} classes, {self.image_size}px{opts})"


def save_classifier(
    path: str | os.PathLike, model: nn.Module, spec: ModelSpec, extra: dict[str, Any] | None = None
) -> None:
    """Write the model's state_dict (parameters and buffers) as safetensors with the spec in the metadata."""
    from salun_ext.utils.files import write_safetensors

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "spec": json.dumps(dataclasses.asdict(spec)),
        "extra": json.dumps(extra or {}),
    }
    write_safetensors(state, path, metadata=metadata)


def read_spec(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, Any]]:
    """The ModelSpec and extra metadata of a checkpoint, without loading the weights."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if metadata.get("format") != FORMAT_NAME:
        raise UsageError(
            f"{path}: not a salun_ext classifier checkpoint (format={metadata.get('format')!r}); "
            "write one with `salun-ext train` or salun_ext.models.save_classifier"
        )
    try:
        spec = ModelSpec(**json.loads(metadata["spec"]))
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: corrupted checkpoint metadata ({exc})") from exc
    if spec.arch not in MODELS:
        raise UsageError(f"{path}: unknown architecture {spec.arch!r} in the checkpoint; available: {sorted(MODELS)}")
    return spec, extra


def load_weights(model: nn.Module, path: str | os.PathLike, *, spec: ModelSpec | None = None) -> nn.Module:
    """Load a checkpoint's weights into `model` (in place); a clear error when it is another architecture."""
    from safetensors.torch import load_file

    saved_spec, _ = read_spec(path)
    if spec is not None and saved_spec != spec:
        raise UsageError(
            f"{os.fspath(path)}: the checkpoint is for {saved_spec.describe()}, but the model is {spec.describe()}"
        )
    state = load_file(os.fspath(path))
    missing, unexpected, mismatched = _compare_state(model, state)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if mismatched:
            parts.append(f"shape mismatch {mismatched[:3]}")
        raise UsageError(
            f"{os.fspath(path)}: the checkpoint ({saved_spec.describe()}) does not fit this "
            f"{type(model).__name__}: {'; '.join(parts)}"
        )
    model.load_state_dict(state)
    return model


def load_classifier(
    path: str | os.PathLike, *, expect: ModelSpec | None = None, expect_arch: str | None = None
) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Build the checkpoint's architecture and load its weights. `expect`/`expect_arch`: raise if it differs."""
    spec, extra = read_spec(path)
    if expect_arch is not None and spec.arch != expect_arch:
        raise UsageError(f"{os.fspath(path)}: the checkpoint is a {spec.describe()}, not a {expect_arch}")
    if expect is not None and spec != expect:
        raise UsageError(f"{os.fspath(path)}: the checkpoint is a {spec.describe()}, expected {expect.describe()}")
    check_metadata_fits_tensors(path, spec)  # before anything of the metadata's size is allocated
    model = spec.build()
    load_weights(model, path)
    return model, spec, extra


def check_metadata_fits_tensors(path: str | os.PathLike, spec: ModelSpec) -> None:
    """UsageError unless the architecture the metadata names has exactly the file's tensors (names and shapes).

    The metadata is checked against the tensors before any model is built: a small file whose metadata claims
    a huge architecture is refused without allocating it (the model is built on the meta device, which holds no
    data).
    """
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{os.fspath(path)}: the metadata's architecture cannot be built ({exc})") from None
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    if expected != found:
        wrong = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
        name = wrong[0]
        raise UsageError(
            f"{os.fspath(path)}: the metadata says {spec.describe()}, but the file's tensors do not match it "
            f"({len(wrong)} differ; e.g. {name!r}: metadata {expected.get(name)}, file {found.get(name)})"
        )


def _compare_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    return missing, unexpected, mismatched
