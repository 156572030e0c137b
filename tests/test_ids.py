"""A delivery id as a person types it: in full, or its first characters, as git takes a
commit's; what range of ids each prefix stands for."""

from __future__ import annotations

import re
import uuid

import pytest

from ops.actions.filters import MIN_PREFIX, IdPrefix

pytestmark = pytest.mark.unit

ID = uuid.UUID("3f2a9c1e-7b4d-4c1a-9e2f-0123456789ab")


@pytest.mark.parametrize("typed", [str(ID), str(ID).upper(), ID.hex, f"{{{ID}}}", f"urn:uuid:{ID}"])
def test_a_whole_id_is_itself_in_any_of_its_spellings(typed: str) -> None:
    assert IdPrefix.parse(typed).full == ID


@pytest.mark.parametrize(
    ("typed", "low", "high"),
    [
        (
            "3f2a9c1e",
            "3f2a9c1e-0000-0000-0000-000000000000",
            "3f2a9c1e-ffff-ffff-ffff-ffffffffffff",
        ),
        (
            "3F2A9C1E-7B",
            "3f2a9c1e-7b00-0000-0000-000000000000",
            "3f2a9c1e-7bff-ffff-ffff-ffffffffffff",
        ),
        (
            "3f2a9c1e7b4d4",
            "3f2a9c1e-7b4d-4000-0000-000000000000",
            "3f2a9c1e-7b4d-4fff-ffff-ffffffffffff",
        ),
        (
            str(ID)[:-1],
            "3f2a9c1e-7b4d-4c1a-9e2f-0123456789a0",
            "3f2a9c1e-7b4d-4c1a-9e2f-0123456789af",
        ),
    ],
)
def test_a_prefix_stands_for_the_range_of_ids_it_starts(typed: str, low: str, high: str) -> None:
    prefix = IdPrefix.parse(typed)
    assert (prefix.low, prefix.high) == (uuid.UUID(low), uuid.UUID(high))
    assert prefix.full is None
    assert prefix.low <= ID <= prefix.high


@pytest.mark.parametrize(
    ("typed", "said"),
    [
        ("3f2a9c1", f"give at least {MIN_PREFIX} characters of a delivery id, got 7"),
        ("", f"give at least {MIN_PREFIX} characters of a delivery id, got 0"),
        ("not-a-uuid", "must be a delivery id (a UUID) or its first 8 or more characters"),
        ("3f2a-9c1e7b", "must be a delivery id (a UUID) or its first 8 or more characters"),
        ("3f2a9c1e--7b", "must be a delivery id (a UUID) or its first 8 or more characters"),
        (str(ID) + "0", "must be a delivery id (a UUID) or its first 8 or more characters"),
        ("3f2a9c1e 7b", "must be a delivery id (a UUID) or its first 8 or more characters"),
    ],
)
def test_anything_else_is_refused_saying_what_an_id_looks_like(typed: str, said: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(said)}$"):
        IdPrefix.parse(typed)
