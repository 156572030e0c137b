"""The `postback` command.

Every refusal (bad input, unknown variable, unreachable server) is one line on stderr and
exit code 2; a traceback means a bug in the relay, never a mistake of the user.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import shlex
import socket
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import asyncpg
import pydantic
import redis.exceptions

from ops.actions import erase, lookup, replay, switch
from ops.actions.filters import (
    MIN_PREFIX,
    DeadLetterQuery,
    DeliveryFilter,
    DeliveryQuery,
    Filter,
    IdPrefix,
    InputError,
    Paging,
    choices,
    read,
)
from ops.cli import console, demo, options
from ops.cli.embedded import services
from ops.service import app
from ops.service.app import Insecure
from ops.service.models import NotificationQuery
from producer.connection import open_redis
from producer.event import EVENT_TYPES, STORE_WIDE, Event, InvalidEvent, parse_event
from producer.json_input import BadJson, NotJson, read_json
from producer.publish import Producer
from worker import callbacks, database, duration, logs, notify, prune, render, schema, tracing
from worker.config import Settings
from worker.database import Executor
from worker.deliver import build_request, delivery_id, post_body, recorded_body
from worker.pool import create_worker, use_fast_loop

EXIT_USAGE = 2
EXIT_LEFT_TO_SWEEP = 3
"""A replay was done in the ledger, but not queued now (Redis unreachable): the sweep
queues it within a minute."""

Model = TypeVar("Model", bound=pydantic.BaseModel)


class CommandFailed(Exception):
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
    db.add_parser(
        "init", help="create the tables, or upgrade them from an earlier version (safe to repeat)"
    ).set_defaults(run=db_init)
    prune_parser = db.add_parser(
        "prune",
        help="delete settled deliveries and trim attempts older than POSTBACK_KEEP_* now "
        "(a worker does it every hour)",
    )
    prune_parser.add_argument(
        "--dry-run", action="store_true", help="only count what would go; change nothing"
    )
    prune_parser.set_defaults(run=db_prune)

    cb = commands.add_parser("callbacks", help="affiliates' callbacks").add_subparsers(
        dest="callbacks_command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    cb_set = cb.add_parser("set", help="create or replace a callback")
    cb_set.add_argument(
        "--affiliate",
        required=True,
        help=f"affiliate id, or '{STORE_WIDE}' for the store-wide callback: used for every "
        "affiliate without a callback of its own for the event",
    )
    cb_set.add_argument("--event", required=True, choices=EVENT_TYPES)
    cb_set.add_argument("--method", default="GET", type=str.upper, choices=callbacks.METHODS)
    cb_set.add_argument(
        "--url", required=True, help="URL template, e.g. https://t.example/?o={{order.number}}"
    )
    # A flag of its own rather than a word such as `--secret none`: that word would no
    # longer be a secret one could set, and a typo of it would be saved as the secret.
    secret = cb_set.add_mutually_exclusive_group()
    secret.add_argument(
        "--secret",
        help="signing secret (stored, never listed), or 'generate' for a new whsec_ one, "
        "printed once; omitted: the current one stays",
    )
    secret.add_argument(
        "--no-secret",
        action="store_true",
        help="remove the stored secret: requests go unsigned",
    )
    cb_set.add_argument(
        "--statuses",
        metavar="S1,S2",
        help="fire only for events whose order.status is one of these, e.g. approved,refunded "
        "(the others are recorded skipped); omitted: every status",
    )
    cb_set.add_argument(
        "--delay",
        metavar="DURATION",
        help="send each delivery this long after the event was accepted, e.g. 90s, 5m, 2h "
        "(at most 24h); omitted: at once",
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
    for verb, enabled in (("enable", True), ("disable", False)):
        cb_switch = cb.add_parser(
            verb,
            help=f"{verb} a callback"
            + (" (its events are skipped, its dead letters not replayed)" if not enabled else ""),
        )
        cb_switch.add_argument("--affiliate", required=True)
        cb_switch.add_argument("--event", required=True, choices=EVENT_TYPES)
        cb_switch.add_argument("--note", help="why (kept in the record with who did it)")
        cb_switch.add_argument("--actor", default=_default_actor(), help="recorded as who did it")
        if enabled:
            cb_switch.add_argument(
                "--replay",
                action=_NeedsRedis,
                nargs=0,
                help="then replay the callback's dead letters (as `dlq replay` does)",
            )
        cb_switch.set_defaults(run=callbacks_switch, enabled=enabled, replay=False)

    preview = commands.add_parser("preview", help="render a request without sending it")
    preview.add_argument("--url", required=True, help="URL template")
    preview.add_argument("--method", default="GET", type=str.upper, choices=callbacks.METHODS)
    _events_file(preview, "event JSON file, or - for stdin")
    preview.add_argument("--json", action="store_true", help="method, url, headers, body as JSON")
    preview.set_defaults(run=preview_request, needs=())

    send = commands.add_parser("send", help="enqueue events for delivery")
    _events_file(send, "JSON event, JSON array or JSON lines file, - for stdin")
    # The database: an event id that already settled is said so, not enqueued again.
    send.set_defaults(run=send_events, needs=("database", "redis"))

    worker = commands.add_parser("worker", help="run a worker that delivers queued events")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(run=run_worker, needs=("database", "redis"))

    serve = commands.add_parser("serve", help="run the HTTP service: ingest, ops API and page")
    serve.add_argument("--host", help="address to listen on (default POSTBACK_API_HOST)")
    serve.add_argument(
        "--port", type=options.port, help="port to listen on (default POSTBACK_API_PORT)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve endpoints whose token is not configured to anyone (local use only)",
    )
    serve.set_defaults(run=run_serve, needs=("database", "redis"))

    _ledger_commands(commands)

    notes = commands.add_parser(
        "notifications",
        help="what the relay told ops (POSTBACK_OPS_WEBHOOK), newest first",
    )
    _filters(notes, NotificationQuery)
    notes.add_argument("--json", action="store_true", help="JSON for scripts")
    notes.set_defaults(run=notifications_list)

    actions_cmd = commands.add_parser(
        "actions",
        help="what was done to an affiliate's callbacks and records (disables, enables, "
        "erases), newest first",
    )
    actions_cmd.add_argument(
        "--affiliate",
        required=True,
        help=f"affiliate id, or '{STORE_WIDE}' for the store-wide callback's",
    )
    actions_cmd.add_argument("--json", action="store_true", help="JSON for scripts")
    actions_cmd.set_defaults(run=actions_list)

    demo_cmd = commands.add_parser(
        "demo", help="run everything on this machine and show postbacks arriving"
    )
    demo_cmd.add_argument(
        "--receiver",
        type=options.base_url,
        help="base URL of a `postback receive` elsewhere; workers elsewhere deliver",
    )
    demo_cmd.add_argument(
        "--stay",
        action=argparse.BooleanOptionalAction,
        help="when done, keep the worker running and serve the ops page until Ctrl-C "
        "(default: in a terminal, yes; otherwise no)",
    )
    demo_cmd.add_argument(
        "--host", help="address the page is served on, with --stay (default POSTBACK_API_HOST)"
    )
    demo_cmd.add_argument(
        "--port",
        type=options.port,
        help="port the page is served on, with --stay (default POSTBACK_API_PORT)",
    )
    demo_cmd.set_defaults(run=run_demo, needs=("database", "redis"))

    receive = commands.add_parser(
        "receive", help="the demo's receiver: prints every postback it gets"
    )
    receive.add_argument("--host", default=demo.RECEIVER_HOST, help="address to listen on")
    receive.add_argument("--port", type=options.port, default=9000, help="port to listen on")
    receive.set_defaults(run=run_receive, needs=())
    return parser


def _events_file(parser: argparse.ArgumentParser, help: str) -> None:
    """`--file`, which was `--event` until `--event` meant an event type everywhere."""
    new = parser.add_argument("--file", required=True, metavar="FILE", help=help)
    parser.add_argument(
        "--event",
        action=options.Renamed,
        new=new,
        why="--event names an event type, as in `postback callbacks`",
        help=argparse.SUPPRESS,
    )


_OPTIONS = {"event_type": "--event"}
"""Where an option is not named for its field: `--event`, as in every other command."""


def _filters(parser: argparse.ArgumentParser, model: type[pydantic.BaseModel]) -> None:
    """An option for each field of a filter model: its name, help and choices are the
    model's, as the API's query parameters are. `main` checks their values before it
    starts anything."""
    parser.set_defaults(filters=model)
    for name, field in model.model_fields.items():
        option = _OPTIONS.get(name, "--" + name.replace("_", "-"))
        known = choices(model, name)
        if known is None:
            parser.add_argument(option, dest=name, help=field.description)
        else:  # listed in the help: in the usage line, 15 error classes would bury the rest
            described = f"{field.description}: {', '.join(known)}"
            parser.add_argument(
                option, dest=name, choices=known, metavar=name.upper(), help=described
            )


def _filter(args: argparse.Namespace, model: type[Model]) -> Model:
    return read(model, {name: getattr(args, name) for name in model.model_fields})


ID = "ID"
"""The delivery id argument, as usage lines and refusals name it."""
ID_HELP = f"delivery id, or its first {MIN_PREFIX} or more characters"
SHOWN_MATCHES = 5
"""Ids listed when a prefix matches more than one delivery."""


async def _delivery_id(db: Executor, typed: str) -> uuid.UUID:
    """The delivery `typed` names: its whole id, or the start of just one delivery's id, as
    git takes a commit's."""
    try:
        prefix = IdPrefix.parse(typed)
    except ValueError as exc:
        raise CommandFailed(f"{ID}: {exc}") from None
    if prefix.full is not None:
        return prefix.full
    found = await lookup.ids_starting(db, prefix, SHOWN_MATCHES + 1)
    if not found:
        raise CommandFailed(f"no delivery id starts with {typed}")
    if len(found) > SHOWN_MATCHES:
        listed = ", ".join(map(str, found[:SHOWN_MATCHES]))
        raise CommandFailed(
            f"{ID}: {typed} starts more than {SHOWN_MATCHES} delivery ids ({listed}, …); "
            "give more of it"
        )
    if len(found) > 1:
        listed = ", ".join(map(str, found))
        raise CommandFailed(
            f"{ID}: {typed} starts {len(found)} delivery ids ({listed}); give more of it"
        )
    return found[0]


