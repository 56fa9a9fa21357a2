"""A private event loop on its own thread for admin calls: the client-side half of the admin lane.

An orchestrator's loop that parses thousands of streamed tokens a second runs admin callbacks late
(hundreds of ms on a busy 2-core host), which shows up as queue time although no server is slow. Admin
calls on their own loop only wait for the GIL, not for the whole ready queue.

The GIL is the remaining wait: the admin thread gives it up at every socket call and, while the
generation loop computes, gets it back only when CPython's switch interval (5 ms) runs out; an update
takes a dozen such turns. While an admin call is in flight the interval is lowered to 1 ms (and put back
after the last call ends), so the handover costs about a millisecond instead of five. Outside admin
calls nothing changes.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from opentelemetry import context as otel_context

T = TypeVar("T")


async def _in_context(ctx: otel_context.Context, coro: Coroutine[Any, Any, T], switching: FastSwitching | None) -> T:
    token = otel_context.attach(ctx)  # the caller's active span stays the parent across the thread hop
    try:
        if switching is None:
            return await coro
        with switching:
            return await coro
    finally:
        otel_context.detach(token)


#: GIL switch interval while an admin call is in flight (CPython's default is 0.005 s).
ADMIN_SWITCH_INTERVAL_S = 0.001


class FastSwitching:
    """Lowers ``sys.setswitchinterval`` while at least one admin call is in flight; restores it after.

    Never raises the interval, and leaves it alone if someone else changed it meanwhile.
    """

    def __init__(self, interval: float = ADMIN_SWITCH_INTERVAL_S):
        self.interval = interval
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: float | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                current = sys.getswitchinterval()
                self._saved = current if current > self.interval else None
                if self._saved is not None:
                    sys.setswitchinterval(self.interval)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._saved is not None:
                if abs(sys.getswitchinterval() - self.interval) < 1e-9:
                    sys.setswitchinterval(self._saved)
                self._saved = None


class AdminLoop:
    """``await loop.run(coro)`` from any event loop runs ``coro`` on this thread's loop.

    ``switch_interval``: the GIL switch interval while calls are in flight (None keeps CPython's).
    """

    def __init__(self, name: str = "weightwatch-admin-loop", switch_interval: float | None = ADMIN_SWITCH_INTERVAL_S):
        self.switching = FastSwitching(switch_interval) if switch_interval else None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the admin loop is closed")
        future = asyncio.run_coroutine_threadsafe(_in_context(otel_context.get_current(), coro, self.switching), self.loop)
        return await asyncio.wrap_future(future)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the work still running on this loop ends: a cancelled caller returns at once, but the
        shielded resumes its sync started run on here, and closing the loop under them would leave engines paused.

        Each call is bounded by its own budget; ``timeout`` bounds the whole wait on top of that.
        """
        if self.loop.is_closed():
            return

        async def pending() -> None:
            tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(pending(), self.loop))

    def close(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
