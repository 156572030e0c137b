"""What the `postback` command's options take, checked as they are parsed.

Each `type=` function refuses a bad value with `argparse.ArgumentTypeError`, which the
parser reports as one line naming the option (`argument --port: ...`) and exit code 2,
before anything is started: a port out of range must not get as far as the socket,
whose error is a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

MAX_PORT = 65535


def port(text: str) -> int:
    """A TCP port to listen on: 0 (any free one) to 65535."""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"must be a port number from 0 to {MAX_PORT} (0: any free port), got {text!r}"
        )
    return int(text)


def base_url(text: str) -> str:
    """An http(s) URL that paths are added to: scheme, host, optional port and path."""
    expected = f"must be an http:// or https:// base URL such as http://receiver:9000, got {text!r}"
    try:
        split = urlsplit(text)
        split.port  # noqa: B018 -- raises ValueError for a port that is not a number 0-65535
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if split.scheme not in ("http", "https") or not split.hostname:
        raise argparse.ArgumentTypeError(expected)
    if split.query or split.fragment or "@" in split.netloc:
        # Paths are appended to it: a query, a fragment or credentials would end up
        # in the middle of every URL made from it.
        raise argparse.ArgumentTypeError(
            f"must be a base URL without a query, fragment or credentials, got {text!r}"
        )
    return text


class Renamed(argparse.Action):
    """An option's old spelling, kept working for one release: it stands in for the `new`
    option (its value, and its being required) and leaves a notice in `renamed`, for `main`
    to print once the whole command line has been accepted (printed while parsing, it
    could come on top of a usage error, making two lines)."""

    def __init__(self, *args: Any, new: argparse.Action, why: str, **kwargs: Any) -> None:
        self.new = new
        self.why = why
        super().__init__(*args, **(kwargs | {"dest": new.dest}))

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        self.new.required = False  # given under its old name; a parser is built per run
        namespace.renamed = (
            f"{parser.prog}: {option_string} is deprecated here and goes in the next "
            f"release: use {self.new.option_strings[0]} ({self.why})"
        )
