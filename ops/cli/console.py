"""How the CLI shows things to a person: tables, one delivery in full, a progress bar.

Plain functions from data to text, so the commands stay short and the layout is tested
without a database. Scripts use `--json` instead and never parse these.
"""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ops.actions.lookup import Settled
from ops.actions.replay import REPLAYABLE
from worker import duration, logs
from worker.config import Settings
from worker.prune import Pruned, Retention

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


def _delayed(item: dict[str, Any]) -> bool:
    """Pending with a reason: not tried yet, put off until `next_attempt_at` (its callback's
    delay), which the reason says."""
    return item["state"] == "pending" and bool(item["reason"]) and bool(item["next_attempt_at"])


def why(item: dict[str, Any]) -> str:
    """Why a delivery is as it is: its reason (with when it is due, for one its callback
    delays), what an open one waits for, or that it went without its order's create."""
    if _delayed(item):
        return f"due {_time(item['next_attempt_at'])} UTC ({item['reason']})"
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


def callback_used(item: dict[str, Any]) -> str:
    """Which callback a delivery went to, in a word: the affiliate's `own`, the `store-wide`
    one, one `removed` since, or none (`-`)."""
    if item["callback_id"] is None:
        return "-"
    if item["callback_store_wide"] is None:
        return "removed"
    return "store-wide" if item["callback_store_wide"] else "own"


def _callback_line(d: dict[str, Any]) -> str:
    if d["callback_id"] is None:
        return "none"
    word = callback_used(d)
    return f"#{d['callback_id']} ({'removed since' if word == 'removed' else word})"


def deliveries_table(items: Sequence[dict[str, Any]]) -> str:
    rows = [
        (
            "ID",
            "ARRIVED (UTC)",
            "AFFILIATE",
            "EVENT",
            "ORDER",
            "STATE",
            "TRIES",
            "LAST",
            "CALLBACK",
            "REASON",
        )
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
            callback_used(item),
            why(item),
        )
        for item in items
    ]
    return table(rows)


def sent_body(stored: Any, as_sent: bytes | None) -> str:
    """A request's body as it went: `as_sent` when it is the stored body (the ledger keeps
    the JSON, not its bytes, and so not the order of its keys), else the stored JSON as
    the relay writes a body."""
    if as_sent is not None:
        try:
            if json.loads(as_sent) == stored:
                return as_sent.decode()
        except ValueError:
            pass
    return json.dumps(stored, separators=(",", ":"))


def request_lines(request: dict[str, Any], body: bytes | None) -> list[str]:
    """A request as sent, as an HTTP message: the request line, every header the relay set,
    and after a blank line the body, if any; `body` as `sent_body` takes it."""
    lines = [f"{request['method']} {request['url']}"]
    lines += [f"{name}: {value}" for name, value in request["headers"].items()]
    if request["body"] is not None:
        lines += ["", sent_body(request["body"], body)]
    return lines


def response_lines(attempt: dict[str, Any]) -> list[str]:
    """What an attempt got back: the status, the headers and an excerpt of the body. (Why
    there was no answer is on the attempt's own line.)"""
    if attempt["status_code"] is None:
        return ["(no answer)"]
    lines = [f"HTTP {attempt['status_code']}"]
    headers = attempt.get("response_headers")
    if headers is None:
        lines.append("(headers not recorded)")
    else:
        lines += [f"{name}: {value}" for name, value in headers.items()]
    body = " ".join((attempt["response_excerpt"] or "").split())
    if body:
        lines += ["", f"{body[:EXCERPT]}{'…' * (len(body) > EXCERPT)}"]
    return lines


def exchange_lines(attempt: dict[str, Any], body: bytes | None) -> list[str]:
    """One attempt's request (`> `) and response (`< `), as `curl -v` shows them."""
    sent = (
        ["(not recorded)"]
        if attempt["request"] is None
        else request_lines(attempt["request"], body)
    )
    return [f"> {line}".rstrip() for line in sent] + [
        f"< {line}".rstrip() for line in response_lines(attempt)
    ]