def _ledger_commands(commands: Any) -> None:
    """`deliveries list|show|erase` and `dlq list|show|replay|discard`."""
    groups = {}
    for name, dead, title in (
        ("deliveries", False, "deliveries: every event's postback and its attempts"),
        ("dlq", True, "dead letters: deliveries that failed for good"),
    ):
        group = commands.add_parser(name, help=title).add_subparsers(
            dest=f"{name}_command", metavar="COMMAND", required=True, parser_class=_Parser
        )
        groups[name] = group
        listing = group.add_parser("list", help="list, newest first")
        _filters(listing, DeadLetterQuery if dead else DeliveryQuery)
        listing.add_argument("--json", action="store_true", help="JSON for scripts")
        listing.set_defaults(run=ledger_list, dead_letters=dead)
        show = group.add_parser("show", help="one delivery with its request and attempts")
        show.add_argument("id", metavar=ID, help=ID_HELP)
        show.add_argument("--json", action="store_true", help="JSON for scripts")
        show.set_defaults(run=ledger_show)

    erase_cmd = groups["deliveries"].add_parser(
        "erase",
        help="remove an affiliate's settled deliveries and test fires, which hold its events "
        "and requests; recorded in actions without them",
    )
    erase_cmd.add_argument(
        "--affiliate",
        required=True,
        help="the affiliate id (not '*', which only names the store-wide callback)",
    )
    erase_cmd.add_argument("--note", help="why (kept in the record)")
    erase_cmd.add_argument(
        "--dry-run", action="store_true", help="only count what would go; change nothing"
    )
    erase_cmd.add_argument(
        "--yes",
        action="store_true",
        help="erase without asking first (required when stdin is not a terminal)",
    )
    erase_cmd.add_argument("--actor", default=_default_actor(), help="recorded as who did it")
    erase_cmd.set_defaults(run=deliveries_erase)

    dlq = groups["dlq"]
    replay_cmd = dlq.add_parser(
        "replay", help="send dead letters again: one by id, or all matching filters"
    )
    replay_cmd.add_argument(
        "id", nargs="?", metavar=ID, help=f"{ID_HELP}; omitted: all matching filters"
    )
    _filters(replay_cmd, Filter)
    replay_cmd.add_argument(
        "--all", action="store_true", help="with no id and no filter: replay every dead letter"
    )
    replay_cmd.add_argument(
        "--mode",
        choices=replay.MODES,
        default="rerender",
        help="rerender with the callback as it is now (default), or resend the last request",
    )
    replay_cmd.add_argument("--actor", default=_default_actor(), help="recorded as who did it")
    replay_cmd.set_defaults(run=dlq_replay, needs=("database", "redis"))
    discard = dlq.add_parser("discard", help="drop a dead letter from the list, with a note")
    discard.add_argument("id", metavar=ID, help=ID_HELP)
    discard.add_argument("--note", required=True, help="why (kept in the record)")
    discard.add_argument("--actor", default=_default_actor(), help="recorded as who did it")
    discard.set_defaults(run=dlq_discard)


