"""A private event loop on its own thread for admin calls: the client-side half of the admin lane.

An orchestrator's loop that parses thousands of streamed tokens a second runs admin callbacks late
(hundreds of ms on a busy 2-core host), which shows up as queue time although no server is slow. Admin
calls on their own loop only wait for the GIL (switched every few ms), not for the whole ready queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from opentelemetry import context as otel_context

T = TypeVar("T")


async def _in_context(ctx: otel_context.Context, coro: Coroutine[Any, Any, T]) -> T:
    token = otel_context.attach(ctx)  # the caller's active span stays the parent across the thread hop
    try:
        return await coro
    finally:
        otel_context.detach(token)


class AdminLoop:
    """``await loop.run(coro)`` from any event loop runs ``coro`` on this thread's loop."""

    def __init__(self, name: str = "weightwatch-admin-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the admin loop is closed")
        future = asyncio.run_coroutine_threadsafe(_in_context(otel_context.get_current(), coro), self.loop)
        return await asyncio.wrap_future(future)

    def close(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
