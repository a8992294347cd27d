"""Tiny seeded models and data shared by the tests."""

import pytest
import torch
from torch import nn

# Tiny models run fastest on one thread; two threads on a loaded 2-core machine are 10-100x slower.
torch.set_num_threads(1)


class TinyCNN(nn.Module):
    """Conv + BN + Linear: the layer kinds every method must handle, small enough for fast tests."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(256, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4)
    )


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of 16x16 single-channel batches with learnable labels."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(10):
        x = torch.randn(16, 1, 16, 16, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :8].mean(dim=(1, 2)) > 0).long()
        out.append((x, y))
    return out
