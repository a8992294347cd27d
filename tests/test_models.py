"""Tests for the model registry and the built-in models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.models import build_model, list_models, register_model, registry
from sparsetrain.tasks import CLASSIFICATION, LANGUAGE_MODEL

INPUTS = [(1, 28), (3, 32)]  # (in_channels, image_size): Fashion-MNIST, CIFAR
IMAGE_MODELS = list_models(CLASSIFICATION)  # the language model has tests of its own


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_builtin_models_are_registered() -> None:
    expected = {"mlp", "mlp_4096", "lenet5", "small_cnn", "resnet20", "resnet32", "resnet56"}
    assert expected | {"wrn", "wrn28_2"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
def test_forward_shape(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=7, image_size=image_size)
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_half_width_has_fewer_parameters(name: str) -> None:
    in_channels = 3 if name in IMAGE_MODELS else 1
    full = n_params(build_model(name, in_channels=in_channels, image_size=32))
    half = n_params(build_model(name, in_channels=in_channels, image_size=32, width=0.5))
    assert half < full


@pytest.mark.parametrize(
    ("name", "hidden_weight", "shape"),
    [
        ("mlp", "fc2.weight", (100, 300)),
        ("mlp_4096", "fc2.weight", (4096, 4096)),
        ("lenet5", "fc2.weight", (84, 120)),
        ("small_cnn", "features.4.weight", (64, 32, 3, 3)),
        ("resnet20", "layer3.2.conv2.weight", (64, 64, 3, 3)),
        ("wrn28_2", "layer3.3.conv2.weight", (128, 128, 3, 3)),
    ],
)
def test_width_scales_hidden_layers_quadratically(
    name: str, hidden_weight: str, shape: tuple[int, ...]
) -> None:
    full = build_model(name).state_dict()[hidden_weight]
    half = build_model(name, width=0.5).state_dict()[hidden_weight]
    assert tuple(full.shape) == shape
    assert half.numel() * 4 == full.numel()


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "wrn28_2"])
def test_width_scales_total_parameters_roughly_quadratically(name: str) -> None:
    full = n_params(build_model(name, in_channels=3, image_size=32))
    half = n_params(build_model(name, in_channels=3, image_size=32, width=0.5))
    assert 0.2 < half / full < 0.3


def test_width_rounds_and_never_reaches_zero() -> None:
    model = build_model("mlp", width=0.001)
    assert model.fc1.out_features == 1 and model.fc2.out_features == 1
    assert build_model("mlp", width=0.125).fc2.out_features == 13  # 12.5 rounds half up
    assert build_model("resnet20", width=1.5).conv1.out_channels == 24


def test_width_one_matches_the_published_sizes() -> None:
    assert n_params(build_model("mlp")) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert n_params(build_model("lenet5")) == 61706  # classic LeNet-5 on padded 28x28 input
    assert n_params(build_model("wrn28_2", in_channels=3, image_size=32)) == 1467610
    assert 0.27e6 < n_params(build_model("resnet20", in_channels=3, image_size=32)) < 0.28e6


def test_mlp_hidden_option() -> None:
    model = build_model("mlp", hidden=[64, 32, 16], num_classes=3)
    assert [model.fc1.out_features, model.fc2.out_features, model.fc3.out_features] == [64, 32, 16]
    assert model.fc4.out_features == 3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert n_params(build_model("mlp", hidden=[])) == 784 * 10 + 10


@pytest.mark.parametrize("hidden", [[0], [3, -1], "300", [1.5], [True]])
def test_mlp_rejects_bad_hidden(hidden: object) -> None:
    with pytest.raises(ConfigError, match="hidden"):
        build_model("mlp", hidden=hidden)


def test_wrn_options() -> None:
    model = build_model("wrn", depth=16, widen_factor=1, dropout=0.3, in_channels=3)
    assert len(model.layer1) == 2 and model.fc.in_features == 64
    assert model.layer1[0].dropout.p == 0.3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"depth": 27}, "depth"),
        ({"widen_factor": 0}, "widen_factor"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_wrn_rejects_bad_options(kwargs: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        build_model("wrn", **kwargs)


def test_unknown_model_names_it_and_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("wrn28-2")
    message = str(info.value)
    assert "'wrn28-2'" in message and "did you mean 'wrn28_2'" in message
    assert all(name in message for name in list_models())


def test_unexpected_option_names_it_and_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("mlp", hiden=[10])
    assert "hiden" in str(info.value) and "hidden" in str(info.value)
    with pytest.raises(ConfigError, match="depth"):
        build_model("resnet20", depth=32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"width": -1.0},
        {"width": float("inf")},
        {"in_channels": 0},
        {"num_classes": 0},
        {"image_size": 0},
        {"num_classes": 2.5},
    ],
)
def test_bad_common_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        build_model("mlp", **kwargs)


def test_too_small_images_are_rejected() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        build_model("lenet5", image_size=11)
    assert build_model("lenet5", image_size=12)(torch.randn(2, 1, 12, 12)).shape == (2, 10)


@pytest.mark.parametrize("name", list_models())
def test_state_dict_keys_and_init_are_deterministic(name: str) -> None:
    torch.manual_seed(1)
    first = build_model(name, width=0.25).state_dict()
    torch.manual_seed(1)
    second = build_model(name, width=0.25).state_dict()
    assert list(first) == list(second)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_readable_state_dict_names() -> None:
    assert {"fc1.weight", "fc2.weight", "fc3.weight"} <= set(build_model("mlp").state_dict())
    assert "features.0.weight" in build_model("small_cnn").state_dict()
    resnet = build_model("resnet20").state_dict()
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight"} <= set(resnet)
    assert "layer1.0.shortcut.0.weight" not in resnet  # identity where the shape is unchanged
    assert "layer1.0.shortcut.weight" in build_model("wrn28_2").state_dict()  # 16 -> 32 channels


def test_first_and_last_parameters_are_stem_and_classifier() -> None:
    """Module order matters: 'keep first/last layer dense' picks them by registration order."""
    for name in IMAGE_MODELS:
        weights = [k for k, p in build_model(name).named_parameters() if p.dim() >= 2]
        assert weights[-1].startswith("fc"), name
        assert weights[0] in {"fc1.weight", "features.0.weight", "conv1.weight"}, name


def test_small_cnn_has_batchnorm() -> None:
    model = build_model("small_cnn")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2


def test_register_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))

    @register_model("tiny")
    def tiny(
        *, in_channels: int, num_classes: int, image_size: int, width: float, bias: bool = True
    ):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes, bias)
        )

    assert "tiny" in list_models()
    assert build_model("tiny", image_size=4, bias=False)[1].bias is None
    with pytest.raises(ConfigError, match="already registered"):
        register_model("tiny")(tiny)
    with pytest.raises(TypeError, match="width"):
        register_model("broken")(lambda *, in_channels, num_classes, image_size: nn.Identity())


def test_models_are_registered_for_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    register_model("tiny_lm", task=LANGUAGE_MODEL)(lambda **kwargs: nn.Identity())
    assert "tiny_lm" in list_models(LANGUAGE_MODEL) and "tiny_lm" not in IMAGE_MODELS
    assert registry.model_task("tiny_lm") == LANGUAGE_MODEL
    assert registry.model_task("resnet20") == CLASSIFICATION
    with pytest.raises(ConfigError, match="unknown task 'regression'"):
        register_model("tiny_reg", task="regression")
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        registry.model_task("nope")
