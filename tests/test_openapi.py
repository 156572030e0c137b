"""schemathesis against the running `postback serve`: every operation in /openapi.json, fed
generated requests, answers without a 5xx and as the document says it answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests import leakcheck
from tests.conftest import INGEST_TOKEN, OPS_TOKEN

EXAMPLES = 30
"""Generated requests per operation: enough to reach every refusal path, quick in CI."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def live_service(database_url: str, redis_url: str, queue_name: str) -> Iterator[str]:
    """`postback serve` in a process of its own, as it runs in production."""
    port = _free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("POSTBACK_")}
    env |= {
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
        [sys.executable, "-m", "ops", "serve", "--port", str(port)],
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
