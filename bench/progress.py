"""Progress lines on stderr, so a person watching a run that takes minutes knows it is alive.

stdout carries only the header and the final table, so the table can be piped or saved
without the chatter.
"""

from __future__ import annotations

import sys
import time

_STARTED = time.monotonic()


def say(message: str) -> None:
    """One line on stderr, prefixed with the seconds since the bench started."""
    print(f"[bench {time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)
