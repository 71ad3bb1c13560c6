"""Model builders: a small CNN for tiny data, ResNet-18/50 with the CIFAR stem (3x3 conv, stride 1, no max-pool)
and VGG16-BN. Input channels and classes come from the dataset; normalisation lives inside the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from salun_ext.utils.errors import UsageError


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the model so every input is a plain [0, 1] image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def small_cnn(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    """Two conv blocks + a linear head: trains in seconds on digits / Fashion-MNIST on a CPU."""
    feat = image_size // 4
    return nn.Sequential(
        Normalize([0.5] * in_channels, [0.5] * in_channels),
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * feat * feat, num_classes),
    )


def resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 conv stride 1, no max-pool; normalisation inside."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return nn.Sequential(Normalize([0.5] * in_channels, [0.5] * in_channels), net)


def resnet50(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-50 with the CIFAR stem; normalisation inside."""
    import torchvision

    net = torchvision.models.resnet50(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return nn.Sequential(Normalize([0.5] * in_channels, [0.5] * in_channels), net)


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """VGG16 with batch norm for small images: 13 conv-BN-ReLU layers, global average pooling, one linear head.

    A max-pool is skipped once the feature map is 1x1, so the same network takes 8x8 to 64x64 inputs.
    """
    layers: list[nn.Module] = [Normalize([0.5] * in_channels, [0.5] * in_channels)]
    channels, size = in_channels, image_size
    for item in VGG16_LAYOUT:
        if item == "M":
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg16_bn": vgg16_bn,
}


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options,
) -> nn.Module:
    """A classifier by name ('small_cnn', 'resnet18', 'resnet50', 'vgg16_bn') for the dataset's shape.

    `options` go to the builder (e.g. small_cnn's width=). mean / std: the per-channel input normalisation inside
    the model (default 0.5 / 0.5; the paper's code uses each dataset's statistics).
    """
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    try:
        model = MODELS[name](in_channels, num_classes, image_size, **options)
    except TypeError as exc:
        raise UsageError(f"model {name!r} does not take options {sorted(options)}: {exc}") from exc
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != in_channels or len(std) != in_channels:
            raise UsageError(f"mean / std: expected {in_channels} values each, got {mean} / {std}")
        norm = next(m for m in model.modules() if isinstance(m, Normalize))
        norm.mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        norm.std.copy_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return model


def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Fresh weights for every layer (each module's reset_parameters, BN running statistics included), in place.

    Original training and Retrain both start from this, so they draw from the same initial distribution.
    """
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return model


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the model's last nn.Linear: the classification head."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UsageError(f"{type(model).__name__} has no nn.Linear layer (no classification head to find)")
    return found[-1]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
