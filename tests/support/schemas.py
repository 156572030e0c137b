"""The schema.sql of each earlier released version, kept verbatim in tests/schemas/ as
`git show COMMIT:schema.sql` printed it: what databases of those versions are made from, for
`postback db init` to upgrade. v1 6fe753c, v2 4789b67, v3 d06c5a1, v4 9c411a8, v5 bad8964,
v6 fb6a485, v7 87f3058, v8 254ebeb, v9 73fa7bb, v10 83f10d5, v11 90d0f1f, v12 618fdc8,
v13 944e723 (the last of each version; the commits between changed comments)."""

from __future__ import annotations

from pathlib import Path

from worker.schema import CURRENT

SCHEMAS = Path(__file__).parent.parent / "schemas"
RELEASED = range(1, CURRENT)
"""The versions before the current one."""
TABLES = {
    "schema_version",
    "callbacks",
    "deliveries",
    "attempts",
    "actions",
    "test_fires",
    "callback_health",
    "notifications",
}
"""The current schema's tables."""


def released(version: int) -> str:
    """The whole schema.sql of `version`."""
    return (SCHEMAS / f"v{version}.sql").read_text(encoding="utf-8")
