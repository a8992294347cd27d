"""Thin dense widths: parameter count of the narrowed dense model vs the sparse model's."""

import logging
from pathlib import Path

import pytest
import yaml

from sparsetrain.errors import ConfigError
from sparsetrain.models.thin import parameter_count, sparse_active_count, thin_width_for


def test_sparse_active_count_of_lenet_300_100():
    # 784x300, 300x100, 100x10 weights at 90% keep 23520 + 3000 + 100; the 410 biases stay.
    assert sparse_active_count("mlp", 0.9) == 23520 + 3000 + 100 + 410
    assert sparse_active_count("mlp", 0.9, dense_last=True) == 23520 + 3000 + 1000 + 410


@pytest.mark.parametrize(("name", "sparsity"), [("small_cnn", 0.9), ("mlp", 0.8), ("lenet5", 0.5)])
def test_thin_width_matches_the_sparse_count(name, sparsity, caplog):
    target = sparse_active_count(name, sparsity)
    with caplog.at_level(logging.INFO, logger="sparsetrain.models.thin"):
        width = thin_width_for(name, sparsity)
    assert 0 < width < 1
    count = parameter_count(name, width=width)
    # No other width gets closer: the neighbouring steps of the count are at least as far.
    for other in (width * 0.97, width * 1.03):
        assert abs(count - target) <= abs(parameter_count(name, width=other) - target)
    assert abs(count - target) / target < 0.05
    assert f"width {width:g}" in caplog.text


def test_thin_width_of_a_dense_model_is_the_full_width():
    assert thin_width_for("small_cnn", 0.0) == 1.0


def test_thin_width_too_sparse_is_an_error():
    with pytest.raises(ConfigError, match="lower sparsity"):
        thin_width_for("mlp", 0.9999)


def test_thin_dense_config_matches_the_dsr_config():
    root = Path(__file__).resolve().parents[1] / "configs"
    dsr = yaml.safe_load((root / "dsr.yaml").read_text())
    thin = yaml.safe_load((root / "thin_dense.yaml").read_text())
    assert thin["model"]["name"] == dsr["model"]["name"]
    assert thin["sparsity"]["method"] == "dense"
    sparse = dsr["sparsity"]
    width = thin_width_for(
        dsr["model"]["name"],
        sparse["sparsity"],
        exclude=sparse["dense"],
        in_channels=1,  # Fashion-MNIST
        num_classes=10,
        image_size=28,
    )
    assert thin["model"]["width"] == width
