"""Per-layer sparsity distributions keep the budget and never exceed density 1."""

import math

import pytest
import torch

from sparsetrain import distributions, mask_ops

SHAPES = {
    "conv1": torch.Size([16, 3, 3, 3]),
    "conv2": torch.Size([32, 16, 3, 3]),
    "fc1": torch.Size([256, 512]),
    "fc2": torch.Size([10, 256]),
}


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_erk_keeps_budget_within_rounding(sparsity, power):
    targets = distributions.erk(SHAPES, sparsity, power)
    total = sum(math.prod(s) for s in SHAPES.values())
    kept = sum(mask_ops.n_keep(math.prod(SHAPES[n]), s) for n, s in targets.items())
    assert abs(kept - (1 - sparsity) * total) <= len(SHAPES)
    assert all(0.0 <= s < 1.0 or s == 0.0 for s in targets.values())


def test_erk_makes_small_layers_dense_and_redistributes():
    targets = distributions.erk(SHAPES, 0.8)
    assert targets["conv1"] == targets["fc2"] == 0.0  # small layers overflow density 1: dense
    assert targets["fc1"] > targets["conv2"] > 0.0  # the larger layer is sparser
    raw = {n: sum(s) / math.prod(s) for n, s in SHAPES.items()}
    # the layers left sparse keep the ERK proportion density ~ raw score
    ratio = (1 - targets["fc1"]) / (1 - targets["conv2"])
    assert ratio == pytest.approx(raw["fc1"] / raw["conv2"])


def test_erk_power_zero_is_uniform():
    targets = distributions.erk(SHAPES, 0.8, power=0.0)
    assert all(s == pytest.approx(0.8) for s in targets.values())


def test_global_magnitude_follows_weights():
    weights = {"a": torch.arange(10.0), "b": torch.arange(10.0) + 100}
    targets = distributions.global_magnitude(weights, 0.5)
    assert targets == {"a": 1.0, "b": 0.0}


def test_unknown_distribution():
    with pytest.raises(ValueError, match="unknown distribution 'normal'"):
        distributions.resolve("normal", {"a": torch.zeros(2, 2)}, 0.5)
