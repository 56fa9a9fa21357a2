"""The admin client: weight updates to many inference servers in parallel, traced and measured.

Why its own ``httpx.AsyncClient``: an orchestrator's generation client keeps its pool busy with
streaming completions, and an admin call queued behind them waits seconds for a connection (the
front-end queue). The dedicated client never shares that pool. Passing ``client=`` (the generation
client) is the shared-pool mode, kept on purpose so demos and benchmarks can show the bottleneck.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from weightwatch import events, telemetry
from weightwatch.contracts import ENV_ADMIN_TOKEN_FILE, PATH_BY_OP, admin_token_from_env
from weightwatch.orchestrator.admin_loop import AdminLoop
from weightwatch.orchestrator.admin_types import AdminTimeouts, ServerResult, UpdateResult
from weightwatch.orchestrator.timing import PoolWaitProbe, server_times

_log = logging.getLogger("weightwatch.orchestrator")

PATHS = PATH_BY_OP
#: Backoff before retry n (1-based) is uniform in [d/2, d] with d = min(backoff_max, backoff_base * 2**(n-1)).
DEFAULT_BACKOFF_BASE = 0.25
DEFAULT_BACKOFF_MAX = 8.0


def _token_from_env() -> str | None:
    try:
        return admin_token_from_env()
    except OSError as exc:
        _log.warning("weightwatch: cannot read %s: %s", ENV_ADMIN_TOKEN_FILE, exc)
        return None


def _normalize_server(url: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"server must be a base URL like http://host:8001, got {url!r}")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"server must be a base URL like http://host:8001 (scheme http or https), got {url!r}")
    return url


def _label(server: str) -> str:
    """The ``server`` label: host:port, short and bounded."""
    return urlsplit(server).netloc


def _explain(status: int, path: str, body: Any, text: str) -> str:
    """A clear error for a non-2xx answer, naming the likely cause for the usual suspects."""
    detail = body.get("detail", body.get("error", body)) if isinstance(body, dict) else text[:300]
    msg = f"HTTP {status} from POST {path}: {detail}"
    if status == 404:
        msg += (
            f" - the server has no {path} route: it is not running weightwatch's admin endpoints "
            "(start it with `weightwatch serve` or VLLM_PLUGINS=weightwatch); plain vLLM has none"
        )
    elif status == 401:
        msg += " - admin token missing or wrong (AdminClient(token=...) or WEIGHTWATCH_ADMIN_TOKEN)"
    elif status == 422 and "update_info" in text:
        msg += (
            " - this is vLLM's own dev-mode /update_weights (NCCL weight transfer, wants update_info), "
            'not weightwatch\'s; load the weightwatch plugin, whose route takes {"weight_dir": ...}'
        )
    return msg


class _Attempt:
    """What one HTTP attempt produced."""

    __slots__ = ("status", "body", "headers", "reason", "error", "retryable", "probe")

    def __init__(self, probe: PoolWaitProbe):
        self.probe = probe
        self.status: int | None = None
        self.body: Any = None
        self.headers: httpx.Headers = httpx.Headers()
        self.reason: str | None = None
        self.error: str | None = None
        self.retryable = False

    @property
    def ok(self) -> bool:
        return self.reason is None and self.status is not None


class AdminClient:
    """Weight updates to one or many inference servers (their admin lanes), in parallel.

    ``servers``: base URLs (``http://host:8001``). ``timeouts``: per-call limits (see AdminTimeouts),
    overridable per call. ``retries``: extra attempts on transport errors, connect/pool timeouts and
    5xx (never on 4xx, never after a read timeout, which would queue a second reload behind the first).
    ``token``: Bearer token for the admin endpoints (default: WEIGHTWATCH_ADMIN_TOKEN[_FILE]).
    ``client``: pass the generation client to send admin calls through its pool (shared-pool mode).
    ``own_loop``: run the calls on a private event loop on its own thread, so a generation loop busy
    with streamed tokens cannot delay them. Default: on for the dedicated client, off (and refused)
    with ``client=``, whose connections belong to the caller's loop. ``aclose()`` stops the thread.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        timeouts: AdminTimeouts = AdminTimeouts(),
        retries: int = 2,
        token: str | None = None,
        client: httpx.AsyncClient | None = None,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        max_connections: int | None = None,
        own_loop: bool | None = None,
    ):
        if isinstance(servers, str):
            servers = [servers]
        self.servers: list[str] = [_normalize_server(s) for s in servers]
        if not self.servers:
            raise ValueError("AdminClient needs at least one server URL")
        if len(set(self.servers)) != len(self.servers):
            raise ValueError(f"duplicate server URLs: {self.servers}")
        if not isinstance(timeouts, AdminTimeouts):
            raise TypeError(f"timeouts must be an AdminTimeouts, got {type(timeouts).__name__}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (math.isfinite(backoff_base) and math.isfinite(backoff_max) and 0 <= backoff_base <= backoff_max):
            raise ValueError("need 0 <= backoff_base <= backoff_max, both finite")
        self.timeouts = timeouts
        self.retries = retries
        self.token = token if token is not None else _token_from_env()
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self._max_connections = max_connections or max(4, 2 * len(self.servers))
        if own_loop is None:
            own_loop = client is None
        if own_loop and client is not None:
            raise ValueError("own_loop=True needs the dedicated client: a shared client is bound to the caller's event loop")
        self._shared = client is not None
        self._admin_loop: AdminLoop | None = AdminLoop() if own_loop else None
        self._client: httpx.AsyncClient | None = client
        self._instrumented = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def own_loop(self) -> bool:
        """True when calls run on the client's private loop thread."""
        return self._admin_loop is not None

    @property
    def shared_pool(self) -> bool:
        """True when admin calls go through a client the caller gave us (the generation pool)."""
        return self._shared

    def _http(self) -> httpx.AsyncClient:
        """The httpx client, built on first use so it picks up the telemetry set up by then."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._httpx_timeout(self.timeouts),
                limits=httpx.Limits(max_connections=self._max_connections, max_keepalive_connections=self._max_connections),
            )
            try:
                from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

                HTTPXClientInstrumentor.instrument_client(self._client, tracer_provider=telemetry.get().tracer_provider)
                self._instrumented = True
            except Exception:  # noqa: BLE001 - without the instrumentation we inject traceparent ourselves
                _log.warning("weightwatch: cannot instrument the admin client; injecting traceparent by hand", exc_info=True)
        elif self._shared:
            self._instrumented = bool(getattr(self._client, "_is_instrumented_by_opentelemetry", False))
        return self._client

    async def aclose(self) -> None:
        """Close the dedicated client (and its loop); a shared (generation) client belongs to the caller and stays open."""
        if self._admin_loop is not None:
            if self._client is not None:
                await self._admin_loop.run(self._close_client())
            self._admin_loop.close()
            self._admin_loop = None
            return
        await self._close_client()

    async def _close_client(self) -> None:
        if self._client is not None and not self._shared:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ public calls

    async def update_weights(
        self, weight_dir: str | os.PathLike[str], step: int | None = None, *, timeouts: AdminTimeouts | None = None
    ) -> UpdateResult:
        """Tell every server to load the weights in ``weight_dir`` (a directory with safetensors).

        Never raises for a server's failure: each is in the result (``result.raise_for_failures()``).
        """
        if not isinstance(weight_dir, str | os.PathLike) or not os.fspath(weight_dir):
            raise ValueError(f"weight_dir must be a path, got {weight_dir!r}")
        body = {"weight_dir": os.path.abspath(os.fspath(weight_dir))}
        return await self._run(self._fan_out("update_weights", body, step, timeouts or self.timeouts))

    async def reload_weights(self, *, timeouts: AdminTimeouts | None = None) -> UpdateResult:
        """Tell every server to reload the model's own weights from disk."""
        return await self._run(self._fan_out("reload_weights", None, None, timeouts or self.timeouts))

    async def warm_up(self, *, timeout: float = 10.0) -> None:
        """Build the client and open a connection to every server (``GET /health``) before the first update.

        A long-running orchestrator has its connections open; without this the first update pays client
        construction and the TCP connect inside its queue time (measured: 300-500 ms against 20-40 ms).
        Best effort: a server that does not answer is logged, not raised.
        """

        async def warm() -> None:
            client = self._http()
            results = await asyncio.gather(
                *(client.get(server + "/health", timeout=timeout) for server in self.servers), return_exceptions=True
            )
            for server, r in zip(self.servers, results, strict=True):
                if isinstance(r, BaseException):
                    _log.info("weightwatch: admin warm-up of %s failed: %s", server, r)

        await self._run(warm())

    async def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._admin_loop is None:
            return await coro
        return await self._admin_loop.run(coro)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _httpx_timeout(t: AdminTimeouts) -> httpx.Timeout:
        return httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.pool_seconds)

    def _backoff(self, retry: int) -> float:
        d = min(self.backoff_max, self.backoff_base * (2 ** (retry - 1)))
        return random.uniform(d / 2, d)

    async def _fan_out(self, op: str, body: dict[str, Any] | None, step: int | None, timeouts: AdminTimeouts) -> UpdateResult:
        tele = telemetry.get()
        attrs: dict[str, Any] = {"rl.op": op, "rl.servers": len(self.servers), "rl.pool": "shared" if self._shared else "dedicated"}
        if step is not None:
            attrs["rl.step"] = int(step)
        t0 = time.perf_counter()
        with tele.tracer("weightwatch.orchestrator").start_as_current_span(
            "weights.update", kind=SpanKind.CLIENT, attributes=attrs
        ) as span:
            trace_id = telemetry.current_trace_id()
            results = list(await asyncio.gather(*(self._call_server(op, s, body, timeouts) for s in self.servers)))
            wall_ms = (time.perf_counter() - t0) * 1000.0
            span.set_attribute("rl.wall_ms", round(wall_ms, 3))
            failed = [r for r in results if not r.ok]
            span.set_attribute("rl.failed", len(failed))
            if failed:
                span.set_status(Status(StatusCode.ERROR, f"{len(failed)} of {len(results)} servers failed"))
            elif step is not None and op == "update_weights":
                tele.metrics.set("rl_checkpoint_step", step)
        return UpdateResult(op=op, step=step, wall_ms=wall_ms, trace_id=trace_id, servers=results)

    async def _call_server(self, op: str, server: str, body: dict[str, Any] | None, timeouts: AdminTimeouts) -> ServerResult:
        tele = telemetry.get()
        label = _label(server)
        url = server + PATHS[op]
        with tele.tracer("weightwatch.orchestrator").start_as_current_span(
            "weights.update.server",
            kind=SpanKind.CLIENT,
            attributes={"rl.op": op, "rl.server": label, "url.full": url, "rl.pool": "shared" if self._shared else "dedicated"},
        ) as span:
            tid = telemetry.current_tid()
            t0 = time.perf_counter()
            attempts = 0
            last: _Attempt | None = None
            probe = PoolWaitProbe()
            try:
                async with asyncio.timeout(timeouts.total):
                    while True:
                        attempts += 1
                        probe = PoolWaitProbe()
                        last = await self._attempt(op, url, body, timeouts, tid, attempts, probe)
                        if last.ok or not last.retryable or attempts > self.retries:
                            break
                        await asyncio.sleep(self._backoff(attempts))
            except TimeoutError:
                now = time.perf_counter()
                previous = last  # a failed earlier attempt (or the one just before the backoff that ran out)
                last = _Attempt(probe)  # the attempt cut short: its probe knows whether it ever got a connection
                last.reason = "timeout"
                last.error = f"no answer from {url} within total={timeouts.total:g}s ({attempts} attempt(s))"
                if previous is not None and previous.probe is probe:  # ran out while backing off
                    last.error += f"; last failure: {previous.reason}: {previous.error}"
                elif probe.acquired is None:
                    last.error += f"; still waiting for a pool connection after {probe.pool_wait_ms(now):.0f} ms"
                if previous is not None and previous.probe is not probe:
                    last.error += f"; an earlier attempt failed with {previous.reason}: {previous.error}"
            except Exception as exc:  # noqa: BLE001 - a bug here must not take the orchestrator down
                _log.exception("weightwatch: admin call to %s failed unexpectedly", url)
                last = _Attempt(PoolWaitProbe())
                last.reason, last.error = "transport", f"{type(exc).__name__}: {exc}"
            wall_ms = (time.perf_counter() - t0) * 1000.0
            assert last is not None
            return self._finish(op, server, label, url, tid, span, last, wall_ms, attempts)

    async def _attempt(
        self, op: str, url: str, body: dict[str, Any] | None, timeouts: AdminTimeouts, tid: str, attempt: int, probe: PoolWaitProbe
    ) -> _Attempt:
        client = self._http()
        headers = {"accept": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if not self._instrumented:
            propagate.inject(headers)  # W3C traceparent from the weights.update.server span
        probe.start = time.perf_counter()
        result = _Attempt(probe)
        events.emit(
            "weights.client.send", tid, url=url, op=op, t=time.time(), attempt=attempt, pool="shared" if self._shared else "dedicated"
        )
        try:
            resp = await client.post(url, json=body, headers=headers, timeout=self._httpx_timeout(timeouts), extensions={"trace": probe})
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            result.reason, result.retryable = "timeout", True
            result.error = f"{type(exc).__name__} to {url} after connect={timeouts.connect:g}s/pool={timeouts.pool_seconds:g}s"
            return result
        except httpx.TimeoutException as exc:
            result.reason = "timeout"  # a read/write timeout: the server may still be reloading; no retry
            result.error = f"{type(exc).__name__}: no answer from {url} within read={timeouts.read:g}s"
            return result
        except httpx.TransportError as exc:
            result.reason, result.retryable = "transport", True
            result.error = f"{type(exc).__name__} talking to {url}: {exc or 'connection failed'}"
            return result
        result.status, result.headers = resp.status_code, resp.headers
        try:
            result.body = resp.json()
        except ValueError:
            result.body = None
        if 200 <= resp.status_code < 300:
            return result
        path = PATHS[op]
        result.error = _explain(resp.status_code, path, result.body, resp.text)
        if resp.status_code >= 500:
            result.reason, result.retryable = "http_5xx", True
        else:
            result.reason = "http_4xx"
        return result

    def _finish(
        self, op: str, server: str, label: str, url: str, tid: str, span: trace.Span, a: _Attempt, wall_ms: float, attempts: int
    ) -> ServerResult:
        """Turn the last attempt into a ServerResult, metrics, span attributes and the client.done event."""
        metrics = telemetry.get().metrics
        ok = a.ok
        server_ms = rpc_ms = queue_ms = None
        if ok:
            server_ms, rpc_ms = server_times(a.body, a.headers)
            if server_ms is not None:
                queue_ms = max(0.0, wall_ms - server_ms)
        pool_wait_ms = a.probe.pool_wait_ms(time.perf_counter() if a.reason == "timeout" else None)
        trace_id = telemetry.current_trace_id()
        result = ServerResult(
            server=server,
            op=op,
            ok=ok,
            wall_ms=wall_ms,
            queue_ms=queue_ms,
            server_ms=server_ms,
            rpc_ms=rpc_ms,
            pool_wait_ms=pool_wait_ms,
            status=a.status,
            reason=a.reason,
            error=a.error,
            attempts=attempts,
            trace_id=trace_id,
            body=a.body,
        )
        labels = {"op": op, "server": label}
        if pool_wait_ms is not None:
            metrics.observe("rl_weight_update_pool_wait_seconds", pool_wait_ms / 1000.0, **labels)
        if ok:
            metrics.observe("rl_weight_update_wall_seconds", wall_ms / 1000.0, **labels)
            if queue_ms is not None:
                metrics.observe("rl_weight_update_queue_seconds", queue_ms / 1000.0, **labels)
            if rpc_ms is not None:
                metrics.observe("rl_weight_update_rpc_seconds", rpc_ms / 1000.0, **labels)
            # NaN when unknown: a stale number from an earlier update would be a lie.
            metrics.set("rl_weight_update_last_queue_seconds", queue_ms / 1000.0 if queue_ms is not None else math.nan, **labels)
            metrics.set("rl_weight_update_last_success_timestamp_seconds", time.time(), **labels)
        else:
            metrics.inc("rl_weight_update_failures_total", 1.0, op=op, server=label, reason=a.reason or "transport")
            _log.warning("weightwatch: %s on %s failed (%s): %s", op, label, a.reason, a.error)

        for key, value in (
            ("rl.wall_ms", wall_ms),
            ("rl.queue_ms", queue_ms),
            ("rl.server_ms", server_ms),
            ("rl.rpc_ms", rpc_ms),
            ("rl.pool_wait_ms", pool_wait_ms),
        ):
            if value is not None:
                span.set_attribute(key, round(value, 3))
        span.set_attribute("rl.attempts", attempts)
        span.set_attribute("rl.timing_known", server_ms is not None)
        if a.status is not None:
            span.set_attribute("http.response.status_code", a.status)
        if not ok:
            span.set_attribute("rl.failure_reason", a.reason or "transport")
            span.set_status(Status(StatusCode.ERROR, a.error or a.reason or "failed"))

        extra: dict[str, Any] = {
            "server_ms": server_ms,
            "pool_wait_ms": pool_wait_ms,
            "status": a.status,
            "ok": ok,
            "attempts": attempts,
            "op": op,
            "url": url,
        }
        if not ok:
            extra["reason"] = a.reason or "transport"
        events.emit("weights.client.done", tid, wall_ms=wall_ms, rpc_ms=rpc_ms, queue_ms=queue_ms, **extra)
        return result
