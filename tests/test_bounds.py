"""bounds.py in-process (fast: part of packaging/mutation-test): the README's "Limits on what
comes from outside", value by value. A refused value is a ValueError whose message names the
value's field; the callers turn it into bad_param / bad_request."""

import pytest

from backend_mgmt import bounds

YEAR = 31536000                                  # the README's "365 days"


@pytest.mark.parametrize("value, expected", [
    (0, True), (-3, True), (1.5, True), (float("nan"), True),
    (True, False), (False, False), ("1", False), (None, False), ([1], False)])
def test_a_number_is_an_int_or_a_float_never_a_bool(value, expected):
    assert bounds.is_number(value) is expected


@pytest.mark.parametrize("value", [0, 0.0, 1, 2.5, YEAR, float(YEAR)])
def test_seconds_from_0_to_a_year_are_accepted_as_float(value):
    result = bounds.seconds(value, "params.x")
    assert result == value and type(result) is float


@pytest.mark.parametrize("value, message", [
    (-0.5, "params.x must be a number of seconds from 0 to 31536000, not -0.5"),
    (YEAR + 1, "params.x must be a number of seconds from 0 to 31536000, not 31536001"),
    (1e300, "params.x must be a number of seconds from 0 to 31536000, not 1e+300"),
    (float("nan"), "params.x must be a number of seconds, not nan"),
    (float("inf"), "params.x must be a number of seconds, not inf"),
    (float("-inf"), "params.x must be a number of seconds, not -inf"),
    (True, "params.x must be a number of seconds, not bool True"),
    ("5", "params.x must be a number of seconds, not str '5'"),
    (None, "params.x must be a number of seconds, not NoneType None"),
])
def test_seconds_out_of_range_or_not_numbers_are_refused_by_name(value, message):
    with pytest.raises(ValueError) as caught:
        bounds.seconds(value, "params.x")
    assert str(caught.value) == message


def test_a_long_refused_value_is_shown_cut_to_40_characters():
    with pytest.raises(ValueError) as caught:
        bounds.seconds("y" * 100, "x")
    assert str(caught.value) == "x must be a number of seconds, not str '" + "y" * 36 + "..."
    with pytest.raises(ValueError) as caught:          # 41 characters: cut
        bounds.seconds("y" * 39, "x")
    assert str(caught.value) == "x must be a number of seconds, not str '" + "y" * 36 + "..."
    with pytest.raises(ValueError) as caught:          # 40 characters: shown whole
        bounds.seconds("y" * 38, "x")
    assert str(caught.value) == "x must be a number of seconds, not str '" + "y" * 38 + "'"


@pytest.mark.parametrize("value", [-1, -0.5, 0, YEAR])
def test_forever_allows_down_to_minus_one(value):
    assert bounds.seconds(value, "params.keep_alive", forever=True) == value


@pytest.mark.parametrize("value, shown", [(-1.5, "-1.5"), (YEAR + 1, "31536001")])
def test_forever_still_has_a_range(value, shown):
    with pytest.raises(ValueError) as caught:
        bounds.seconds(value, "params.keep_alive", forever=True)
    assert str(caught.value) == ("params.keep_alive must be a number of seconds (-1: forever) "
                                 f"from -1 to 31536000, not {shown}")
    with pytest.raises(ValueError) as caught:
        bounds.seconds(True, "params.keep_alive", forever=True)
    assert str(caught.value) == \
        "params.keep_alive must be a number of seconds (-1: forever), not bool True"


def test_a_minimum_and_a_maximum_of_the_callers_own():
    assert bounds.seconds(0.01, "interval", minimum=bounds.MIN_INTERVAL) == 0.01
    with pytest.raises(ValueError) as caught:
        bounds.seconds(0.005, "interval", minimum=bounds.MIN_INTERVAL, maximum=60)
    assert str(caught.value) == \
        "interval must be a number of seconds from 0.01 to 60, not 0.005"
    assert bounds.seconds(60, "interval", maximum=60) == 60.0
    with pytest.raises(ValueError):
        bounds.seconds(60.5, "interval", maximum=60)


@pytest.mark.parametrize("value", [
    None, "", "c", "x" * 256, 0, -7, 1.5, 2 ** 63 - 1, -(2 ** 63 - 1), 1e300])
def test_correlation_ids_that_are_echoed_as_they_came(value):
    assert bounds.correlation_id(value) is value


@pytest.mark.parametrize("value, message", [
    ("x" * 257, "correlation_id must be at most 256 characters, not 257"),
    (float("nan"), "correlation_id must be a finite number, not nan"),
    (float("inf"), "correlation_id must be a finite number, not inf"),
    (2 ** 63, "correlation_id is too large a number (at most 2^63 - 1)"),
    (-(2 ** 63), "correlation_id is too large a number (at most 2^63 - 1)"),
    (True, "correlation_id must be a string or a number, not bool"),
    ([1], "correlation_id must be a string or a number, not list"),
    ({"a": 1}, "correlation_id must be a string or a number, not dict"),
])
def test_correlation_ids_that_cannot_be_echoed(value, message):
    with pytest.raises(ValueError) as caught:
        bounds.correlation_id(value)
    assert str(caught.value) == message


def test_the_limits_are_the_readmes():
    assert bounds.MAX_SECONDS == YEAR
    assert bounds.MIN_INTERVAL == 0.01
    assert bounds.MAX_NAME_LENGTH == 1024
    assert bounds.MAX_CORRELATION_ID_LENGTH == 256
    assert bounds.MAX_CORRELATION_INT == 2 ** 63
