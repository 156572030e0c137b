"""`postback demo` leaves something to practise the runbook on.

In a terminal, or with `--stay`, the demo keeps its worker running and serves the ops page
until Ctrl-C, printing the page's URL and an ops token (made for the run, as none is
configured here); it leaves demo-dan's dead letter, whose callback points at a path his
receiver has moved away from. Elsewhere it finishes (tests/test_cli.py runs it so).
"""

from __future__ import annotations

import re
import socket
import subprocess

import aiohttp
import pytest

from tests.support.cli import POSTBACK, postback_env
from tests.support.demo import staying_demo
from tests.support.service import Api
from tests.support.wait import until
from worker.config import Settings

pytestmark = pytest.mark.usefixtures("db", "producer")  # empty tables and an empty queue

DAN_DEAD = re.compile(r"^  \S+ +demo-dan +dead +HTTP 404\r?$", re.M)


async def test_the_demo_stays_and_its_dead_letter_can_be_fixed_and_replayed_from_its_page(
    settings: Settings,
) -> None:
    with staying_demo(postback_env(settings), "--stay", "--port", "0") as demo:
        assert DAN_DEAD.search(demo.output), demo.output
        async with aiohttp.ClientSession() as http:
            page = Api(demo.url.rstrip("/"), http)
            status, html = await page.call("GET", "/", token=None)
            assert status == 200
            assert "postback relay" in html
            assert (await page.call("GET", "/v1/dead-letters", token="a guess"))[0] == 401
            status, body = await page.call("GET", "/v1/dead-letters", token=demo.token)
            assert status == 200
            [dead] = body["items"]
            assert (dead["affiliate_id"], dead["reason"]) == ("demo-dan", "HTTP 404")

            async def healthy() -> bool:  # the worker is alive
                return (await page.call("GET", "/healthz", token=None))[0] == 200

            await until(healthy, what="/healthz 200, a worker alive")

            # The runbook: fix the callback where dan's receiver moved, replay, delivered.
            found = re.search(r"^demo receiver listening on (\S+)$", demo.output, re.M)
            assert found is not None
            fixed = {"method": "GET", "url": found[1] + "/dan/v2/postback?o={{order.number}}"}
            status, body = await page.call(
                "PUT", "/v1/callbacks/demo-dan/order.created", token=demo.token, json=fixed
            )
            assert status < 300, body
            status, body = await page.call(
                "POST",
                f"/v1/dead-letters/{dead['id']}/replay",
                token=demo.token,
                json={"actor": "newcomer"},
            )
            assert status < 300, body

            async def delivered() -> bool:
                _, body = await page.call("GET", f"/v1/deliveries/{dead['id']}", token=demo.token)
                return bool(body["state"] == "delivered")

            await until(delivered, what="the replayed dead letter delivered by the demo's worker")
        output = demo.interrupt()
    assert demo.process.returncode == 0, output + demo.stderr
    assert "receiver got: GET /dan/v2/postback?o=%231004" in output
    assert output.endswith("demo stopped\n")
    assert "Traceback" not in demo.stderr


def test_in_a_terminal_the_demo_stays_until_ctrl_c(settings: Settings) -> None:
    with staying_demo(postback_env(settings), "--port", "0", terminal=True) as demo:
        assert DAN_DEAD.search(demo.output), demo.output
        assert demo.url.startswith("http://127.0.0.1:")
        with socket.create_connection(("127.0.0.1", int(demo.url.split(":")[2].strip("/")))):
            pass  # the page's port is open
        output = demo.interrupt()
    assert demo.process.returncode == 0, output
    assert output.rstrip().endswith("demo stopped")
    assert "Traceback" not in output


def test_a_port_in_use_is_refused_before_the_demo_runs(settings: Settings) -> None:
    """Said in one line, and before anything is published."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*POSTBACK, "demo", "--stay", "--port", str(port)],
            env=postback_env(settings),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert "address already in use" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "published" not in result.stdout
