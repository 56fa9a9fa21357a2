"""An orchestrator's admin client written the way prime-rl writes its own: plain httpx, no weightwatch.

One ``httpx.AsyncClient(base_url=server)`` per inference server; a weight sync is: pause every server
(``mode=keep``, ``clear_cache=false``), update every server with ``{"weight_dir": DIR}``, and resume every
server in a ``finally``. 5xx answers and transport errors are retried with a short backoff, 4xx answers are
raised at once, each attempt has its own timeout (300 s pause/resume, 720 s update by default). The tests
instrument this code from outside; nothing in it knows about weightwatch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

BUDGETS_S = {"pause": 300.0, "resume": 300.0, "update_weights": 720.0}


class PrimeRLStyleAdmin:
    def __init__(
        self,
        servers: Sequence[str],
        *,
        attempts: int = 3,
        backoff_s: float = 0.02,
        budgets_s: dict[str, float] | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.clients = [httpx.AsyncClient(base_url=s, headers=headers) for s in servers]
        self.attempts, self.backoff_s = attempts, backoff_s
        self.budgets_s = {**BUDGETS_S, **(budgets_s or {})}

    async def _post(self, client: httpx.AsyncClient, path: str, budget: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(1, self.attempts + 1):
            try:
                response = await client.post(path, timeout=self.budgets_s[budget], **kwargs)
            except httpx.TransportError:
                if attempt == self.attempts:
                    raise
            else:
                if response.status_code < 500 or attempt == self.attempts:
                    response.raise_for_status()  # 4xx: give up at once
                    return response
            await asyncio.sleep(self.backoff_s)
        raise AssertionError("unreachable")

    async def update_weights(self, weight_dir: str) -> None:
        try:
            await asyncio.gather(
                *(self._post(c, "/pause", "pause", params={"mode": "keep", "clear_cache": "false"}) for c in self.clients)
            )
            await asyncio.gather(*(self._post(c, "/update_weights", "update_weights", json={"weight_dir": weight_dir}) for c in self.clients))
        finally:
            await asyncio.gather(*(self._post(c, "/resume", "resume") for c in self.clients), return_exceptions=True)

    async def generate(self, prompt: str, model: str = "tiny", max_tokens: int = 4, server: int = 0) -> list[bytes]:
        """A streamed generation request through the same client (the instrumentor must leave it alone)."""
        chunks = []
        body = {"model": model, "prompt": prompt, "stream": True, "max_tokens": max_tokens}
        async with self.clients[server].stream("POST", "/v1/completions", json=body, timeout=120) as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                chunks.append(chunk)
        return chunks

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()
