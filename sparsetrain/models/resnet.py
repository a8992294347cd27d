"""CIFAR-style residual networks: ResNet-20/32/56 (He et al. 2016) and WRN-28-k (Zagoruyko &
Komodakis 2016), with a width multiplier and adaptive pooling so any square input size works."""

from __future__ import annotations

import torch
from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.models.registry import register_model, scale_width

__all__ = ["BasicBlock", "CifarResNet", "WideBasicBlock", "WideResNet"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan-out, as torchvision), unit BN, zero Linear bias."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, then ReLU.

    The shortcut is a 1x1 conv + BN (option B) where the shape changes, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``blocks_per_stage`` BasicBlocks (16/32/64 channels times
    ``width``, strides 1/2/2), global average pooling and a Linear classifier."""

    def __init__(
        self, blocks_per_stage: int, in_channels: int, num_classes: int, width: float = 1.0
    ) -> None:
        super().__init__()
        widths = [scale_width(c, width) for c in (16, 32, 64)]
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, channels = [], widths[0]
        for stage, out_channels in enumerate(widths):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-dropout-conv plus a shortcut.

    Where the shape changes the shortcut is a 1x1 conv on the pre-activated input, as in the
    reference WRN; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem of 16 channels, three stages of (depth - 4) / 6 pre-activation blocks
    (16k/32k/64k channels, all times ``width``), final BN-ReLU, global average pooling, Linear."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(
                f"wrn depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 40), got {depth!r}"
            )
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ConfigError(f"wrn widen_factor must be a positive integer, got {widen_factor!r}")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout < 1
        ):
            raise ConfigError(f"wrn dropout must be in [0, 1), got {dropout!r}")
        blocks_per_stage = (depth - 4) // 6
        stem = scale_width(16, width)
        widths = [scale_width(c * widen_factor, width) for c in (16, 32, 64)]
        self.conv1 = _conv3x3(in_channels, stem)
        stages, channels = [], stem
        for stage, out_channels in enumerate(widths):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(WideBasicBlock(channels, out_channels, stride, dropout))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


def _register_resnet(name: str, depth: int) -> None:
    blocks_per_stage = (depth - 2) // 6

    @register_model(name)
    def build(*, in_channels: int, num_classes: int, image_size: int, width: float) -> CifarResNet:
        del image_size  # global average pooling accepts any input size
        return CifarResNet(blocks_per_stage, in_channels, num_classes, width)

    build.__doc__ = f"ResNet-{depth} for CIFAR-sized images ({blocks_per_stage} blocks per stage)."


for _depth in (20, 32, 56):
    _register_resnet(f"resnet{_depth}", _depth)


@register_model("wrn")
def wrn(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: float,
    depth: int = 28,
    widen_factor: int = 2,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-``depth``-``widen_factor``; WRN-28-2 by default."""
    del image_size  # global average pooling accepts any input size
    return WideResNet(depth, widen_factor, in_channels, num_classes, width, dropout)


@register_model("wrn28_2")
def wrn28_2(
    *, in_channels: int, num_classes: int, image_size: int, width: float, dropout: float = 0.0
) -> WideResNet:
    """WRN-28-2, the DSR paper's CIFAR-10 model."""
    del image_size  # global average pooling accepts any input size
    return WideResNet(28, 2, in_channels, num_classes, width, dropout)
