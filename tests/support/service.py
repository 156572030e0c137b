"""`postback serve` run in the test's own process, and a client of it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from ops.service.app import create_app
from tests import leakcheck
from worker.config import Settings

INGEST_TOKEN = "ingest-token-for-tests-0123456789"
OPS_TOKEN = "ops-token-for-tests-0123456789"
leakcheck.register(INGEST_TOKEN, OPS_TOKEN)


@dataclass
class Api:
    """The running service on 127.0.0.1, and a client that sends the ops token unless told."""

    url: str
    http: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, token: str | None = OPS_TOKEN, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.url + path, headers=headers, **kwargs
        ) as response:
            body = await response.read()
            if response.content_type == "application/json":
                return response.status, json.loads(body)
            return response.status, body.decode()


def with_tokens(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"ingest_token": SecretStr(INGEST_TOKEN), "ops_token": SecretStr(OPS_TOKEN)}
    )


@contextlib.asynccontextmanager
async def running_service(settings: Settings, insecure: bool = False) -> AsyncIterator[Api]:
    """`postback serve` in this process, on a free port."""
    runner = web.AppRunner(create_app(settings, insecure), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as http:
            yield Api(f"http://{host}:{port}", http)
    finally:
        await runner.cleanup()


async def ingest(api: Api, body: Any, token: str | None = INGEST_TOKEN) -> tuple[int, Any]:
    return await api.call("POST", "/v1/events", token=token, json=body)
