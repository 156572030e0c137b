"""The one JSON reader of every edge, on its own: no servers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from producer.json_input import BadJson, NotJson, read_json

pytestmark = pytest.mark.unit


def test_numbers_stay_exact() -> None:
    read = read_json(b'{"amount": 10.50, "n": 2, "big": 1e999999999999}')
    assert {key: (type(value), str(value)) for key, value in read.items()} == {
        "amount": (Decimal, "10.50"),
        "n": (int, "2"),
        "big": (Decimal, "1E+999999999999"),
    }


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"amount": "10.50", "amount": "99999.00"}', '"amount"'),
        ('{"order": {"amount": "10.50", "amount": "99999.00"}}', '"amount"'),
        ('[1, {"a": 1, "b": 2, "a": 1}]', '"a"'),
        ('{"x": 1, "x": 2, "x": 3}', '"x"'),
        # The same value twice is refused too: a sender who wrote the key twice meant
        # something, and the reader cannot know what.
        ('{"id": "e1", "id": "e1"}', '"id"'),
        # Quoted as ASCII JSON: a line break stays on one line, and a lone surrogate or
        # any other character prints on any terminal.
        ('{"a\\nb": 1, "a\\nb": 2}', '"a\\nb"'),
        ('{"\\ud800": 1, "\\ud800": 2}', '"\\ud800"'),
        ('{"montant €": 1, "montant €": 2}', '"montant \\u20ac"'),
    ],
)
def test_a_key_given_twice_in_one_object_is_refused_naming_it(text: str, key: str) -> None:
    with pytest.raises(BadJson) as caught:
        read_json(text)
    assert str(caught.value) == f"duplicate key {key}"
    assert not isinstance(caught.value, NotJson)


def test_the_same_key_in_different_objects_is_fine() -> None:
    assert read_json('[{"a": 1}, {"a": 2, "b": {"a": 3}}]') == [{"a": 1}, {"a": 2, "b": {"a": 3}}]


def test_a_long_duplicate_key_is_quoted_only_in_part() -> None:
    key = "k" * 10_000
    with pytest.raises(BadJson) as caught:
        read_json(f'{{"{key}": 1, "{key}": 2}}')
    assert len(str(caught.value)) < 100


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0e1000000000000000000", "the number 0e1000000000000000000 is out of range"),
        ('{"a": [1E-10000000000000000000]}', "the number 1E-10000000000000000000 is out of range"),
        ("9" * 5000, "the number " + "9" * 40 + "… is out of range"),
    ],
    ids=["exponent", "negative-exponent", "digits"],
)
def test_a_number_no_decimal_holds_is_refused_not_crashed_on(text: str, message: str) -> None:
    with pytest.raises(BadJson) as caught:
        read_json(text)
    assert str(caught.value) == message
    assert not isinstance(caught.value, NotJson)


def test_nesting_too_deep_to_follow_is_refused() -> None:
    with pytest.raises(BadJson, match=r"^nested too deeply$") as caught:
        read_json("[" * 100_000 + "]" * 100_000)
    assert not isinstance(caught.value, NotJson)


@pytest.mark.parametrize(
    "text", [b"{nope", b"", b"\xff\xfe\x00", b'{"a": 1} {"a": 2}', b"NaN x"], ids=repr
)
def test_text_that_is_not_json_is_not_json(text: bytes) -> None:
    with pytest.raises(NotJson, match=r"^not valid JSON \(.+\)$") as caught:
        read_json(text)
    assert "\n" not in str(caught.value)
