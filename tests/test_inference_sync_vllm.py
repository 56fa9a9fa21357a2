"""The weight sync of today (pause -> update -> resume) against a real vLLM server on CPU, on both listeners.

One shared session server (``vllm_server``: admin lane, token, weights root). Streams run from their own
httpx client while the admin calls go out as prime-rl sends them, with no VLLM_SERVER_DEV_MODE.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from pathlib import Path

import httpx
import pytest

from weightwatch import events
from weightwatch.contracts import ADMIN_PATHS, IS_PAUSED_PATH, LIVENESS_PATH

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "Once upon a time there was"
LANES = pytest.mark.parametrize("lane", [False, True], ids=["main-port", "admin-lane"])


def _base(server, lane: bool) -> str:
    return server.admin_url if lane else server.base_url


# One client for the admin calls, made before any stream starts, as an orchestrator keeps its own (kept
# connections, nothing built per call). On a host whose cores vLLM saturates, pauses sent from this process
# (whose threads read the streams) were seen to reach the server up to a whole 2 s stream late, with per-call
# clients more often than with a kept one; the tests do not rely on the timing: the server's count decides.
_ADMIN_HTTP = httpx.Client(timeout=120)


def _post(server, path: str, *, lane: bool, json_body: dict | None = None, params: dict | None = None, headers: dict | None = None):
    h = {**server.admin_headers(), **(headers or {})}
    return _ADMIN_HTTP.post(f"{_base(server, lane)}{path}", json=json_body, params=params, headers=h)


def _get(server, path: str, *, lane: bool, headers: dict | None = None):
    return _ADMIN_HTTP.get(f"{_base(server, lane)}{path}", headers={**server.admin_headers(), **(headers or {})}, timeout=60)


def _is_paused(server, lane: bool) -> bool:
    r = _get(server, IS_PAUSED_PATH, lane=lane)
    assert r.status_code == 200, r.text
    return r.json()["is_paused"]


def _complete(server, max_tokens: int = 8) -> list[str]:
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _metric(server, name: str, **labels: str) -> float | None:
    text = httpx.get(server.metrics_url, timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([^{\s]+)(?:\{([^}]*)\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p and not p.startswith("le=")))
        if not labels or got == want:
            return float(m.group(3))
    return None


def _checkpoint(server, name: str, scale: float = 0.3, seed: int = 3) -> Path:
    """A checkpoint step dir inside the weights root: the tiny model's tensors plus noise."""
    import torch
    from safetensors.torch import load_file, save_file

    out = server.weights_root / name
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(server.model_dir / "model.safetensors"))
    save_file(
        {k: (v + scale * torch.randn(v.shape, generator=gen)).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors")
    )
    return out


class Streams:
    """Streaming completions on their own httpx client and threads, counting the chunks each one receives."""

    def __init__(self, server, n: int, max_tokens: int):
        self.server, self.n, self.max_tokens = server, n, max_tokens
        self.chunks = [0] * n
        self.finish: list[str | None] = [None] * n
        self.errors: list[str] = []
        self.started = threading.Barrier(n + 1, timeout=60)
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        self._client = httpx.Client(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=n + 2))

    def _run(self, i: int) -> None:
        body = {
            "model": self.server.model_name,
            "prompt": PROMPT,
            "max_tokens": self.max_tokens,
            "temperature": 1.0,
            "ignore_eos": True,
            "stream": True,
        }
        first = True
        try:
            with self._client.stream("POST", f"{self.server.base_url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    self.errors.append(f"{i}: status {resp.status_code}")
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    self.chunks[i] += 1
                    reason = json.loads(line[6:])["choices"][0].get("finish_reason")
                    if reason:
                        self.finish[i] = reason
                    if first:
                        first = False
                        self.started.wait()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{i}: {type(exc).__name__}: {exc}")
        finally:
            if first:
                try:
                    self.started.wait()
                except threading.BrokenBarrierError:
                    pass

    def __enter__(self) -> Streams:
        for t in self._threads:
            t.start()
        self.started.wait()  # every stream has its first chunk: they are running in the engine
        return self

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "streams still running"

    def __exit__(self, *exc) -> None:
        self.join()
        self._client.close()


@pytest.fixture
def resumed(vllm_server):
    """Whatever a test does, the shared server is resumed (and serves its own weights) afterwards."""
    yield vllm_server
    _post(vllm_server, "/resume", lane=False)
    _post(vllm_server, "/reload_weights", lane=False)


def _pause_with_streams_held(server, lane: bool, headers: dict, n: int = 4, attempts: int = 8):
    """Start ``n`` streams and pause (keep) while some are still generating; returns (streams, pause answer, held).

    Stream starts spread out on a busy host and a short stream can finish before the pause lands; such an
    attempt (nothing held) is resumed and tried again with fresh streams.
    """
    for _ in range(attempts):
        streams = Streams(server, n, max_tokens=480).__enter__()
        r = _post(server, "/pause", lane=lane, params={"mode": "keep", "clear_cache": "false"}, headers=headers)
        assert r.status_code == 200, r.text
        held = [i for i in range(n) if streams.finish[i] is None]
        if r.json()["inflight"] >= 1 and held:
            return streams, r, held
        assert _post(server, "/resume", lane=lane).status_code == 200
        streams.__exit__(None, None, None)
    pytest.fail(f"no stream was still generating when the pause took effect, {attempts} attempts")


@LANES
def test_prime_rl_sequence_holds_streams_and_resumes_them(resumed, lane):
    server = resumed
    step = _checkpoint(server, "sync_step_1")
    trace_id = secrets.token_hex(16)
    tp = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    n = 4
    streams, r, held = _pause_with_streams_held(server, lane, tp, n)
    try:
        body = r.json()
        assert body["status"] == "ok" and body["op"] == "pause" and body["paused"] is True and body["mode"] == "keep"
        assert body["already_paused"] is False
        assert body["server_ms"] >= body["rpc_ms"] > 0
        assert f"server;dur={body['server_ms']}" in r.headers["server-timing"]
        assert _is_paused(server, lane) is True
        assert _metric(server, "rl_engine_paused") == 1.0
        counts = [streams.chunks[i] for i in held]
        time.sleep(1.0)
        assert [streams.chunks[i] for i in held] == counts, "keep mode: no held stream may advance while paused"

        r = _post(server, "/update_weights", lane=lane, json_body={"weight_dir": str(step)}, headers=tp)
        assert r.status_code == 200, r.text
        assert r.json()["weights_path"] == str(step) and r.json()["method"] == "reload_weights"

        r = _post(server, "/resume", lane=lane, headers=tp)
        assert r.status_code == 200, r.text
        assert r.json()["op"] == "resume" and r.json()["paused_ms"] >= 1000.0
    finally:
        streams.__exit__(None, None, None)
    assert not streams.errors, streams.errors
    assert streams.finish == ["length"] * n, "every stream, held ones too, runs to its full length after the resume"
    assert _is_paused(server, lane) is False
    assert _metric(server, "rl_engine_paused") == 0.0
    for op in ("pause", "update_weights", "resume", "is_paused"):
        assert (_metric(server, "rl_admin_server_seconds_count", op=op) or 0) >= 1, op
        assert (_metric(server, "rl_admin_rpc_seconds_count", op=op) or 0) >= 1, op
    assert (_metric(server, "rl_engine_paused_seconds_count") or 0) >= 1
    assert (_metric(server, "rl_engine_pause_inflight_requests_count") or 0) >= 1

    # One trace: each admin.request has its engine.rpc child; the log has the per-call events with op=.
    deadline = time.monotonic() + 15
    spans: list[dict] = []
    while time.monotonic() < deadline:
        spans = [json.loads(line) for line in server.span_path.read_text().splitlines() if trace_id in line]
        if sum(s["name"] == "engine.rpc" for s in spans) >= 3:
            break
        time.sleep(0.25)
    requests = {s["attributes"]["rl.op"]: s for s in spans if s["name"] == "admin.request"}
    assert set(requests) == {"pause", "update_weights", "resume"}
    for op, req in requests.items():
        children = [s for s in spans if s["name"] == "engine.rpc" and s["parent_span_id"] == req["span_id"]]
        assert [c["attributes"]["rl.op"] for c in children] == [op]
    lines = [events.parse_line(x) for x in server.log_path.read_text().splitlines() if trace_id in x]
    seen = [(e.key, e.fields.get("op") or e.fields.get("path")) for e in lines if isinstance(e, events.Event)]
    # A pause that held nothing was retried under the same trace (a busy host): the sequence starts at the last pause.
    seen = seen[max(i for i, x in enumerate(seen) if x == ("weights.server.recv", "/pause")) :]
    assert seen == [
        ("weights.server.recv", "/pause"), ("weights.rpc.start", "pause"), ("weights.rpc.done", "pause"),
        ("weights.server.recv", "/update_weights"), ("weights.rpc.start", "update_weights"), ("weights.rpc.done", "update_weights"),
        ("weights.server.recv", "/resume"), ("weights.rpc.start", "resume"), ("weights.rpc.done", "resume"),
    ]  # fmt: skip


@LANES
def test_failed_update_still_resumes_and_generation_continues(resumed, lane):
    server = resumed
    assert _post(server, "/pause", lane=lane).status_code == 200  # prime-rl's defaults: keep, no cache clear
    outside = server.weights_root.parent / "sync_outside"
    outside.mkdir(exist_ok=True)
    r = _post(server, "/update_weights", lane=lane, json_body={"weight_dir": str(outside)})
    assert r.status_code == 400 and "outside the weights root" in r.json()["error"]
    r = _post(server, "/resume", lane=lane)
    assert r.status_code == 200 and r.json()["paused_ms"] > 0
    assert _is_paused(server, lane) is False
    assert len(_complete(server)) == 8


@LANES
def test_resume_without_pause_and_pause_twice_are_harmless(resumed, lane):
    server = resumed
    r = _post(server, "/resume", lane=lane)
    assert r.status_code == 200 and r.json()["paused_ms"] is None
    first = _post(server, "/pause", lane=lane, json_body={"mode": "keep", "clear_cache": False})
    again = _post(server, "/pause", lane=lane)
    assert first.status_code == again.status_code == 200
    assert first.json()["already_paused"] is False and again.json()["already_paused"] is True
    r = _post(server, "/resume", lane=lane)
    assert r.status_code == 200 and r.json()["paused_ms"] > 0
    assert _post(server, "/resume", lane=lane).json()["paused_ms"] is None
    assert len(_complete(server)) == 8


def test_pause_wait_lets_streams_finish_and_abort_ends_them(resumed):
    server = resumed
    with Streams(server, 2, 60) as streams:
        r = _post(server, "/pause", lane=True, params={"mode": "wait"})
        assert r.status_code == 200, r.text
        assert streams.finish == ["length", "length"], "wait: the running requests finish before the pause answers"
    assert _post(server, "/resume", lane=True).status_code == 200

    # The abort must land mid-stream. Sent straight at running streams it races them, and the client cannot
    # tell: on a busy host a stream's chunks reach the reading thread in bursts, so "the first chunk has
    # arrived" may mean "the engine is done". The server's own count decides: the streams are held with a
    # keep pause on the lane, and only when that pause held both (inflight == 2) is the abort sent, on the
    # main port; held requests must then end as aborted. A host too slow to hold them is tried again.
    for _attempt in range(6):
        with Streams(server, 2, 480) as streams:
            held = _post(server, "/pause", lane=True, params={"mode": "keep"})
            assert held.status_code == 200, held.text
            if held.json()["inflight"] == 2:
                r = _post(server, "/pause", lane=False, params={"mode": "abort"})
                assert r.status_code == 200 and r.json()["already_paused"] is True, r.text
            else:
                assert _post(server, "/resume", lane=True).status_code == 200
            streams.join(60)
        if held.json()["inflight"] == 2:
            break
    else:
        pytest.fail("in 6 attempts a keep pause on the lane never held both running streams (they finished first every time)")
    assert streams.finish == ["abort", "abort"], streams.finish
    assert all(0 < c < 480 for c in streams.chunks), streams.chunks
    assert _post(server, "/resume", lane=False).status_code == 200
    assert len(_complete(server)) == 8


@LANES
def test_bad_input_is_4xx_and_every_admin_path_needs_the_token(resumed, lane):
    server = resumed
    r = _post(server, "/pause", lane=lane, params={"mode": "sideways"})
    assert r.status_code == 400 and "mode must be one of keep, wait, abort" in r.json()["error"]
    r = _post(server, "/pause", lane=lane, params={"clear_cache": "perhaps"})
    assert r.status_code == 400 and "clear_cache" in r.json()["error"]
    r = httpx.post(f"{_base(server, lane)}/pause", content=b"{nope", headers=server.admin_headers(), timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert _is_paused(server, lane) is False, "a refused pause pauses nothing"
    for path in sorted(ADMIN_PATHS):
        method = "GET" if path in (IS_PAUSED_PATH, LIVENESS_PATH) else "POST"
        r = httpx.request(method, f"{_base(server, lane)}{path}", timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert "server_ms" in r.json() and "server;dur=" in r.headers["server-timing"]
    assert len(_complete(server)) == 8


@LANES
def test_update_info_reaches_vllms_weight_transfer_engine(resumed, lane):
    server = resumed
    r = _post(
        server, "/update_weights", lane=lane, json_body={"update_info": {"names": ["x"], "dtype_names": ["float32"], "shapes": [[1]]}}
    )
    # The server was started without --weight-transfer-config: vLLM's worker says so; weightwatch passes it on.
    assert r.status_code == 500, r.text
    assert "Weight transfer not configured" in r.json()["error"] and "update_weights(update_info)" in r.json()["error"]
    assert r.json()["rpc_ms"] > 0
    r = _post(server, "/update_weights", lane=lane, json_body={"update_info": "all of it"})
    assert r.status_code == 400 and "update_info" in r.json()["error"]
    r = _post(server, "/update_weights", lane=lane, json_body={"update_info": {}, "weight_dir": "/x"})
    assert r.status_code == 400 and "not both" in r.json()["error"]
    assert len(_complete(server)) == 8


@LANES
def test_load_lora_adapter_without_lora_is_a_clear_400(resumed, lane):
    server = resumed
    adapter = server.weights_root / "adapter"
    adapter.mkdir(exist_ok=True)
    r = _post(server, "/load_lora_adapter", lane=lane, json_body={"lora_name": "policy", "lora_path": str(adapter)})
    assert r.status_code == 400 and "LoRA is not enabled" in r.json()["error"]
    r = _post(server, "/load_lora_adapter", lane=lane, json_body={"lora_name": "policy"})
    assert r.status_code == 400 and "lora_path" in r.json()["error"]
    r = _post(server, "/load_lora_adapter", lane=lane, json_body={"lora_name": "policy", "lora_path": "/etc"})
    assert r.status_code == 400 and "outside the weights root" in r.json()["error"]


@LANES
def test_liveness_is_an_engine_round_trip(resumed, lane):
    r = _get(resumed, LIVENESS_PATH, lane=lane)
    assert r.status_code == 200, r.text
    assert r.json()["alive"] is True and r.json()["rpc_ms"] > 0 and r.json()["server_ms"] >= r.json()["rpc_ms"]
    assert (_metric(resumed, "rl_admin_rpc_seconds_count", op="liveness") or 0) >= 1