class _NeedsRedis(argparse.Action):
    """A flag whose command then needs Redis too: started embedded only when it is given."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)
        namespace.needs = ("database", "redis")


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} (cli)"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "renamed", None):
        print(args.renamed, file=sys.stderr)
    try:
        settings = Settings()
        logs.configure(settings.log_level)
        command: Command = args.run
        if getattr(args, "filters", None) is not None:
            _filter(args, args.filters)  # refused before an embedded server is started
        with services(settings, args.needs) as ready:
            return command(args, ready)
    except KeyboardInterrupt:
        return 130
    except CommandFailed as exc:
        return _refuse(str(exc))
    except (InvalidEvent, callbacks.CallbackError, render.TemplateError, Insecure) as exc:
        return _refuse(str(exc))
    except tracing.TracingUnavailable as exc:
        return _refuse(str(exc))
    except InputError as exc:
        return _refuse(f"--{exc.field.replace('_', '-')}: {exc.message}")
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
    url = _database_url(settings)
    try:
        try:
            upgraded = await database.init(url)
        except database.DatabaseUnavailable as exc:
            if not database.missing(exc):
                raise
            await _create_database(url)
            upgraded = await database.init(url)
    except schema.SchemaTooNew as exc:
        raise CommandFailed(str(exc)) from exc
    print(upgraded)
    return 0


@_sync
async def db_prune(args: argparse.Namespace, settings: Settings) -> int:
    console.quiet_logs(settings)  # it prints what it did
    retention = settings.retention
    db = await database.create_pool(_database_url(settings), 1)
    try:
        # Counted first: the dry run's answer, and the real run's progress bar's total.
        planned = await prune.prune(db, retention, dry_run=True, rest=0)
        if args.dry_run:
            print(console.pruned_text(retention, planned, dry_run=True))
            return 0
        steps = console.Countdown("pruning", planned.total)
        pruned = await prune.prune(db, retention, progress=lambda so_far: steps(so_far.total))
        steps.finish()
    finally:
        await db.close()
    print(console.pruned_text(retention, pruned, dry_run=False))
    return 0


async def _create_database(url: str) -> None:
    """The database the URL names, created: it did not exist. When its user may not create
    it, the refusal says how to."""
    name = database.name_of(url) or "DATABASE"
    user = urlsplit(url).username
    who = user or "the URL's user"
    owner = f' OWNER "{user}"' if user else ""
    try:
        await database.create(url)
    except (database.DatabaseUnavailable, asyncpg.PostgresError, ValueError) as exc:
        raise CommandFailed(
            f"database {name} does not exist, and {who} could not create it "
            f"({_first_line(exc)}): create it as a user who may "
            f'(CREATE DATABASE "{name}"{owner}), then run `postback db init` again'
        ) from None
    print(
        f"created database {name}, which did not exist "
        f"(connected to the {database.MAINTENANCE_DATABASE} database as {who})"
    )


@_sync
async def callbacks_set(args: argparse.Namespace, settings: Settings) -> int:
    spec = callbacks.validate(
        args.affiliate,
        args.event,
        args.method,
        args.url,
        args.secret,
        allowed=settings.allowed,
        remove_secret=args.no_secret,
        statuses=args.statuses,
        delay=args.delay,
    )
    async with database.connection(_database_url(settings)) as conn:
        saved = await callbacks.save(conn, spec)
        listed = (
            [] if saved.enabled else await switch.listing(conn, spec.affiliate_id, spec.event_type)
        )
    conditions = []
    if saved.statuses is not None:
        conditions.append(f"statuses {','.join(saved.statuses)}")
    if saved.delay_seconds:
        conditions.append(f"delay {duration.spell(saved.delay_seconds)}")
    print(
        f"saved: {_affiliate(saved.affiliate_id)} {saved.event_type} {saved.method} "
        f"{saved.url_template}" + (f" ({'; '.join(conditions)})" if conditions else "")
    )
    if spec.generated:
        print(f"secret: {spec.secret}")
        print("  shown this once: give it to the affiliate, who verifies signatures with it")
    if spec.remove_secret:
        print("secret: removed; its requests are no longer signed")
    for cb in listed:  # saving leaves a disabled callback disabled: say so, and how to enable
        print(_disabled_line(cb))
    return 0


@_sync
async def callbacks_list(args: argparse.Namespace, settings: Settings) -> int:
    async with database.connection(_database_url(settings)) as conn:
        found = await switch.listing(conn, args.affiliate)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no callbacks")
        return 0
    rows = [
        ("AFFILIATE", "EVENT", "METHOD", "ENABLED", "SECRET", "STATUSES", "DELAY", "STREAK", "URL")
    ]
    rows += [
        (
            _affiliate(cb["affiliate_id"]),
            cb["event_type"],
            cb["method"],
            _yes_no(cb["enabled"]),
            _yes_no(cb["has_secret"]),
            "all" if cb["statuses"] is None else ",".join(cb["statuses"]),
            cb["delay"] if cb["delay_seconds"] else "none",
            str(cb["dead_streak"]) if cb["dead_streak"] else "-",
            cb["url_template"],
        )
        for cb in found
    ]
    print(console.table(rows))
    for cb in found:
        if not cb["enabled"]:
            print(_disabled_line(cb))
    return 0


def _disabled_line(cb: dict[str, Any]) -> str:
    """Who disabled a listed callback, when and why, and how to enable it again."""
    name = f"{_affiliate(cb['affiliate_id'])} {cb['event_type']}"
    off = cb["disabled"]
    if off is None:  # disabled before disables were recorded
        said = f"{name}: disabled"
    else:
        when = off["at"][:19].replace("T", " ")
        said = f"{name}: disabled by {off['actor']} at {when} UTC" + (
            f": {off['note']}" if off["note"] else ""
        )
    count = cb["dead_letters"]
    affiliate = shlex.quote(cb["affiliate_id"])
    enable = f"postback callbacks enable --affiliate {affiliate} --event {cb['event_type']}"
    if count:
        letters = "1 dead letter" if count == 1 else f"{count} dead letters"
        return f"{said}\n  {letters}; to enable it and replay them: {enable} --replay"
    return f"{said}\n  to enable it: {enable}"


def _affiliate(affiliate_id: str) -> str:
    """An affiliate id as tables show it: the store-wide callback's `*` said to be that."""
    return f"{affiliate_id} (store-wide)" if affiliate_id == STORE_WIDE else affiliate_id