def delivery_text(d: dict[str, Any], body: bytes | None = None) -> str:
    """One delivery as `show` prints it: what, to whom, what happened (each attempt's
    request and response in full), what ops did. `body`: the POST body its event makes,
    as `sent_body` takes it."""
    lines = [
        f"delivery   {d['id']}",
        f"event      {d['event_id']} ({d['event_type']}), affiliate {d['affiliate_id']}, "
        f"order {d['order_number']}",
        f"state      {d['state']}" + (f": {why(d)}" if why(d) else ""),
        f"taken      {_time(d['created_at'])} UTC; order event at {_time(d['occurred_at'])}",
        f"callback   {_callback_line(d)}",
    ]
    if d["order_note"] is not None and why(d) != d["order_note"]:
        lines.append(f"order      {d['order_note']}")
    if d["next_attempt_at"] is not None and not _delayed(d):  # else the state line says it
        lines.append(f"next try   {_time(d['next_attempt_at'])} UTC")
    if d["request"] is not None:
        lines.append(f"request    {d['request']['method']} {d['request']['url']}")
        last = d["attempts"][-1]["request"] if d["attempts"] else None
        if last != d["request"]:  # not shown with an attempt below: shown here in full
            lines += [
                f"           {line}".rstrip() for line in request_lines(d["request"], body)[1:]
            ]
    lines.append(f"attempts   {len(d['attempts'])}")
    for attempt in d["attempts"]:
        got = (
            f"HTTP {attempt['status_code']}"
            if attempt["status_code"] is not None
            else f"{attempt['error_class']}: {attempt['error']}"
        )
        lines.append(
            f"  #{attempt['number']}  {_time(attempt['started_at'])} UTC  "
            f"{attempt['duration_ms']:.0f} ms  {got}"
        )
        lines += [f"      {line}" for line in exchange_lines(attempt, body)]
    for action in d["actions"]:
        what = action["action"] + (f" ({action['mode']})" if action["mode"] else "")
        note = f": {action['note']}" if action["note"] else ""
        lines.append(
            f"{what:<10} by {action['actor']} at {_time(action['at'])} UTC, "
            f"attempt {action['attempt']}{note}"
        )
    return printable("\n".join(lines))


def settled(event_id: str, found: Settled) -> str:
    """Why an event sent again is not enqueued: its delivery is done with."""
    line = f"{event_id}: already settled: {found.state} at {_time(found.at.isoformat())} UTC"
    if found.reason:
        line += f" ({found.reason})"
    if found.state in REPLAYABLE:
        line += f"; to send it again: postback dlq replay {found.id}"
    return printable(line)


def _kept(seconds: float | None) -> str:
    return "forever" if seconds is None else duration.spell(round(seconds))


def pruned_text(retention: Retention, pruned: Pruned, dry_run: bool) -> str:
    """What `postback db prune` did, or with `dry_run` would do, under which settings."""
    gone = pruned.deliveries
    by_state = ", ".join(f"{gone[state]} {state}" for state in gone)
    return "\n".join(
        [
            f"kept: delivered and skipped {_kept(retention.settled)}, dead and discarded "
            f"{_kept(retention.dead)}, attempts' requests and responses "
            f"{_kept(retention.excerpts)}",
            f"{'would delete' if dry_run else 'deleted'} {sum(gone.values())} deliveries "
            f"({by_state}), with their attempts and actions",
            f"{'would trim' if dry_run else 'trimmed'} {pruned.attempts} attempts: "
            "request, response headers and excerpt cleared",
        ]
    )


def quiet_logs(settings: Settings, least: str = "warning") -> None:
    """Info log lines off (and warnings too with `least="error"`), unless
    POSTBACK_LOG_LEVEL asks for them: for commands that tell a person what they do, whose
    log lines would only repeat it as raw JSON."""
    if "log_level" not in settings.model_fields_set:
        logs.configure(least)


class ProgressBar:
    """`progress(done, total)` drawn on stderr: a bar redrawn in place on a terminal;
    otherwise a line at most once a second, and the first and the last (a log file should
    not fill with carriage returns, nor with a line per delivery)."""

    WIDTH = 30
    EVERY = 1.0
    """Seconds between two lines outside a terminal."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.clock = clock
        self._shown_at: float | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            filled = self.WIDTH * done // max(total, 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            end = "\n" if done == total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total}{end}")
        else:
            now = self.clock()
            due = self._shown_at is None or now - self._shown_at >= self.EVERY
            if not (due or done == total):
                return
            self._shown_at = now
            self.stream.write(f"{self.label}: {done}/{total}\n")
        self.stream.flush()


class Countdown:
    """A `ProgressBar` for work counted before it starts (a prune, an erase): fed the count
    done so far, which may overshoot the total as rows come meanwhile; the lines between
    0 and the total as it grows, and the last one once, by `finish`."""

    def __init__(self, label: str, total: int) -> None:
        self.bar = ProgressBar(label)
        self.total = total
        self.shown = 0

    def __call__(self, done: int) -> None:
        done = min(done, self.total)
        if self.shown < done < self.total:
            self.bar(done, self.total)
            self.shown = done

    def finish(self) -> None:
        if self.total:
            self.bar(self.total, self.total)
