"""Values against type hints: conversions people expect, refusals naming what is expected."""

from collections.abc import Sequence

import numpy as np
import pytest

from sparsetrain.errors import ConfigError
from sparsetrain.typecheck import conform, describe


@pytest.mark.parametrize(
    ("value", "hint", "expected"),
    [
        (1, float, 1.0),
        (np.float32(0.5), float, 0.5),
        (4.0, int, 4),
        (np.int64(3), int, 3),
        ([2, 4], tuple[int, int], (2, 4)),
        ([0, 0.5], Sequence[float], [0.0, 0.5]),
        ((1, 2), Sequence[int], (1, 2)),
        ("2:4", tuple[int, int] | str | None, "2:4"),
        (None, int | None, None),
        ([0.5, 0.9], float | list[float], [0.5, 0.9]),
    ],
)
def test_values_that_fit_are_converted(value, hint, expected):
    result = conform(value, hint, "x")
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "hint", "message"),
    [
        ("abc", int, "x must be an integer, got 'abc'"),
        (True, int, "x must be an integer, got True"),
        (2.5, int | None, "x must be an integer or None, got 2.5"),
        (float("nan"), float, "x must be a finite number, got nan"),
        (1, bool, "x must be a boolean, got 1"),
        ("ab", Sequence[str], "x must be a list of strings, got 'ab'"),
        ([1], tuple[int, int], "x must be a list of 2 integers, got \\[1\\]"),
        ([[1, "a"]], Sequence[Sequence[int]], "a list of lists of integers"),
        (3, str | None, "x must be a string or None, got 3"),
    ],
)
def test_values_that_do_not_fit_name_what_is_expected(value, hint, message):
    with pytest.raises(ConfigError, match=message):
        conform(value, hint, "x")


def test_none_is_written_the_way_the_caller_reads_it():
    assert describe(int | None, none="null") == "an integer or null"
    with pytest.raises(ConfigError, match="must be a string or null"):
        conform(1, str | None, "key", none="null")
