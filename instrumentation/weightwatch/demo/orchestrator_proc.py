"""The demo's orchestrator process: streaming generation load, checkpoint waits, a weight sync every step.

* ``--concurrency`` workers each stream ``/v1/completions`` back to back, spread over the servers
  (``--api-url`` once per server), through one httpx client per server whose pool holds ``--pool-size``
  connections (more workers than connections, like an RL orchestrator's rollout client): the load
  that admin calls compete with.
* Step N: wait for checkpoint ``max(0, N - async_level)`` (``ckpt.wait``), then load the newest complete
  checkpoint on every server. ``--sync today`` (default): ``AdminClient.sync_weights``, prime-rl's
  sequence of today (pause every server, update every server, resume every server; ``weights.sync``);
  ``--sync bare``: the seed-era single ``POST /update_weights`` (``weights.update``). Admin calls go
  through the admin lanes (a dedicated client to each ``--admin-url``) or, with ``--admin shared``,
  through the generation client's pool. Then collect a batch of ``--batch-size`` completions whose
  weights are at most ``async_level`` steps old (``gen.batch``; each completion carries the version
  of the server that made it), record truncation and staleness (``[rollout]``) and hand the batch to
  the trainer as ``RUN/rollouts/step_N.jsonl``.

Run by ``weightwatch demo``; standalone: ``python -m weightwatch.demo.orchestrator_proc --run-dir RUN --api-url URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

import weightwatch
from weightwatch import telemetry
from weightwatch.contracts import DEFAULT_PAUSE_MODE, PAUSE_MODES, PRIME_RL_BUDGETS_S
from weightwatch.demo.layout import RunLayout, write_rollouts
from weightwatch.orchestrator import AdminClient, AdminTimeouts, GenerationTracker, SyncTimeouts, record_rollout, wait_for_checkpoint
from weightwatch.telemetry import start_loop_lag_probe
from weightwatch.trainer import latest_stable

_log = logging.getLogger("weightwatch.demo.orchestrator")


SYNC_MODES = ("today", "bare")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weightwatch.demo.orchestrator_proc", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--api-url", action="append", required=True,
                   help="a server's OpenAI API, e.g. http://127.0.0.1:8000 (repeat for more servers)")
    p.add_argument("--admin-url", action="append", default=None,
                   help="that server's admin lane, e.g. http://127.0.0.1:8001 (lane mode; repeat, in --api-url's order)")
    p.add_argument("--admin", choices=("lane", "shared"), default="lane")
    p.add_argument("--sync", choices=SYNC_MODES, default="today",
                   help="today: pause -> update -> resume on every server (AdminClient.sync_weights); bare: one POST /update_weights")
    p.add_argument("--pause-mode", choices=PAUSE_MODES, default=DEFAULT_PAUSE_MODE)
    p.add_argument("--pause-budget", type=float, default=PRIME_RL_BUDGETS_S["pause"], help="seconds one pause call may take")
    p.add_argument("--update-budget", type=float, default=PRIME_RL_BUDGETS_S["update_weights"], help="seconds one update call may take")
    p.add_argument("--resume-budget", type=float, default=PRIME_RL_BUDGETS_S["resume"], help="seconds one resume call may take")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--pool-size", type=int, default=16, help="pooled connections per server")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--async-level", type=int, default=2)
    p.add_argument("--ckpt-timeout", type=float, default=300.0)
    p.add_argument("--metrics-port", type=int, default=9400)
    p.add_argument("--metrics-addr", default="127.0.0.1")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: until stopped)")
    p.add_argument("--stop-grace", type=float, default=15.0,
                   help="seconds a stop waits for the sync in flight to end before cancelling it")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations that cannot work, with the reason (SystemExit)."""
    for name in ("concurrency", "pool_size", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.async_level < 0:
        raise SystemExit("--async-level must be >= 0")
    for name in ("pause_budget", "update_budget", "resume_budget"):
        value = getattr(args, name)
        if not (value > 0 and value != float("inf")):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number of seconds > 0")
    if args.admin == "lane":
        if not args.admin_url or len(args.admin_url) != len(args.api_url):
            raise SystemExit("--admin lane needs one --admin-url (the server's admin port) per --api-url")
    if len(set(args.api_url)) != len(args.api_url):
        raise SystemExit(f"duplicate --api-url: {args.api_url}")
    if args.admin == "shared" and args.sync == "today":
        raise SystemExit(SHARED_PAUSE_DEADLOCK)


#: Why ``--admin shared`` takes the bare update: a pause through the generation pool holds the very streams that
#: occupy every pooled connection, so the update and the resume behind them could never get one.
SHARED_PAUSE_DEADLOCK = (
    "--admin shared cannot run the sync of today: a pause (mode keep) freezes the generation streams that hold every "
    "connection of the shared pool, so the update and the resume would wait for a connection until their budgets run "
    "out, and the engine would stay paused. Use --sync bare with --admin shared (the seed-era update), or the lane."
)


@dataclass
class Completion:
    prompt: str
    text: str
    finish_reason: str | None
    ckpt_step: int


def _prompts() -> list[str]:
    try:
        from weightwatch.inference.tiny_model import corpus_text

        words = corpus_text().split()
    except Exception:  # noqa: BLE001
        words = "the trainer writes new weights and the orchestrator streams rollouts".split()
    rng = random.Random(0)
    out = []
    for _ in range(64):
        i = rng.randrange(0, max(1, len(words) - 8))
        out.append(" ".join(words[i : i + rng.randint(3, 6)]))
    return out


class Orchestrator:
    def __init__(self, args: argparse.Namespace, layout: RunLayout):
        self.args = args
        self.layout = layout
        self.stop = asyncio.Event()
        self.syncing = False  # a sync (or bare update) is in flight: a stop waits for it (--stop-grace)
        self.api_urls = [u.rstrip("/") for u in args.api_url]
        # The weight version each server serves (its own weights are checkpoint 0); completions carry their server's.
        self.versions = [0 for _ in self.api_urls]
        self.buffer: deque[Completion] = deque()
        self.arrived = asyncio.Event()
        self.tracker = GenerationTracker()
        self.rng = random.Random(args.seed)
        self.prompts = _prompts()
        self.errors = 0
        self.model = ""
        # Generation: more workers than pooled connections, no pool timeout (waiting is the point).
        pool = args.pool_size * len(self.api_urls)
        self.gen = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            timeout=httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=None),
        )
        update = self._budget(args.update_budget)
        self.timeouts = SyncTimeouts(pause=self._budget(args.pause_budget), transfer=update, resume=self._budget(args.resume_budget))
        if args.admin == "shared":
            self.admin_urls = list(self.api_urls)
            self.admin = AdminClient(self.admin_urls, timeouts=update, client=self.gen)
        else:
            self.admin_urls = [u.rstrip("/") for u in args.admin_url]
            # The lane on the client side too: the dedicated AdminClient runs its calls on its own thread
            # and event loop (own_loop), so a generation loop busy parsing streamed tokens cannot delay them.
            self.admin = AdminClient(self.admin_urls, timeouts=update, own_loop=True)

    @staticmethod
    def _budget(total: float) -> AdminTimeouts:
        # read as long as the whole budget: an update that takes longer than the read timeout would be cut
        # short as a read timeout before the budget (the thing the age metric measures against) runs out
        return AdminTimeouts(connect=min(10.0, total), read=total, total=total)

    def _server_index(self, server: str) -> int | None:
        """Which server a result is about (results name it by URL or by host:port, the ``server`` label)."""
        netloc = urlsplit(server).netloc or server
        for i, url in enumerate(self.admin_urls):
            if urlsplit(url).netloc == netloc:
                return i
        return None

    async def _model_name(self) -> str:
        resp = await self.gen.get(self.api_urls[0] + "/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])

    async def _stream_one(self, api_url: str, prompt: str) -> tuple[str, str | None]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.args.max_tokens, "temperature": 1.0, "stream": True,
                "seed": self.rng.randrange(1 << 30)}
        text: list[str] = []
        finish: str | None = None
        async with self.gen.stream("POST", api_url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise httpx.HTTPStatusError(f"HTTP {resp.status_code}: {resp.text[:200]}", request=resp.request, response=resp)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                choice = json.loads(data)["choices"][0]
                text.append(choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
        return "".join(text), finish

    async def worker(self, server: int) -> None:
        api_url = self.api_urls[server]
        while not self.stop.is_set():
            prompt = self.rng.choice(self.prompts)
            ckpt = self.versions[server]
            try:
                with self.tracker.request():
                    text, finish = await self._stream_one(api_url, prompt)
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.errors += 1
                if self.errors <= 5 or self.errors % 100 == 0:
                    _log.warning("generation request failed (%d so far): %s", self.errors, exc)
                await asyncio.sleep(0.5)
                continue
            self.buffer.append(Completion(prompt, text, finish, ckpt))
            self.arrived.set()

    async def collect(self, step: int, n: int) -> list[Completion]:
        """The next ``n`` completions at most ``async_level`` steps old (older ones are dropped as off-policy)."""
        oldest_ok = step - self.args.async_level
        out: list[Completion] = []
        while len(out) < n and not self.stop.is_set():
            while self.buffer and len(out) < n:
                c = self.buffer.popleft()
                if c.ckpt_step >= oldest_ok:
                    out.append(c)
            if len(out) < n:
                self.arrived.clear()
                waiter = asyncio.ensure_future(self.arrived.wait())
                stopper = asyncio.ensure_future(self.stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
        return out

    async def update(self, step: int) -> None:
        target = max(0, step - self.args.async_level)
        await wait_for_checkpoint(self.layout.weights, target, timeout=self.args.ckpt_timeout, poll_interval=0.05)
        newest = latest_stable(self.layout.weights)
        if newest is None or self.stop.is_set():
            return
        ckpt_step, path = newest
        self.syncing = True
        try:
            await self._load(ckpt_step, path)
        finally:
            self.syncing = False

    async def _load(self, ckpt_step: int, path: Path) -> None:
        if self.args.sync == "today":
            sync = await self.admin.sync_weights(path, ckpt_step, mode=self.args.pause_mode, clear_cache=False, timeouts=self.timeouts)
            transfers = list(sync.phases.get("transfer", []))
            failed = [r for phase in sync.phases.values() for r in phase if not r.ok]
        else:
            bare = await self.admin.update_weights(path, step=ckpt_step)
            transfers = list(bare.servers)
            failed = list(bare.failed)
        for r in transfers:
            i = self._server_index(r.server)
            if r.ok and i is not None:
                self.versions[i] = ckpt_step
        if failed:
            _log.warning("weight %s to step %d failed: %s", "sync" if self.args.sync == "today" else "update", ckpt_step,
                         "; ".join(f"{r.op} {r.server} {r.reason}: {r.error}" for r in failed))

    async def run(self) -> int:
        args = self.args
        self.model = await self._model_name()
        probe = start_loop_lag_probe("rl_orchestrator_event_loop_lag_seconds")
        # Every server starts on the model's own weights, which are checkpoint 0: say so before the first sync, so
        # a server that never takes an update shows as behind (rl_weight_version), not as absent.
        for url in self.admin_urls:
            telemetry.get().metrics.set("rl_weight_version", 0, server=urlsplit(url).netloc)
        if args.admin == "lane":
            await self.admin.warm_up()  # open the connection before step 0, as a long-running orchestrator has it
        workers: list[asyncio.Task[None]] = []
        _log.info("orchestrator ready: model=%s servers=%d sync=%s admin=%s concurrency=%d pool=%d batch=%d async_level=%d",
                  self.model, len(self.api_urls), args.sync, args.admin, args.concurrency, args.pool_size, args.batch_size,
                  args.async_level)
        step = 0
        try:
            while not self.stop.is_set() and (args.max_steps <= 0 or step < args.max_steps):
                await self.update(step)
                if self.stop.is_set():
                    break
                if not workers:
                    # Like a real orchestrator: load the first checkpoint, then start generating with it.
                    workers = [asyncio.create_task(self.worker(i % len(self.api_urls)), name=f"gen-{i}")
                               for i in range(args.concurrency)]
                async with self.tracker.batch(args.batch_size, step=step) as batch:
                    items = await self.collect(step, args.batch_size)
                    batch.completions = len(items)
                if len(items) < args.batch_size:
                    break  # stopped mid-batch
                ckpt_step = min(c.ckpt_step for c in items)
                truncated = sum(1 for c in items if c.finish_reason == "length")
                record_rollout(step, ckpt_step, truncated, len(items), async_level=args.async_level)
                write_rollouts(self.layout.rollout_file(step), (
                    {"prompt": c.prompt, "text": c.text, "finish_reason": c.finish_reason, "ckpt_step": c.ckpt_step} for c in items))
                step += 1
        finally:
            for w in workers:
                w.cancel()
            probe.cancel()
            await asyncio.gather(*workers, probe, return_exceptions=True)
            await self.admin.aclose()
            await self.gen.aclose()
        _log.info("orchestrator stopped after %d steps", step)
        return 0


def _leave_sync_in_flight(waited: float) -> None:
    """Exit now, leaving the sync in flight as a stopped orchestrator leaves it (sync.start without sync.done).

    Cancelling instead would race the admin client's own loop thread, which ``aclose`` stops, for the shielded
    resume; the logs would then say sometimes one thing, sometimes another. The demo stops the servers next.
    """
    _log.warning("stopping with a weight sync still in flight after %.0f s of --stop-grace: left unfinished", waited)
    try:
        telemetry.get().force_flush()
    finally:
        logging.shutdown()
        os._exit(0)


async def _amain(args: argparse.Namespace) -> int:
    layout = RunLayout.create(args.run_dir)
    orch = Orchestrator(args, layout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, orch.stop.set)
    main = asyncio.ensure_future(orch.run())
    stopper = asyncio.ensure_future(orch.stop.wait())
    await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not main.done():
        # Give the step in progress a moment to end cleanly, and a sync in flight up to --stop-grace: a sync cut
        # short by the demo's own stop would read as a hung sync (no sync.done) and a version skew (one server
        # took the weights, the other was cancelled), neither of which the run had.
        t0 = time.monotonic()
        while not main.done():
            waited = time.monotonic() - t0
            if waited > args.stop_grace and orch.syncing:
                _leave_sync_in_flight(waited)
            if waited > 3.0 and not orch.syncing:
                main.cancel()
                break
            await asyncio.wait({main}, timeout=0.1)
        await asyncio.gather(main, return_exceptions=True)
    stopper.cancel()
    if main.done() and not main.cancelled() and main.exception() is not None:
        raise main.exception()  # type: ignore[misc]
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    layout = RunLayout.create(args.run_dir)
    if args.admin == "lane":
        # Admin calls run on their own thread (AdminClient own_loop); a thread that waits on sockets gives up the GIL at every
        # syscall and, by default, waits up to 5 ms to get it back from the busy generation thread each
        # time. A 1 ms switch interval keeps that convoy small (sys.setswitchinterval, docs/demo.md).
        sys.setswitchinterval(0.001)
    tele = weightwatch.setup(
        "weightwatch-demo-orchestrator", role="orchestrator", metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
        span_file=layout.spans("orchestrator"), log_file=layout.log("orchestrator"),
    )
    logging.getLogger("weightwatch.demo").setLevel(logging.INFO)
    t0 = time.monotonic()
    try:
        return asyncio.run(_amain(args))
    except KeyboardInterrupt:
        return 0
    finally:
        _log.info("orchestrator exiting after %.1f s", time.monotonic() - t0)
        tele.force_flush()
        weightwatch.shutdown()


if __name__ == "__main__":
    sys.exit(main())