@_sync
async def callbacks_switch(args: argparse.Namespace, settings: Settings) -> int:
    console.quiet_logs(settings, "error")  # it prints what it did, Redis down included
    note = (args.note or "").strip() or None
    db = await database.create_pool(_database_url(settings), 2)
    try:
        if args.enabled:
            switched = await switch.enable(db, args.affiliate, args.event, args.actor, note)
        else:
            switched = await switch.disable(db, args.affiliate, args.event, args.actor, note)
        if switched is None:
            raise CommandFailed(f"no {args.event} callback for affiliate {args.affiliate}")
        done = "enabled" if args.enabled else "disabled"
        if switched.changed:
            print(f"{done}: {args.affiliate} {args.event}")
        else:
            print(f"already {done}: {args.affiliate} {args.event}")
        if not args.replay:
            return 0
        assert settings.redis_url is not None
        redis = open_redis(settings.redis_url, settings.queue_name)
        try:
            summary = await switch.replay_dead_letters(
                db,
                redis,
                settings.queue_name,
                switched.callback,
                "rerender",
                args.actor,
                console.ProgressBar("replaying"),
            )
        finally:
            await redis.aclose()
    finally:
        await db.close()
    return _replayed(summary)


@_sync
async def notifications_list(args: argparse.Namespace, settings: Settings) -> int:
    query = _filter(args, NotificationQuery)
    async with database.connection(_database_url(settings)) as conn:
        found, more = await notify.recent(conn, query.limit, query.before)
    if args.json:
        print(json.dumps({"items": [n.public() for n in found], "next": more}, indent=2))
        return 0
    if not found:
        print("no notifications")
        return 0
    rows = [("ID", "CREATED (UTC)", "KIND", "STATE", "TRIES", "TEXT")]
    rows += [
        (
            str(n.id),
            n.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            n.kind,
            n.state if n.error is None else f"{n.state} ({n.error})",
            str(n.attempts),
            n.text,
        )
        for n in found
    ]
    print(console.table(rows))
    if more is not None:
        print(f"more notifications: add --before {more}", file=sys.stderr)
    return 0


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


