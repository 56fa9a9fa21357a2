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
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from weightwatch import telemetry
from weightwatch.contracts import DEFAULT_PAUSE_MODE, ENV_ADMIN_TOKEN_FILE, PATH_BY_OP, PAUSE_MODES, admin_token_from_env
from weightwatch.orchestrator.admin_loop import AdminLoop
from weightwatch.orchestrator.admin_record import (
    RECORDED_BY_CALLER,
    record_done,
    record_send,
    record_sync_done,
    record_sync_start,
    straggler_ms,
)
from weightwatch.orchestrator.admin_types import (
    CANCELLED,
    AdminTimeouts,
    LoraAdapter,
    ServerResult,
    SyncResult,
    SyncTimeouts,
    UpdateResult,
)
from weightwatch.orchestrator.timing import PoolWaitProbe

_log = logging.getLogger("weightwatch.orchestrator")

T = TypeVar("T")
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


@dataclass(frozen=True)
class _Send:
    """What every attempt of one call sends and logs."""

    url: str
    op: str
    params: dict[str, str] | None
    step: int | None
    phase: str | None
    budget_s: float
    pool: str


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


async def _run_to_completion(coro: Coroutine[Any, Any, T]) -> tuple[T, bool]:
    """Await ``coro`` to its end even if the caller is cancelled meanwhile; say whether it was."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True


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
        self._versions: dict[str, int] = {}  # server label -> the step its last successful transfer loaded

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
            # A sync cancelled just before this still has its shielded resumes running on the admin loop.
            await self._admin_loop.drain()
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

    async def sync_weights(
        self,
        weight_dir: str | os.PathLike[str] | None,
        step: int,
        *,
        mode: str = DEFAULT_PAUSE_MODE,
        clear_cache: bool = False,
        timeouts: SyncTimeouts | None = None,
        lora: LoraAdapter | None = None,
    ) -> SyncResult:
        """The sync of today on every server: pause all, then update all, then resume all (each phase in parallel).

        * Resume always runs, on every server, once the pause phase has started: after a failed pause or
          update, after an exception and after cancellation (it is shielded; a cancelled caller gets its
          CancelledError once every resume has answered or run out of budget). A resume without a pause
          is harmless on the server, so no server is left paused because its pause "failed" after taking effect.
        * A failed pause on any server skips the transfer on every server: updating only the paused ones
          would leave servers on different weights (version skew); the sync fails with ``pause_failed``
          and every server keeps the version it had.
        * ``lora``: a LoRA run's transfer (``/load_lora_adapter``) instead of ``/update_weights``.

        Never raises for a server's failure (``result.raise_for_failures()``); raises ValueError for bad input.
        """
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if timeouts is not None and not isinstance(timeouts, SyncTimeouts):
            raise TypeError(f"timeouts must be a SyncTimeouts, got {type(timeouts).__name__}")
        if lora is not None:
            if not isinstance(lora, LoraAdapter):
                raise TypeError(f"lora must be a LoraAdapter, got {type(lora).__name__}")
            transfer_op, body = "load_lora_adapter", {"lora_name": lora.name, "lora_path": lora.path}
        else:
            if not isinstance(weight_dir, str | os.PathLike) or not os.fspath(weight_dir):
                raise ValueError(f"weight_dir must be a path, got {weight_dir!r}")
            transfer_op, body = "update_weights", {"weight_dir": os.path.abspath(os.fspath(weight_dir))}
        params = {"mode": mode, "clear_cache": "true" if clear_cache else "false"}
        return await self._run(self._sync(step, transfer_op, body, params, mode, timeouts or SyncTimeouts()))

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
            results = list(await asyncio.gather(*(self._call_server(op, s, body, timeouts, step=step) for s in self.servers)))
            wall_ms = (time.perf_counter() - t0) * 1000.0
            span.set_attribute("rl.wall_ms", round(wall_ms, 3))
            failed = [r for r in results if not r.ok]
            span.set_attribute("rl.failed", len(failed))
            if failed:
                span.set_status(Status(StatusCode.ERROR, f"{len(failed)} of {len(results)} servers failed"))
            elif step is not None and op == "update_weights":
                tele.metrics.set("rl_checkpoint_step", step)
            if step is not None and op == "update_weights":
                for r in results:
                    if r.ok:
                        self._versions[_label(r.server)] = step
        return UpdateResult(op=op, step=step, wall_ms=wall_ms, trace_id=trace_id, servers=results)

    async def _sync(
        self, step: int, transfer_op: str, body: dict[str, Any], params: dict[str, str], mode: str, timeouts: SyncTimeouts
    ) -> SyncResult:
        tracer = telemetry.get().tracer("weightwatch.orchestrator")
        t0 = time.perf_counter()
        phases: dict[str, list[ServerResult]] = {}
        reason: str | None = None
        cancelled = False
        with tracer.start_as_current_span(
            "weights.sync", attributes={"rl.step": step, "rl.servers": len(self.servers), "rl.mode": mode, "rl.op": transfer_op}
        ) as span:
            tid = telemetry.current_tid()
            trace_id = telemetry.current_trace_id()
            record_sync_start(tid, step=step, servers=len(self.servers), t=time.time(), mode=mode)
            try:
                phases["pause"] = await self._phase("pause", "pause", None, params, step, timeouts.pause)
                if all(r.ok for r in phases["pause"]):
                    phases["transfer"] = await self._phase("transfer", transfer_op, body, None, step, timeouts.transfer)
                    if not all(r.ok for r in phases["transfer"]):
                        reason = "transfer_failed"
                else:
                    reason = "pause_failed"
            except asyncio.CancelledError:
                cancelled, reason = True, CANCELLED
            except Exception:  # noqa: BLE001 - the resume below must still run; the error is in the result
                _log.exception("weightwatch: weight sync to step %d failed unexpectedly", step)
                reason = "error"
            finally:
                resume, cancelled_in_resume = await _run_to_completion(self._phase("resume", "resume", None, None, step, timeouts.resume))
                phases["resume"] = resume
                cancelled = cancelled or cancelled_in_resume
            if cancelled:
                reason = CANCELLED
            elif reason is None and not all(r.ok for r in resume):
                reason = "resume_failed"
            result = self._sync_result(step, trace_id, phases, reason, (time.perf_counter() - t0) * 1000.0)
            self._sync_done(span, tid, result)
        if cancelled:
            raise asyncio.CancelledError
        return result

    async def _phase(
        self, phase: str, op: str, body: dict[str, Any] | None, params: dict[str, str] | None, step: int, timeouts: AdminTimeouts
    ) -> list[ServerResult]:
        """One phase on every server in parallel, under one weights.sync.phase span."""
        tracer = telemetry.get().tracer("weightwatch.orchestrator")
        with tracer.start_as_current_span("weights.sync.phase", attributes={"rl.phase": phase, "rl.op": op}) as span:
            t0 = time.perf_counter()
            calls = (self._call_server(op, s, body, timeouts, params=params, step=step, phase=phase) for s in self.servers)
            results = list(await asyncio.gather(*calls))
            span.set_attribute("rl.wall_ms", round((time.perf_counter() - t0) * 1000.0, 3))
            span.set_attribute("rl.straggler_ms", round(straggler_ms([r.wall_ms for r in results]), 3))
            failed = [r for r in results if not r.ok]
            if failed:
                span.set_attribute("rl.failed", len(failed))
                span.set_status(Status(StatusCode.ERROR, f"{phase} failed on {len(failed)} of {len(results)} servers"))
            return results

    def _sync_result(
        self, step: int, trace_id: str | None, phases: dict[str, list[ServerResult]], reason: str | None, wall_ms: float
    ) -> SyncResult:
        for r in phases.get("transfer", []):
            if r.ok:
                self._versions[_label(r.server)] = step
        return SyncResult(
            step=step,
            wall_ms=wall_ms,
            trace_id=trace_id,
            phases=phases,
            phase_ms={p: max(r.wall_ms for r in rs) for p, rs in phases.items() if rs},
            straggler_ms={p: straggler_ms([r.wall_ms for r in rs]) for p, rs in phases.items() if rs},
            versions={_label(s): self._versions.get(_label(s)) for s in self.servers},
            transfer_skipped="transfer" not in phases,
            reason=reason,
        )

    def _sync_done(self, span: trace.Span, tid: str, result: SyncResult) -> None:
        record_sync_done(
            span,
            tid,
            step=result.step,
            servers=len(self.servers),
            wall_ms=result.wall_ms,
            phase_ms=result.phase_ms,
            straggler=result.straggler_ms,
            ok=result.ok,
            reason=result.reason,
        )

    async def _call_server(
        self,
        op: str,
        server: str,
        body: dict[str, Any] | None,
        timeouts: AdminTimeouts,
        *,
        params: dict[str, str] | None = None,
        step: int | None = None,
        phase: str | None = None,
    ) -> ServerResult:
        tele = telemetry.get()
        label = _label(server)
        url = server + PATHS[op]
        pool = "shared" if self._shared else "dedicated"
        with tele.tracer("weightwatch.orchestrator").start_as_current_span(
            "weights.update.server",
            kind=SpanKind.CLIENT,
            attributes={"rl.op": op, "rl.server": label, "url.full": url, "rl.pool": pool},
        ) as span:
            tid = telemetry.current_tid()
            t0 = time.perf_counter()
            attempts = 0
            last: _Attempt | None = None
            probe = PoolWaitProbe()
            send = _Send(url=url, op=op, params=params, step=step, phase=phase, budget_s=timeouts.total, pool=pool)
            try:
                async with asyncio.timeout(timeouts.total):
                    while True:
                        attempts += 1
                        probe = PoolWaitProbe()
                        last = await self._attempt(send, body, timeouts, tid, attempts, probe)
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
            except asyncio.CancelledError:
                # The caller gave up (a cancelled sync): close the call so it is not left "in flight" forever.
                cut = _Attempt(probe)
                cut.reason, cut.error = CANCELLED, f"cancelled after {attempts} attempt(s)"
                self._finish(send, server, label, tid, span, cut, (time.perf_counter() - t0) * 1000.0, attempts)
                raise
            except Exception as exc:  # noqa: BLE001 - a bug here must not take the orchestrator down
                _log.exception("weightwatch: admin call to %s failed unexpectedly", url)
                last = _Attempt(PoolWaitProbe())
                last.reason, last.error = "transport", f"{type(exc).__name__}: {exc}"
            wall_ms = (time.perf_counter() - t0) * 1000.0
            assert last is not None
            return self._finish(send, server, label, tid, span, last, wall_ms, attempts)

    async def _attempt(self, send: _Send, body: dict[str, Any] | None, timeouts: AdminTimeouts, tid: str, attempt: int, probe: PoolWaitProbe) -> _Attempt:
        client = self._http()
        url, op = send.url, send.op
        headers = {"accept": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if not self._instrumented:
            propagate.inject(headers)  # W3C traceparent from the weights.update.server span
        probe.start = time.perf_counter()
        result = _Attempt(probe)
        record_send(
            tid, url, op, attempt=attempt, step=send.step, budget_s=send.budget_s, phase=send.phase, pool=send.pool,
            mode=(send.params or {}).get("mode"),
        )
        token = RECORDED_BY_CALLER.set(True)  # the httpx instrumentor, if on, must not record this call again
        try:
            resp = await client.post(
                url, json=body, params=send.params, headers=headers, timeout=self._httpx_timeout(timeouts), extensions={"trace": probe}
            )
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            result.reason, result.retryable = "timeout", True
            result.error = f"{type(exc).__name__} to {url} after connect={timeouts.connect:g}s/pool={timeouts.pool_seconds:g}s"
            return result
        except httpx.TimeoutException as exc:
            result.reason = "timeout"  # a read/write timeout: the server may still be working; no retry
            result.error = f"{type(exc).__name__}: no answer from {url} within read={timeouts.read:g}s"
            return result
        except httpx.TransportError as exc:
            result.reason, result.retryable = "transport", True
            result.error = f"{type(exc).__name__} talking to {url}: {exc or 'connection failed'}"
            return result
        finally:
            RECORDED_BY_CALLER.reset(token)
        result.status, result.headers = resp.status_code, resp.headers
        try:
            result.body = resp.json()
        except ValueError:
            result.body = None
        if 200 <= resp.status_code < 300:
            return result
        result.error = _explain(resp.status_code, PATHS[op], result.body, resp.text)
        if resp.status_code >= 500:
            result.reason, result.retryable = "http_5xx", True
        else:
            result.reason = "http_4xx"
        return result

    def _finish(self, send: _Send, server: str, label: str, tid: str, span: trace.Span, a: _Attempt, wall_ms: float, attempts: int) -> ServerResult:
        """Turn the last attempt into a ServerResult, metrics, span attributes and the client.done event."""
        pool_wait_ms = a.probe.pool_wait_ms(time.perf_counter() if a.reason in ("timeout", CANCELLED) else None)
        return record_done(
            span,
            tid,
            server=server,
            label=label,
            url=send.url,
            op=send.op,
            status=a.status,
            body=a.body,
            headers=a.headers,
            reason=a.reason,
            error=a.error,
            wall_ms=wall_ms,
            pool_wait_ms=pool_wait_ms,
            attempts=attempts,
            step=send.step,
            phase=send.phase,
            phase_ms=wall_ms if send.phase else None,
        )
