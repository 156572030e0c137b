"""schemathesis against the running `postback serve`: every operation in /openapi.json, fed
generated requests, answers without a 5xx and as the document says it answers. And the
README's tables of the API list the document's routes and query parameters, no more, no
fewer, with the CLI's options for the filters."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ops.service.openapi import document
from tests import leakcheck
from tests.support.cli import POSTBACK, clean_env
from tests.support.ports import free_port
from tests.support.service import INGEST_TOKEN, OPS_TOKEN

EXAMPLES = 30
"""Generated requests per operation: enough to reach every refusal path, quick in CI."""


@pytest.fixture(scope="module")
def live_service(database_url: str, redis_url: str, queue_name: str) -> Iterator[str]:
    """`postback serve` in a process of its own, as it runs in production."""
    port = free_port()
    env = clean_env() | {
        "POSTBACK_DATABASE_URL": database_url,
        "POSTBACK_REDIS_URL": redis_url,
        "POSTBACK_QUEUE_NAME": queue_name,
        "POSTBACK_INGEST_TOKEN": INGEST_TOKEN,
        "POSTBACK_OPS_TOKEN": OPS_TOKEN,
        # Test fires of generated callbacks go nowhere; let them give up quickly.
        "POSTBACK_CONNECT_TIMEOUT": "0.5",
        "POSTBACK_REQUEST_TIMEOUT": "1",
        "POSTBACK_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [*POSTBACK, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/openapi.json", timeout=1):  # noqa: S310
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    _, err = process.communicate(timeout=5)
                    pytest.fail(f"postback serve did not start: {err}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        _, err = process.communicate(timeout=20)
        leakcheck.logged(err)
        assert process.returncode == 0, err
        assert "Traceback" not in err, err


def test_every_operation_answers_as_documented(live_service: str) -> None:
    schema = schemathesis.openapi.from_url(live_service + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    assert len(operations) >= 14
    for operation in operations:
        _check(operation, live_service)


def _check(operation: APIOperation[Any, Any, Any, Any], base_url: str) -> None:
    token = INGEST_TOKEN if operation.path == "/v1/events" else OPS_TOKEN
    # The relay's rules say more than JSON Schema can (a template must parse, a link needs
    # a host, a time its offset), so a schema-valid body may still be refused, with a 422
    # that names why. And /healthz answers 503 by design when no worker runs, as none does
    # here. Every other check applies to every answer.
    excluded: list[CheckFunction] = [positive_data_acceptance]
    if operation.path == "/healthz":
        excluded.append(not_a_server_error)

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy())
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            excluded_checks=excluded,
            timeout=10,
        )

    check()


# --- the README's tables ---------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(heading: str) -> str:
    """The README's text under `heading`, up to the next heading."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n#", start + len(heading) + 2)
    return text[start:end]


def _first_cells(text: str) -> list[str]:
    return [row.split(" | ")[0] for row in re.findall(r"^\| (.+) \|$", text, re.M)]


def _filters() -> list[tuple[list[str], list[str], str]]:
    """The rows of the README's table of filters: parameters, CLI options, what."""
    table = _section("### The ops API").split("**Filters**")[1]
    rows = re.findall(r"^\| (`.+`) \| (`.+`) \| (.+) \|$", table, re.M)
    return [
        (re.findall(r"`(\w+)`", names), re.findall(r"`(--[\w-]+)`", cli), what)
        for names, cli, what in rows
    ]


def _readme_routes() -> dict[tuple[str, str], set[str]]:
    """Each route the README's tables name, with the query parameters it says it takes:
    `?FILTERS` are those of the table of filters (less the ones for deliveries only, for
    dead letters), `[?name=...]` one of its own."""
    filters = {name for names, _, _ in _filters() for name in names}
    not_dead = {
        name for names, _, what in _filters() if what.startswith("deliveries") for name in names
    }
    routes: dict[tuple[str, str], set[str]] = {}
    cells = _first_cells(_section("## The HTTP service")) + _first_cells(
        _section("### The ops API")
    )
    for cell in cells:
        method, path = "", ""
        for verb, target in re.findall(r"`(?:(GET|POST|PUT|DELETE) )?([^`]+)`", cell):
            if target.startswith(".../"):  # as the one before, with another last step
                target = path.rsplit("/", 1)[0] + target[3:]
            elif not verb:
                continue  # a path prefix, not a route
            else:
                method = verb
            path, _, query = re.sub(r"\[(\?.*)\]", r"\1", target).partition("?")
            if query == "FILTERS":
                taken = filters - not_dead if path == "/v1/dead-letters" else filters
            else:
                taken = {pair.partition("=")[0] for pair in query.split("&") if pair}
            routes[(method, path)] = taken
    return routes


def test_the_readme_tables_name_the_documents_routes_and_query_parameters() -> None:
    documented = {
        (method.upper(), path): {
            p["name"] for p in spec.get("parameters", ()) if p["in"] == "query"
        }
        for path, operations in document()["paths"].items()
        for method, spec in operations.items()
    }
    assert _readme_routes() == documented


def test_the_readme_table_of_filters_names_the_cli_options() -> None:
    for command, dead in (("deliveries", False), ("dlq", True)):
        shown = subprocess.run(
            [*POSTBACK, command, "list", "--help"], capture_output=True, text=True, check=True
        ).stdout
        options = set(re.findall(r"^  (--[\w-]+)", shown, re.M)) - {"--help", "--json"}
        documented = {
            option
            for _, cli, what in _filters()
            if not (dead and what.startswith("deliveries"))
            for option in cli
        }
        assert options == documented, command
