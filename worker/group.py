"""Group commit: the calls a worker's concurrent jobs make, sent as one statement.

While one statement is in flight, the calls that come meanwhile wait for it, then go
together as the next; a call that finds none in flight goes at once. So an idle worker
adds no wait to a delivery, and a busy one pays one round trip and one commit for many
jobs instead of one each (issue 18: the two ledger statements were the largest part of a
delivery's cost, in the worker and in Postgres).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Call = TypeVar("Call")
Result = TypeVar("Result")
Noted = Callable[[int, int], None]


class Group(Generic[Call, Result]):
    """Sends calls one at a time when they come one at a time, and many at once when they
    come while the one before is in flight.

    `one` sends a single call; `many` sends several as one statement and returns their
    results in their order. When `many` fails and `alone(error)` says so, each call is sent
    again by itself, so that one bad call fails only its own job; the statement that failed
    committed nothing.
    """

    def __init__(
        self,
        one: Callable[[Call], Awaitable[Result]],
        many: Callable[[list[Call]], Awaitable[list[Result]]],
        alone: Callable[[Exception], bool],
    ) -> None:
        self._one = one
        self._many = many
        self._alone = alone
        self._waiting: list[tuple[Call, asyncio.Future[Result], Noted | None]] = []
        self._sender: asyncio.Task[None] | None = None
        self.statements = 0
        """Statements sent (or tried): with `calls`, how well calls were gathered."""
        self.calls = 0

    async def __call__(self, call: Call, noted: Noted | None = None) -> Result:
        """The call's result, once the statement that carried it has committed.

        `noted`, when given, is told which statement carried the call (this group's count
        of them) and how many calls that statement carried: for the call's trace span.

        A caller cancelled meanwhile leaves its call to be sent all the same: it may
        already be in flight, and the ledger's rules allow for a claim or a record whose
        job did not wait for it.
        """
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((call, future, noted))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="group-commit")
        return await future

    async def close(self) -> None:
        """Wait until every call handed over has been sent: before the pool closes."""
        while self._sender is not None:
            await asyncio.shield(self._sender)

    async def _send(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._send_batch(batch)
        finally:
            self._sender = None

    async def _send_batch(
        self, batch: list[tuple[Call, asyncio.Future[Result], Noted | None]]
    ) -> None:
        calls = [call for call, _, _ in batch]
        self.statements += 1
        self.calls += len(calls)
        for _, _, noted in batch:
            if noted is not None:
                noted(self.statements, len(calls))
        try:
            results = [await self._one(calls[0])] if len(calls) == 1 else await self._many(calls)
        except Exception as exc:
            if len(calls) == 1 or not self._alone(exc):
                for _, future, _ in batch:
                    _fail(future, exc)
                return
            for call, future, _ in batch:
                try:
                    _settle(future, await self._one(call))
                except Exception as alone_exc:
                    _fail(future, alone_exc)
            return
        except BaseException:
            # Cancelled (the event loop is closing): nobody gets an answer.
            for _, future, _ in batch:
                future.cancel()
            raise
        for (_, future, _), result in zip(batch, results, strict=True):
            _settle(future, result)


def _settle(future: asyncio.Future[Result], result: Result) -> None:
    if not future.done():  # its caller was cancelled meanwhile
        future.set_result(result)


def _fail(future: asyncio.Future[Result], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