@_sync
async def callbacks_remove(args: argparse.Namespace, settings: Settings) -> int:
    async with database.connection(_database_url(settings)) as conn:
        removed = await callbacks.remove(conn, args.affiliate, args.event)
    if not removed:
        raise CommandFailed(f"no {args.event} callback for affiliate {args.affiliate}")
    print(f"removed: {args.affiliate} {args.event}")
    return 0


def _read_input(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except OSError as exc:
        hint = ""
        if source in EVENT_TYPES:  # `send --event order.created`, as in `callbacks`
            hint = f" ({source} is an event type; --file takes events, each with its type)"
        raise CommandFailed(f"cannot read {source}: {exc.strerror or exc}{hint}") from None
    except UnicodeDecodeError:
        raise CommandFailed(f"{source} is not UTF-8 text") from None


def read_events(source: str) -> list[Event]:
    """One JSON event, a JSON array of events, or JSON lines; all valid or refused."""
    text = _read_input(source)
    try:
        whole = read_json(text)
    except NotJson:
        documents = _json_lines(text)  # not one JSON document: read it line by line
    except BadJson as exc:
        # JSON, but refused (a duplicate key, a number out of range). Not read again line
        # by line: a pretty-printed document would be blamed on its first line.
        raise CommandFailed(str(exc)) from None
    else:
        if isinstance(whole, list):
            documents = [(f"event {i}", item) for i, item in enumerate(whole, start=1)]
        else:
            documents = [("event", whole)]
    if not documents:
        raise CommandFailed(f"{source}: no event in the input")
    events = []
    for which, document in documents:
        try:
            events.append(parse_event(document))
        except InvalidEvent as exc:
            # "invalid event 2: order.amount: ...": the event and each field named once.
            raise CommandFailed(f"invalid {which}: {exc.details}") from None
    return events


def _json_lines(text: str) -> list[tuple[str, Any]]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                documents.append((f"event on line {number}", read_json(line)))
            except BadJson as exc:
                raise CommandFailed(f"line {number}: {exc}") from None
    return documents


@_sync
async def preview_request(args: argparse.Namespace, settings: Settings) -> int:
    template = render.parse(args.url)
    [event] = _one_event(args.file)
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
        raise CommandFailed(f"{source}: preview takes one event, got {len(events)}")
    return events


@_sync
async def send_events(args: argparse.Namespace, settings: Settings) -> int:
    events = read_events(args.file)
    done = await _settled(settings, events)
    # An event whose delivery settled would only be ignored by the worker: said, not sent.
    to_send = [event for event in events if delivery_id(event) not in (done or {})]
    fresh: list[bool] = []
    left_to_sweep = 0
    if to_send:
        assert settings.redis_url is not None
        # Durable when the ledger answered: the events are in it before they are queued.
        async with await Producer.connect(
            settings.redis_url,
            settings.queue_name,
            database_url=None if done is None else _database_url(settings),
        ) as producer:
            if producer.durable:
                accepted = await producer.accept_many(to_send)
                if accepted.queued is None:
                    left_to_sweep = len(to_send)
                fresh = accepted.queued or []
            else:
                fresh = await producer.publish_many(to_send)
    queued = sum(fresh)
    already = len(fresh) - queued
    if left_to_sweep:
        print(
            f"recorded {left_to_sweep} event{'s' * (left_to_sweep != 1)}; Redis failed after "
            "the record: the sweep queues them within a minute",
            file=sys.stderr,
        )
    print(
        f"enqueued {queued} event{'s' * (queued != 1)}"
        + (f", {already} already queued" if already else "")
        + (f", {len(events) - len(to_send)} already settled" if done else "")
    )
    for event in events:
        found = (done or {}).get(delivery_id(event))
        if found is not None:
            print(console.settled(event.id, found))
    return 0


async def _settled(
    settings: Settings, events: list[Event]
) -> dict[uuid.UUID, lookup.Settled] | None:
    """The settled deliveries of `events`; None when the ledger cannot be read. Then the
    events are enqueued all the same, Redis-only (the worker ignores a settled one)."""
    try:
        async with database.connection(_database_url(settings)) as conn:
            return await lookup.settled(conn, [delivery_id(event) for event in events])
    except (database.DatabaseUnavailable, asyncpg.PostgresError) as exc:
        print(
            "postback: warning: not checked for events already settled, nor recorded in the "
            f"ledger before they are queued: {_first_line(exc)}",
            file=sys.stderr,
        )
        return None


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    tracing.from_environment()  # OTEL_*: off unless they ask for traces
    use_fast_loop()
    worker = create_worker(settings, burst=args.burst)
    worker.run()
    return 0


@_sync
async def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    return await demo.run(
        settings, args.receiver, demo.stays(args.stay), host=args.host, port=args.port
    )


@_sync
async def run_receive(args: argparse.Namespace, settings: Settings) -> int:
    return await demo.receive(args.host, args.port)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    host = args.host or settings.api_host
    port = settings.api_port if args.port is None else args.port
    tracing.from_environment()  # OTEL_*: off unless they ask for traces
    asyncio.run(app.serve(settings, host, port, args.insecure))
    return 0


@_sync
async def ledger_list(args: argparse.Namespace, settings: Settings) -> int:
    paging: Paging
    where: DeliveryFilter
    if args.dead_letters:
        paging = _filter(args, DeadLetterQuery)
        where = paging.dead_letters()
    else:
        paging = where = _filter(args, DeliveryQuery)
    async with database.connection(_database_url(settings)) as conn:
        page = await lookup.list_deliveries(conn, where, paging.limit, paging.cursor)
    if args.json:
        print(json.dumps({"items": page.items, "next": page.next}, indent=2))
        return 0
    what = "dead letters" if args.dead_letters else "deliveries"
    print(console.deliveries_table(page.items) if page.items else f"no {what}")
    if page.next is not None:
        print(f"more {what}: add --cursor {page.next}", file=sys.stderr)
    return 0


@_sync
async def ledger_show(args: argparse.Namespace, settings: Settings) -> int:
    async with database.connection(_database_url(settings)) as conn:
        found = await lookup.show_delivery(conn, await _delivery_id(conn, args.id))
    if found is None:
        raise CommandFailed(f"no delivery {args.id}")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    try:
        event = parse_event(found["event"])
    except InvalidEvent:  # only a row edited by hand: its bodies are shown as stored
        body = None
    else:
        sent = found["request"]
        body = post_body(event) if sent is None else recorded_body(sent, event)
    print(console.delivery_text(found, body))
    return 0


@_sync
async def dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    console.quiet_logs(settings, "error")  # it prints what it did, Redis down included
    where = _filter(args, Filter)
    if args.id is not None and where != Filter():
        raise CommandFailed("give a delivery id or filters, not both")
    if args.id is None and where == Filter() and not args.all:
        raise CommandFailed("give a delivery id, filters, or --all to replay every dead letter")
    assert settings.redis_url is not None
    db = await database.create_pool(_database_url(settings), 2)
    redis = open_redis(settings.redis_url, settings.queue_name)
    try:
        if args.id is not None:
            did = await _delivery_id(db, args.id)
            result = await replay.replay(db, redis, settings.queue_name, did, args.mode, args.actor)
            if result.outcome != "replayed":
                raise CommandFailed(f"{did}: not replayed: {result.reason}")
            if not result.queued:
                print(_left_to_sweep(1))
                return EXIT_LEFT_TO_SWEEP
            print(f"replayed: {did} ({args.mode})")
            return 0
        summary = await replay.replay_matching(
            db,
            redis,
            settings.queue_name,
            where,
            args.mode,
            args.actor,
            console.ProgressBar("replaying"),
        )
    finally:
        await redis.aclose()
        await db.close()
    return _replayed(summary)


def _replayed(summary: replay.Summary) -> int:
    """What a bulk replay did, printed; the command's exit code."""
    for problem in summary.problems:
        print(f"{problem['outcome']}: {problem['delivery_id']}: {problem['reason']}")
    print(f"replayed {summary.replayed}, skipped {summary.skipped}, failed {summary.failed}")
    if summary.unqueued:
        print(_left_to_sweep(summary.unqueued))
    if summary.failed:
        return 1
    return EXIT_LEFT_TO_SWEEP if summary.unqueued else 0


@_sync
async def deliveries_erase(args: argparse.Namespace, settings: Settings) -> int:
    console.quiet_logs(settings)  # it prints what it did
    try:
        affiliate = erase.check_affiliate(args.affiliate)
    except erase.NotErasable as exc:
        raise CommandFailed(f"--affiliate: {exc}") from None
    db = await database.create_pool(_database_url(settings), 1)
    try:
        try:
            # Counted first: the dry run's answer, the question asked, and the progress
            # bar's total.
            planned = await erase.count(db, affiliate)
        except erase.NothingStored as exc:
            raise CommandFailed(str(exc)) from None
        if args.dry_run:
            print(_erased_text(affiliate, planned, dry_run=True))
            return 0
        if not args.yes:
            _confirm_erase(affiliate, planned)
        steps = console.Countdown("erasing", planned.rows)
        erased = await erase.erase(
            db, affiliate, args.actor, args.note, progress=lambda so_far: steps(so_far.rows)
        )
        steps.finish()
    finally:
        await db.close()
    print(_erased_text(affiliate, erased, dry_run=False))
    return 0


@_sync
async def actions_list(args: argparse.Namespace, settings: Settings) -> int:
    async with database.connection(_database_url(settings)) as conn:
        found = await erase.affiliate_actions(conn, args.affiliate)
    if args.json:
        print(json.dumps({"items": found}, indent=2))
        return 0
    if not found:
        print(f"no actions on affiliate {args.affiliate}'s callbacks or records")
        return 0
    rows = [("ID", "AT", "ACTION", "ACTOR", "EVENT", "DETAIL", "NOTE")]
    rows += [
        (
            str(a["id"]),
            a["at"][:19].replace("T", " "),  # UTC, as stored
            a["action"],
            a["actor"],
            a["event_type"] or "",
            " ".join(f"{k}={v}" for k, v in (a["detail"] or {}).items()),
            a["note"] or "",
        )
        for a in found
    ]
    print(console.table(rows))
    return 0


def _confirm_erase(affiliate: str, planned: erase.Erased) -> None:
    """Asked on a terminal; refused elsewhere, where no one would answer."""
    if not sys.stdin.isatty():
        raise CommandFailed(
            "erasing cannot be undone, and stdin is not a terminal to ask on: add --yes to "
            "erase, or --dry-run to count what would go"
        )
    print(
        f"erase {_counted(planned)} of affiliate {affiliate}? This cannot be undone. [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CommandFailed("nothing erased: not confirmed")


def _counted(found: erase.Erased) -> str:
    def n(count: int, one: str, many: str) -> str:
        return f"{count} {one if count == 1 else many}"

    return (
        f"{n(found.deliveries, 'delivery', 'deliveries')} (with "
        f"{n(found.attempts, 'attempt', 'attempts')} and the actions on them) and "
        f"{n(found.test_fires, 'test fire', 'test fires')}"
    )


def _erased_text(affiliate: str, found: erase.Erased, dry_run: bool) -> str:
    if dry_run:
        lines = [f"would erase {_counted(found)} of affiliate {affiliate}"]
    else:
        lines = [
            f"erased {_counted(found)} of affiliate {affiliate}; "
            f"recorded as action {found.action_id}"
        ]
    if found.kept_open:
        one = found.kept_open == 1
        lines.append(
            f"{'would keep' if dry_run else 'kept'} {found.kept_open} open "
            f"{'delivery' if one else 'deliveries'} (accepted, pending or retrying), whose "
            f"{'job' if one else 'jobs'} would write {'it' if one else 'them'} again: run "
            f"the erase again once {'it has' if one else 'they have'} settled; disabling "
            "the affiliate's callbacks settles "
            f"{'it' if one else 'them'} when next due"
        )
    return "\n".join(lines)


def _left_to_sweep(count: int) -> str:
    if count == 1:
        what = "the delivery is reopened and the sweep queues it"
    else:
        what = f"the {count} deliveries are reopened and the sweep queues them"
    return f"Redis is unreachable; {what} within a minute"


@_sync
async def dlq_discard(args: argparse.Namespace, settings: Settings) -> int:
    console.quiet_logs(settings)  # it prints what it did
    if not args.note.strip():
        raise CommandFailed("--note: say why it is discarded")
    db = await database.create_pool(_database_url(settings), 1)
    try:
        did = await _delivery_id(db, args.id)
        result = await replay.discard(db, did, args.note, args.actor)
    finally:
        await db.close()
    if result.outcome != "discarded":
        raise CommandFailed(f"{did}: not discarded: {result.reason}")
    print(f"discarded: {did}")
    return 0
