"""A lean streaming load generator: N concurrent streaming /v1/completions, in its own process.

Raw asyncio streams and no JSON parsing (it counts SSE ``data:`` events), so on a 2-core machine the
client costs as little CPU as possible and the server's behaviour is what gets measured. Each of the N
workers keeps one keep-alive connection and sends a new completion as soon as the last one ends.

    python benchmarks/bench_inference_load.py --url http://127.0.0.1:8000 --model DIR --streams 256 \
        --duration 60 --out load.json

Writes {"tokens": ..., "seconds": ..., "tokens_per_s": ..., "completions": ..., "errors": ...} for the
measurement window (after --warmup seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


class Counters:
    def __init__(self) -> None:
        self.tokens = 0
        self.completions = 0
        self.errors = 0
        self.counting = False


async def _worker(host: str, port: int, request: bytes, c: Counters, stop: asyncio.Event) -> None:
    reader = writer = None
    while not stop.is_set():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            if b" 200 " not in status:
                raise ConnectionError(status.decode(errors="replace").strip())
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # headers; the body is chunked SSE
            done = False
            while not done:
                size_line = await reader.readline()
                if not size_line:
                    raise ConnectionError("connection closed mid-stream")
                size = int(size_line.strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    break
                chunk = await reader.readexactly(size + 2)
                if c.counting:
                    c.tokens += chunk.count(b"data: {")
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


async def run_load(url: str, model: str, streams: int, duration: float, warmup: float, max_tokens: int) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps(
        {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True, "stream": True}
    ).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode() + body
    c = Counters()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_worker(host, port, request, c, stop)) for _ in range(streams)]
    await asyncio.sleep(warmup)
    c.counting = True
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    c.counting = False
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
    p.add_argument("--out", required=True)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run_load(a.url, a.model, a.streams, a.duration, a.warmup, a.max_tokens))
    with open(a.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
