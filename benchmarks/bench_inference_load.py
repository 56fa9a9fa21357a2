"""A lean streaming load generator: N concurrent streaming /v1/completions, in its own process.

Raw asyncio streams and no JSON parsing, so on a 2-core machine the client costs as little CPU as possible and
the server's behaviour is what gets measured. Tokens are counted exactly: each request asks for vLLM's
continuous usage stats and the generator reads the running ``completion_tokens`` from each chunk. (Counting SSE
events is not the same: when the API server falls behind the engine, vLLM merges several tokens into one event,
so a slower front end shows fewer events for the same tokens.) Events are counted too. Each of the N
workers keeps one keep-alive connection and sends a new completion as soon as the last one ends.

    python -m benchmarks.bench_inference_load --url http://127.0.0.1:8000 --model DIR --streams 256 \
        --duration 60 --out load.json

Writes {"tokens": ..., "seconds": ..., "tokens_per_s": ..., "events": ..., "completions": ..., "errors": ...} for the
measurement window (after --warmup seconds). With ``--ticks FILE`` it also appends ``unix_time tokens completions
errors events`` (cumulative since the warm-up ended) every ``--tick-every`` seconds, so one long run can be cut into
windows afterwards (bench_inference_ab.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from urllib.parse import urlsplit


class Counters:
    def __init__(self) -> None:
        self.tokens = 0
        self.events = 0
        self.completions = 0
        self.errors = 0
        self.counting = False


_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)')


async def _worker(host: str, port: int, requests: list[bytes], c: Counters, stop: asyncio.Event, rng: random.Random) -> None:
    reader = writer = None
    while not stop.is_set():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            writer.write(rng.choice(requests))
            await writer.drain()
            status = await reader.readline()
            if b" 200 " not in status:
                raise ConnectionError(status.decode(errors="replace").strip())
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # headers; the body is chunked SSE
            done = False
            seen = 0  # this completion's tokens so far (vLLM's running count)
            while not done:
                size_line = await reader.readline()
                if not size_line:
                    raise ConnectionError("connection closed mid-stream")
                size = int(size_line.strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    break
                chunk = await reader.readexactly(size + 2)
                counts = _COMPLETION_TOKENS.findall(chunk)
                if counts:
                    n = int(counts[-1])
                    if c.counting:
                        c.tokens += n - seen
                        c.events += chunk.count(b"data: {")
                    seen = n
                if b"data: [DONE]" in chunk:
                    done = True
            if done:
                # read the terminating zero-size chunk
                while True:
                    line = await reader.readline()
                    if not line or line.strip() == b"0":
                        await reader.readline()
                        break
            if c.counting:
                c.completions += 1
        except (OSError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            c.errors += 1 if c.counting else 0
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.2)
    if writer is not None:
        writer.close()


async def _tick(path: str, every: float, c: Counters) -> None:
    with open(path, "a", buffering=1) as fh:
        while True:
            fh.write(f"{time.time():.3f} {c.tokens} {c.completions} {c.errors} {c.events}\n")
            await asyncio.sleep(every)


#: Sent with --traceparent: every completion joins one (sampled) trace, as when the caller's client is traced.
TRACEPARENT = "00-5e1f0c2b9a8d4e6f8a7b6c5d4e3f2a1b-1a2b3c4d5e6f7a8b-01"


async def run_load(
    url: str,
    model: str,
    streams: int,
    duration: float,
    warmup: float,
    max_tokens: int,
    traceparent: bool = False,
    spread: float = 0.0,
    seed: int = 0,
    ticks: str | None = None,
    tick_every: float = 0.5,
) -> dict:
    """``spread`` > 0 draws each completion's length uniformly from max_tokens * (1 +- spread) (same mean): with
    every stream the same length, all streams end together and restart together, and tokens/s in a window
    depends on where in that wave the window falls."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lengths = sorted({max(1, round(max_tokens * (1 + spread * (2 * i / 15 - 1)))) for i in range(16)}) if spread > 0 else [max_tokens]
    requests = []
    for n in lengths:
        body = json.dumps(
            {
                "model": model,
                "prompt": "Once upon a time",
                "max_tokens": n,
                "temperature": 1.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }  # fmt: skip
        ).encode()
        requests.append(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n"
                + (f"traceparent: {TRACEPARENT}\r\n" if traceparent else "")
                + "\r\n"
            ).encode()
            + body
        )
    c = Counters()
    stop = asyncio.Event()
    rng = random.Random(seed)
    tasks = [asyncio.create_task(_worker(host, port, requests, c, stop, random.Random(rng.random()))) for _ in range(streams)]
    await asyncio.sleep(warmup)
    c.counting = True
    t0 = time.perf_counter()
    ticker = asyncio.create_task(_tick(ticks, tick_every, c)) if ticks else None
    await asyncio.sleep(duration)
    c.counting = False
    if ticker is not None:
        ticker.cancel()
    seconds = time.perf_counter() - t0
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "streams": streams,
        "tokens": c.tokens,
        "seconds": seconds,
        "tokens_per_s": c.tokens / seconds if seconds else 0.0,
        "events": c.events,
        "completions": c.completions,
        "errors": c.errors,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.0, help="completion lengths uniform in max_tokens * (1 +- spread)")
    p.add_argument("--traceparent", action="store_true", help="send a W3C traceparent with every completion")
    p.add_argument("--ticks", default=None, help="append 'unix_time tokens completions errors events' lines here while measuring")
    p.add_argument("--tick-every", type=float, default=0.5, help="seconds between --ticks lines")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(
        run_load(
            a.url, a.model, a.streams, a.duration, a.warmup, a.max_tokens, a.traceparent, a.spread, ticks=a.ticks, tick_every=a.tick_every
        )
    )
    with open(a.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
