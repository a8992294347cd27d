"""Schedules are pure, frozen functions of the step."""

import dataclasses
import math

import pytest

from sparsetrain.errors import ConfigError
from sparsetrain.schedules import Constant, Cosine, Cubic, Every


def test_constant():
    assert [Constant(0.3)(t) for t in (0, 1, 10**6)] == [0.3, 0.3, 0.3]


def test_cosine_matches_rigl_formula_and_ends_at_zero():
    f = Cosine(0.3, end=100)
    for t in (0, 1, 25, 50, 99, 100):
        assert f(t) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 100)))
    assert f(0) == pytest.approx(0.3)
    assert f(50) == pytest.approx(0.15)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(150) == pytest.approx(0.0, abs=1e-12)
    values = [f(t) for t in range(0, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_cosine_with_start_holds_then_decays():
    f = Cosine(0.5, end=30, start=10)
    assert f(0) == f(10) == pytest.approx(0.5)
    assert f(20) == pytest.approx(0.25)


def test_cubic_matches_zhu_gupta_formula():
    s = Cubic(initial=0.1, final=0.9, start=20, end=120)
    for t in (20, 30, 70, 119):
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 20) / 100) ** 3
        assert s(t) == pytest.approx(expected)
    assert s(0) == pytest.approx(0.1)
    assert s(120) == 0.9 and s(10**6) == 0.9
    values = [s(t) for t in range(0, 140)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def test_every_predicate():
    e = Every(10, start=5, stop=35)
    assert [t for t in range(0, 60) if e(t)] == [5, 15, 25, 35]
    assert [t for t in range(1, 31) if Every(10)(t)] == [10, 20, 30]
    assert Every(3, stop=None)(3 * 10**6)


def test_schedules_are_frozen_and_hashable():
    s = Cosine(0.3, end=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.value = 0.1
    assert hash(Every(2)) == hash(Every(2)) and Every(2) == Every(2)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Every(0),
        lambda: Every(2.5),
        lambda: Every(5, start=10, stop=5),
        lambda: Every(5, start=-1),
        lambda: Cosine(0.3, end=0),
        lambda: Cubic(0.0, 0.9, start=10, end=10),
        lambda: Cubic(0.0, 0.9, start=-2, end=10),
    ],
)
def test_invalid_schedules_raise(build):
    with pytest.raises(ConfigError):
        build()
