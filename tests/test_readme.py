"""The README's configuration table is the documentation of `Settings`: keep them equal."""

from __future__ import annotations

import re
from pathlib import Path

from worker.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    documented = set(re.findall(r"^\| `(POSTBACK_[A-Z_]+)` \|", README.read_text(), re.M))
    actual = {f"POSTBACK_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_documented_defaults_match_the_code() -> None:
    rows = re.findall(r"^\| `POSTBACK_([A-Z_]+)` \| (.+?) \|", README.read_text(), re.M)
    assert rows
    for name, shown in rows:
        assert shown == _as_documented(Settings.model_fields[name.lower()].default), name


def _as_documented(value: object) -> str:
    if value is None:
        return "unset"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"
