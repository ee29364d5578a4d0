"""Models by name: ``mlp``, ``cnn_small``, ``vgg`` (the authors' 8-conv BN VGG), ``resnet18`` (CIFAR stem).

Every model keeps BatchNorm (momentum 0.1, eps 1e-5: PyTorch's equivalent of the authors' Haiku decay 0.9), so
that the BN-statistics refresh that every method relies on is always exercised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["MODELS", "ModelConfig", "build_model", "count_parameters"]


def _bn(channels: int, dims: int = 2) -> nn.Module:
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, eps=1e-5, momentum=0.1)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), _bn(c_out), nn.ReLU(inplace=True)]


def mlp(input_shape: Sequence[int], num_classes: int, hidden: int = 128, depth: int = 2) -> nn.Module:
    """Flatten -> ``depth`` x [Linear, BN, ReLU] -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), _bn(hidden, dims=1), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn_small(input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 32),
              hidden: int = 128, pool_to: int = 4) -> nn.Module:
    """A ~84k-parameter BN CNN (at 28x28x1) that memorizes 10k noisy labels on a CPU in minutes.

    Two stages of 2 x [conv3x3, BN, ReLU] + max-pool, an adaptive average pool to ``pool_to`` x ``pool_to``
    (keeps some spatial layout, unlike a global pool, which is what lets it memorize), then a BN MLP head.
    """
    c_in = input_shape[0]
    layers: list[nn.Module] = []
    for width in widths:
        layers += _conv_bn_relu(c_in, width) + _conv_bn_relu(width, width) + [nn.MaxPool2d(2, ceil_mode=True)]
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(pool_to), nn.Flatten(), nn.Linear(c_in * pool_to * pool_to, hidden),
               _bn(hidden, dims=1), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def vgg(input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (64, 128, 256, 512)) -> nn.Module:
    """The authors' VGG: 4 stages of 2 x [conv3x3 (no bias), BN, ReLU] + 2x2 max-pool (SAME), GAP, Linear."""
    c_in = input_shape[0]
    layers: list[nn.Module] = []
    for width in widths:
        layers += _conv_bn_relu(c_in, width) + _conv_bn_relu(width, width) + [nn.MaxPool2d(2, ceil_mode=True)]
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, stride_on_second: bool):
        super().__init__()
        s1, s2 = (1, stride) if stride_on_second else (stride, 1)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, s1, 1, bias=False)
        self.bn1 = _bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, s2, 1, bias=False)
        self.bn2 = _bn(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _bn(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(input_shape: Sequence[int], num_classes: int, stride_on_second: bool = False) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool).

    Args:
        stride_on_second: put a block's stride on its second 3x3 conv, as the authors' Haiku ResNet does
            (torchvision puts it on the first).
    """
    layers: list[nn.Module] = _conv_bn_relu(input_shape[0], 64)
    c_in = 64
    for width, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
        layers += [_BasicBlock(c_in, width, stride, stride_on_second), _BasicBlock(width, width, 1, stride_on_second)]
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn_small": cnn_small, "vgg": vgg, "resnet18": resnet18}


def _haiku_init(model: nn.Module) -> None:
    """The authors' init: truncated normal (2 std) with std 1/sqrt(fan_in) for conv/linear weights, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            nn.init.trunc_normal_(module.weight, std=1 / math.sqrt(fan_in), a=-2 / math.sqrt(fan_in),
                                  b=2 / math.sqrt(fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, init: str = "torch",
                seed: int | None = None, **kwargs) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of ``MODELS``.
        input_shape: ``(C, H, W)`` or ``(d,)``.
        num_classes: K.
        init: ``torch`` (PyTorch defaults) or ``haiku`` (the authors').
        seed: seeds the initialization when given.
        **kwargs: architecture options of the named builder.

    Raises:
        ValueError: unknown name or init.
    """
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; valid choices: {sorted(MODELS)}")
    if init not in ("torch", "haiku"):
        raise ValueError(f"model.init={init!r} is unknown; valid choices: ['haiku', 'torch']")
    with torch.random.fork_rng(devices=[]):  # seeding the init must not disturb the caller's RNG
        if seed is not None:
            torch.manual_seed(seed)
        model = MODELS[name](tuple(input_shape), num_classes, **kwargs)
        if init == "haiku":
            _haiku_init(model)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (P)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class ModelConfig:
    """Which model to build (a Hydra structured config).

    Attributes:
        name: one of ``MODELS``.
        init: ``torch`` or ``haiku`` (the authors' truncated-normal init).
        options: architecture options passed to the builder (e.g. ``widths``, ``hidden``, ``stride_on_second``).
    """

    name: str = "cnn_small"
    init: str = "torch"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model.name={self.name!r} is unknown; valid choices: {sorted(MODELS)}")
        if self.init not in ("torch", "haiku"):
            raise ValueError(f"model.init={self.init!r} is unknown; valid choices: ['haiku', 'torch']")

    def build(self, input_shape: Sequence[int], num_classes: int, seed: int | None = None) -> nn.Module:
        """A freshly initialized model (the same weights for the same seed)."""
        return build_model(self.name, input_shape, num_classes, init=self.init, seed=seed, **dict(self.options))
