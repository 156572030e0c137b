"""The `postback` command.

Every refusal (bad input, unknown variable, unreachable server) is one line on stderr and
exit code 2; a traceback means a bug in the relay, never a mistake of the user.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import pydantic
import redis.exceptions

from ops import demo
from ops.embedded import services
from producer.event import EVENT_TYPES, Event, InvalidEvent, loads_json, parse_event
from producer.publish import Producer
from worker import callbacks, database, logs, render
from worker.config import Settings
from worker.deliver import build_request, delivery_id
from worker.pool import create_worker

EXIT_USAGE = 2


class Refused(Exception):
    """A refusal to report as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line is easier to read in a script's log.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


Command = Callable[[argparse.Namespace, Settings], int]


def _sync(command: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]) -> Command:
    """Most commands are coroutines; each runs in an event loop of its own."""

    @functools.wraps(command)
    def run(args: argparse.Namespace, settings: Settings) -> int:
        return asyncio.run(command(args, settings))

    return run


def _parser() -> _Parser:
    parser = _Parser(prog="postback", description="Affiliate postbacks for order events.")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    # What each command needs running; an unconfigured one is started embedded.
    parser.set_defaults(needs=("database",))

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    db.add_parser("init", help="create the tables (safe to run again)").set_defaults(run=db_init)

    cb = commands.add_parser("callbacks", help="affiliates' callbacks").add_subparsers(
        dest="callbacks_command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    cb_set = cb.add_parser("set", help="create or replace a callback")
    cb_set.add_argument("--affiliate", required=True)
    cb_set.add_argument("--event", required=True, choices=EVENT_TYPES)
    cb_set.add_argument("--method", default="GET", type=str.upper, choices=callbacks.METHODS)
    cb_set.add_argument(
        "--url", required=True, help="URL template, e.g. https://t.example/?o={{order.number}}"
    )
    cb_set.add_argument(
        "--secret", help="signing secret (stored, never listed); omitted: the current one stays"
    )
    cb_set.set_defaults(run=callbacks_set)
    cb_list = cb.add_parser("list", help="list callbacks")
    cb_list.add_argument("--affiliate")
    cb_list.add_argument("--json", action="store_true", help="JSON for scripts")
    cb_list.set_defaults(run=callbacks_list)
    cb_rm = cb.add_parser("remove", help="remove a callback")
    cb_rm.add_argument("--affiliate", required=True)
    cb_rm.add_argument("--event", required=True, choices=EVENT_TYPES)
    cb_rm.set_defaults(run=callbacks_remove)

    preview = commands.add_parser("preview", help="render a request without sending it")
    preview.add_argument("--url", required=True, help="URL template")
    preview.add_argument("--method", default="GET", type=str.upper, choices=callbacks.METHODS)
    preview.add_argument("--event", required=True, help="event JSON file, or - for stdin")
    preview.add_argument("--json", action="store_true", help="method, url, headers, body as JSON")
    preview.set_defaults(run=preview_request, needs=())

    send = commands.add_parser("send", help="enqueue events for delivery")
    send.add_argument("--event", required=True, help="JSON event or JSON lines file, - for stdin")
    send.set_defaults(run=send_events, needs=("redis",))

    worker = commands.add_parser("worker", help="run a worker that delivers queued events")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(run=run_worker, needs=("database", "redis"))

    commands.add_parser(
        "demo", help="run everything on this machine and show postbacks arriving"
    ).set_defaults(run=run_demo, needs=("database", "redis"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
        logs.configure(settings.log_level)
        command: Command = args.run
        with services(settings, args.needs) as ready:
            return command(args, ready)
    except KeyboardInterrupt:
        return 130
    except Refused as exc:
        return _refuse(str(exc))
    except (InvalidEvent, callbacks.CallbackError, render.TemplateError) as exc:
        return _refuse(str(exc))
    except pydantic.ValidationError as exc:
        return _refuse(_config_error(exc))
    except database.DatabaseUnavailable as exc:
        return _refuse(f"cannot reach the database: {_first_line(exc)}")
    except asyncpg.UndefinedTableError:
        return _refuse("the database has no relay tables yet: run `postback db init`")
    except asyncpg.PostgresError as exc:
        return _refuse(f"database error: {_first_line(exc)}")
    except redis.exceptions.RedisError as exc:
        return _refuse(f"cannot reach Redis: {_first_line(exc)}")
    except OSError as exc:
        return _refuse(_first_line(exc))


def _config_error(exc: pydantic.ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a rule across settings names them itself
        return f"bad configuration: {message}"
    return f"bad configuration: POSTBACK_{str(first['loc'][0]).upper()}: {message}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _refuse(message: str) -> int:
    print(f"postback: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _database_url(settings: Settings) -> str:
    assert settings.database_url is not None  # `services` has filled it in
    return settings.database_url


@_sync
async def db_init(args: argparse.Namespace, settings: Settings) -> int:
    await database.init(_database_url(settings))
    print("schema applied")
    return 0


@_sync
async def callbacks_set(args: argparse.Namespace, settings: Settings) -> int:
    spec = callbacks.validate(args.affiliate, args.event, args.method, args.url, args.secret)
    async with database.connection(_database_url(settings)) as conn:
        saved = await callbacks.save(conn, spec)
    print(f"saved: {saved.affiliate_id} {saved.event_type} {saved.method} {saved.url_template}")
    return 0


@_sync
async def callbacks_list(args: argparse.Namespace, settings: Settings) -> int:
    async with database.connection(_database_url(settings)) as conn:
        found = [cb.public() for cb in await callbacks.list_all(conn, args.affiliate)]
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no callbacks")
        return 0
    rows = [("AFFILIATE", "EVENT", "METHOD", "ENABLED", "SECRET", "URL")]
    rows += [
        (
            cb["affiliate_id"],
            cb["event_type"],
            cb["method"],
            _yes_no(cb["enabled"]),
            _yes_no(cb["has_secret"]),
            cb["url_template"],
        )
        for cb in found
    ]
    # Pad every column but the last: URLs are long and would push the table apart.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for *cells, url in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(cells, widths, strict=True)), url]))
    return 0


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


@_sync
async def callbacks_remove(args: argparse.Namespace, settings: Settings) -> int:
    async with database.connection(_database_url(settings)) as conn:
        removed = await callbacks.remove(conn, args.affiliate, args.event)
    if not removed:
        raise Refused(f"no {args.event} callback for affiliate {args.affiliate}")
    print(f"removed: {args.affiliate} {args.event}")
    return 0


def _read_input(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise Refused(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Refused(f"{source} is not UTF-8 text") from None


def read_events(source: str) -> list[Event]:
    """One JSON event, a JSON array of events, or JSON lines; all valid or refused."""
    text = _read_input(source)
    try:
        whole = loads_json(text)
    except InvalidEvent:
        documents = _json_lines(text)  # not one JSON document: read it line by line
    else:
        if isinstance(whole, list):
            documents = [(f"event {i}", item) for i, item in enumerate(whole, start=1)]
        else:
            documents = [("event", whole)]
    if not documents:
        raise Refused(f"{source}: no event in the input")
    events = []
    for where, document in documents:
        try:
            events.append(parse_event(document))
        except InvalidEvent as exc:
            raise Refused(f"{where}: {exc}") from None
    return events


def _json_lines(text: str) -> list[tuple[str, Any]]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                documents.append((f"line {number}", loads_json(line)))
            except InvalidEvent as exc:
                raise Refused(f"line {number}: {exc}") from None
    return documents


@_sync
async def preview_request(args: argparse.Namespace, settings: Settings) -> int:
    template = render.parse(args.url)
    [event] = _one_event(args.event)
    request = build_request(args.method, template, event, delivery_id(event))
    if args.json:
        print(json.dumps(request.as_json(), indent=2, ensure_ascii=False))
        return 0
    print(f"{request.method} {request.url}")
    if request.body is not None:
        print(request.body.decode())
    return 0


def _one_event(source: str) -> list[Event]:
    events = read_events(source)
    if len(events) != 1:
        raise Refused(f"{source}: preview takes one event, got {len(events)}")
    return events


@_sync
async def send_events(args: argparse.Namespace, settings: Settings) -> int:
    events = read_events(args.event)
    assert settings.redis_url is not None
    async with await Producer.connect(settings.redis_url, settings.queue_name) as producer:
        fresh = await producer.publish_many(events)
    queued = sum(fresh)
    already = len(fresh) - queued
    print(
        f"enqueued {queued} event{'s' * (queued != 1)}"
        + (f", {already} already queued" if already else "")
    )
    return 0


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    worker = create_worker(settings, burst=args.burst)
    worker.run()
    return 0


@_sync
async def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    return await demo.run(settings)
