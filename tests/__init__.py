"""The test suite. Its shared helpers (tests/support/) hold assertions, which pytest
rewrites to show the values compared, as it does in test modules and conftest.py."""

import pytest

pytest.register_assert_rewrite("tests.support")
