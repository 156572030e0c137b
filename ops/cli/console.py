"""How the CLI shows things to a person: tables, one delivery in full, a progress bar.

Plain functions from data to text, so the commands stay short and the layout is tested
without a database. Scripts use `--json` instead and never parse these.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

from worker import logs
from worker.config import Settings

EXCERPT = 200
"""Characters of a response body shown per attempt; `--json` has all that was kept."""


def printable(text: str) -> str:
    """`text` without control characters (but newlines): a receiver's answer must not be
    able to move the cursor or retitle the terminal of whoever reads it."""
    return "".join(
        "\ufffd" if unicodedata.category(ch) == "Cc" and ch != "\n" else ch for ch in text
    )


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, but the last: it is the long one (a URL, a
    reason), and padding it would only push the table apart."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for *cells, last in rows:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        lines.append("  ".join([*padded, last]).rstrip())
    return printable("\n".join(lines))


def _time(value: str | None) -> str:
    """ISO 8601 as `2026-11-21 09:00:00` (UTC, as stored): enough to read in a table."""
    return "-" if value is None else value[:19].replace("T", " ")


def _last(item: dict[str, Any]) -> str:
    if item["last_status"] is not None:
        return str(item["last_status"])
    return item["error_class"] or "-"


def why(item: dict[str, Any]) -> str:
    """Why a delivery is as it is: its reason, what an open one waits for, or that it went
    without its order's create."""
    if item["reason"]:
        return str(item["reason"])
    if item["blocked_by"] is not None:
        return f"waiting for delivery {item['blocked_by']}, earlier in its order"
    if item["create_wait_until"] is not None:
        return (
            "waiting for its order.created, not received yet; "
            f"goes without it at {_time(item['create_wait_until'])} UTC"
        )
    return str(item["order_note"] or "")


def deliveries_table(items: Sequence[dict[str, Any]]) -> str:
    rows = [
        ("ID", "TAKEN (UTC)", "AFFILIATE", "EVENT", "ORDER", "STATE", "TRIES", "LAST", "REASON")
    ]
    rows += [
        (
            item["id"],
            _time(item["created_at"]),
            item["affiliate_id"],
            item["event_type"],
            item["order_number"],
            item["state"],
            str(item["attempts"]),
            _last(item),
            why(item),
        )
        for item in items
    ]
    return table(rows)


def delivery_text(d: dict[str, Any]) -> str:
    """One delivery as `show` prints it: what, to whom, what happened, what ops did."""
    lines = [
        f"delivery   {d['id']}",
        f"event      {d['event_id']} ({d['event_type']}), affiliate {d['affiliate_id']}, "
        f"order {d['order_number']}",
        f"state      {d['state']}" + (f": {why(d)}" if why(d) else ""),
        f"taken      {_time(d['created_at'])} UTC; order event at {_time(d['occurred_at'])}",
    ]
    if d["order_note"] is not None and why(d) != d["order_note"]:
        lines.append(f"order      {d['order_note']}")
    if d["next_attempt_at"] is not None:
        lines.append(f"next try   {_time(d['next_attempt_at'])} UTC")
    if d["request"] is not None:
        lines.append(f"request    {d['request']['method']} {d['request']['url']}")
    lines.append(f"attempts   {len(d['attempts'])}")
    for attempt in d["attempts"]:
        got = (
            f"HTTP {attempt['status_code']}"
            if attempt["status_code"] is not None
            else f"{attempt['error_class']}: {attempt['error']}"
        )
        lines.append(
            f"  #{attempt['number']}  {_time(attempt['started_at'])}  "
            f"{attempt['duration_ms']:.0f} ms  {got}"
        )
        body = " ".join((attempt["response_excerpt"] or "").split())
        if body:
            lines.append(f"      {body[:EXCERPT]}{'…' * (len(body) > EXCERPT)}")
    for action in d["actions"]:
        what = action["action"] + (f" ({action['mode']})" if action["mode"] else "")
        note = f": {action['note']}" if action["note"] else ""
        lines.append(
            f"{what:<10} by {action['actor']} at {_time(action['at'])} UTC, "
            f"attempt {action['attempt']}{note}"
        )
    return printable("\n".join(lines))


def quiet_logs(settings: Settings) -> None:
    """Info log lines off, unless POSTBACK_LOG_LEVEL asks for them: for commands that tell
    a person what they do, whose log lines would only repeat it."""
    if "log_level" not in settings.model_fields_set:
        logs.configure("warning")


class ProgressBar:
    """`progress(done, total)` drawn on stderr: a bar redrawn in place on a terminal, a line
    every tenth of the way otherwise (a log file should not fill with carriage returns)."""

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._shown = -1

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            filled = self.WIDTH * done // max(total, 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            end = "\n" if done == total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total}{end}")
        else:
            tenth = 10 * done // max(total, 1)
            if tenth == self._shown:
                return
            self._shown = tenth
            self.stream.write(f"{self.label}: {done}/{total}\n")
        self.stream.flush()
