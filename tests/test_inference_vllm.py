"""The inference side against a real vLLM server on CPU (one ``weightwatch serve`` per test session).

Requests have prime-rl's shapes: ``POST /update_weights {"weight_dir": ...}`` and ``POST /reload_weights``.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from weightwatch import events

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "Once upon a time there was"


def _complete(server, max_tokens: int = 12) -> dict:
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": server.model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"], "logprobs": choice["logprobs"]["token_logprobs"]}


def _perturbed(server, name: str, scale: float = 0.5, seed: int = 1) -> Path:
    """A checkpoint step dir inside the weights root: the tiny model's tensors plus noise."""
    import torch
    from safetensors.torch import load_file, save_file

    out = server.weights_root / name
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(server.model_dir / "model.safetensors"))
    noisy = {k: (v + scale * torch.randn(v.shape, generator=gen)).contiguous() for k, v in tensors.items()}
    save_file(noisy, str(out / "model.safetensors"))
    return out


def _admin(
    server, path: str, body: dict | None = None, *, lane: bool = False, headers: dict | None = None, token: bool = True
) -> httpx.Response:
    base = server.admin_url if lane else server.base_url
    h = dict(server.admin_headers() if token else {})
    h.update(headers or {})
    kwargs = {"json": body} if body is not None else {}
    return httpx.post(f"{base}{path}", headers=h, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def original(vllm_server) -> dict:
    r = _admin(vllm_server, "/reload_weights")
    assert r.status_code == 200, r.text
    return _complete(vllm_server)


@pytest.mark.parametrize("lane", [False, True], ids=["main-port", "admin-lane"])
def test_update_changes_weights_and_reload_restores_them(vllm_server, original, lane):
    step = _perturbed(vllm_server, "step_1")
    r = _admin(vllm_server, "/update_weights", {"weight_dir": str(step)}, lane=lane)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rpc_ms"] > 0 and body["server_ms"] >= body["rpc_ms"]
    timing = r.headers["server-timing"]
    assert f"rpc;dur={body['rpc_ms']}" in timing and f"server;dur={body['server_ms']}" in timing
    updated = _complete(vllm_server)
    assert updated["tokens"] != original["tokens"] or updated["logprobs"] != pytest.approx(original["logprobs"], abs=1e-3)

    r = _admin(vllm_server, "/reload_weights", lane=lane)  # prime-rl sends no body
    assert r.status_code == 200, r.text
    restored = _complete(vllm_server)
    assert restored["tokens"] == original["tokens"]
    assert restored["logprobs"] == pytest.approx(original["logprobs"], abs=1e-4)


def _read_spans(path: Path, trace_id: str, want: set[str], timeout: float = 15.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while time.monotonic() < deadline:
        found = {}
        if path.exists():
            for line in path.read_text().splitlines():
                span = json.loads(line)
                if span["trace_id"] == trace_id:
                    found[span["name"]] = span
        if want <= set(found):
            return found
        time.sleep(0.25)
    raise AssertionError(f"spans {want - set(found)} of trace {trace_id} not in {path} after {timeout} s")


@pytest.mark.parametrize("lane", [False, True], ids=["main-port", "admin-lane"])
def test_traceparent_joins_spans_events_and_exemplars(vllm_server, original, lane):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    r = _admin(vllm_server, "/reload_weights", lane=lane, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert r.status_code == 200, r.text

    # Exemplars first: a later request would replace the bucket's exemplar.
    metrics = httpx.get(vllm_server.metrics_url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=30)
    assert metrics.headers["content-type"].startswith("application/openmetrics-text")
    for name in ("rl_admin_rpc_seconds_bucket", "rl_admin_server_seconds_bucket"):
        hits = [
            line
            for line in metrics.text.splitlines()
            if line.startswith(name) and 'op="reload_weights"' in line and f'trace_id="{trace_id}"' in line
        ]
        assert hits, f"no {name} exemplar with trace id {trace_id}"
    assert "vllm:num_requests_running" in metrics.text and "# TYPE vllm:num_requests_running gauge" in metrics.text

    spans = _read_spans(vllm_server.span_path, trace_id, {"admin.request", "engine.rpc"})
    assert spans["admin.request"]["parent_span_id"] == parent_id
    assert spans["admin.request"]["kind"] == "server"
    assert spans["engine.rpc"]["parent_span_id"] == spans["admin.request"]["span_id"]
    assert spans["admin.request"]["attributes"]["rl.server_ms"] == r.json()["server_ms"]

    lines = [events.parse_line(line) for line in vllm_server.log_path.read_text().splitlines() if trace_id in line]
    keys = [e.key for e in lines if isinstance(e, events.Event)]
    assert keys == ["weights.server.recv", "weights.rpc.start", "weights.rpc.done"]
    assert [e.tid for e in lines] == [trace_id] * 3
    done = lines[2]
    assert done["rpc_ms"] == pytest.approx(r.json()["rpc_ms"], abs=0.01)
    assert lines[0]["t"] <= lines[1]["t"] <= done["t"]


def _bad_dirs(server) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    root = server.weights_root
    made: dict[str, Path] = {}
    empty = root / "bad_empty"
    empty.mkdir(exist_ok=True)
    made["empty"] = empty
    wrong = root / "bad_shape"
    wrong.mkdir(exist_ok=True)
    save_file({"model.embed_tokens.weight": torch.zeros(7, 3)}, str(wrong / "model.safetensors"))
    made["shape"] = wrong
    trunc = root / "bad_truncated"
    trunc.mkdir(exist_ok=True)
    data = (server.model_dir / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    made["truncated"] = trunc
    outside = server.weights_root.parent / "outside_root"
    outside.mkdir(exist_ok=True)
    shutil.copy(server.model_dir / "model.safetensors", outside / "model.safetensors")
    made["outside"] = outside
    link = root / "bad_symlink"
    if not link.exists():
        link.symlink_to(outside)
    made["symlink"] = link
    return made


def test_generation_requests_are_traced_when_their_caller_is(vllm_server, original):
    """Default policy: a completion that arrives with a traceparent gets a server span under the caller's span;
    one without gets none (and is served the same)."""
    traced_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": vllm_server.model_name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, "stream": True}
    with httpx.stream(
        "POST", f"{vllm_server.base_url}/v1/completions", json=body, headers={"traceparent": f"00-{traced_id}-{parent_id}-01"}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        streamed = [line for line in resp.iter_lines() if line.startswith("data: {")]
    assert len(streamed) >= 12
    spans = _read_spans(vllm_server.span_path, traced_id, {"POST /v1/completions"})
    server_span = spans["POST /v1/completions"]
    assert server_span["kind"] == "server" and server_span["parent_span_id"] == parent_id
    assert server_span["attributes"]["http.status_code"] == 200

    before = vllm_server.span_path.read_text().count('"POST /v1/completions"')
    assert _complete(vllm_server) == original  # no traceparent: served as always, not traced
    # A later traced request (whose span we wait for) proves the exporter flushed everything before it.
    marker_id = secrets.token_hex(16)
    httpx.get(f"{vllm_server.base_url}/v1/models", headers={"traceparent": f"00-{marker_id}-{secrets.token_hex(8)}-01"}, timeout=30)
    _read_spans(vllm_server.span_path, marker_id, {"GET /v1/models"})
    assert vllm_server.span_path.read_text().count('"POST /v1/completions"') == before


def test_bad_inputs_get_their_status_and_completions_keep_working(vllm_server, original):
    bad = _bad_dirs(vllm_server)
    url = f"{vllm_server.base_url}/update_weights"
    auth = vllm_server.admin_headers()
    cases = [
        ("no token", httpx.post(url, json={"weight_dir": str(bad["empty"])}, timeout=30), 401, "missing admin token"),
        (
            "wrong token",
            httpx.post(url, json={"weight_dir": "x"}, headers={"Authorization": "Bearer nope"}, timeout=30),
            401,
            "wrong admin token",
        ),
        ("reload without token", httpx.post(f"{vllm_server.base_url}/reload_weights", timeout=30), 401, "missing admin token"),
        ("malformed json", httpx.post(url, content=b"{not json", headers=auth, timeout=30), 400, "not valid JSON"),
        ("not an object", httpx.post(url, json=["x"], headers=auth, timeout=30), 400, "must be a JSON object"),
        ("no body", httpx.post(url, headers=auth, timeout=30), 400, "missing JSON body"),
        ("no weight_dir", httpx.post(url, json={"path": "x"}, headers=auth, timeout=30), 400, '"weight_dir"'),
        (
            "missing dir",
            httpx.post(url, json={"weight_dir": str(vllm_server.weights_root / "nope")}, headers=auth, timeout=30),
            400,
            "does not exist",
        ),
        (
            "outside root",
            httpx.post(url, json={"weight_dir": str(bad["outside"])}, headers=auth, timeout=30),
            400,
            "outside the weights root",
        ),
        (
            "symlink escape",
            httpx.post(url, json={"weight_dir": str(bad["symlink"])}, headers=auth, timeout=30),
            400,
            "outside the weights root",
        ),
        ("no safetensors", httpx.post(url, json={"weight_dir": str(bad["empty"])}, headers=auth, timeout=30), 400, "no *.safetensors"),
        (
            "wrong tensors",
            httpx.post(url, json={"weight_dir": str(bad["shape"])}, headers=auth, timeout=30),
            400,
            "does not fit the served model",
        ),
        ("truncated file", httpx.post(url, json={"weight_dir": str(bad["truncated"])}, headers=auth, timeout=30), 400, "truncated"),
    ]
    for name, resp, status, reason in cases:
        assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text}"
        assert reason in resp.json()["error"], f"{name}: {resp.text}"
        if status == 401:
            assert resp.headers.get("www-authenticate", "").startswith("Bearer")
    # The token guards the admin paths only: vLLM's own endpoints answer without it.
    assert httpx.get(f"{vllm_server.base_url}/v1/models", timeout=30).status_code == 200
    assert _complete(vllm_server) == original


def test_engine_error_is_5xx_with_the_cause_and_the_server_keeps_serving(vllm_server, original):
    # Valid tensors, but the index names a shard that is not there: only the engine (vLLM's loader) sees it.
    bad = vllm_server.weights_root / "bad_index"
    bad.mkdir(exist_ok=True)
    shutil.copy(vllm_server.model_dir / "model.safetensors", bad / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    weight_map = {k: ("model.safetensors" if i % 2 else "model-00002-of-00002.safetensors") for i, k in enumerate(keys)}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    assert _admin(vllm_server, "/reload_weights").status_code == 200
    trace_id = secrets.token_hex(16)
    r = _admin(
        vllm_server, "/update_weights", {"weight_dir": str(bad)}, headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    )
    assert r.status_code == 500, r.text
    assert "missing" in r.json()["error"] and "reload_weights failed" in r.json()["error"]
    assert r.json()["restored_weights"] == str(vllm_server.model_dir)
    spans = _read_spans(vllm_server.span_path, trace_id, {"admin.request", "engine.rpc", "engine.rpc.restore"})
    assert spans["admin.request"]["status"] == "error"
    assert spans["engine.rpc.restore"]["attributes"]["rl.weights_path"] == str(vllm_server.model_dir)
    assert httpx.get(f"{vllm_server.base_url}/health", timeout=30).status_code == 200
    assert _complete(vllm_server) == original


def test_concurrent_updates_never_overlap(vllm_server, original):
    """Many simultaneous updates on both listeners: each is 200 or 409, and engine calls never interleave."""
    step = _perturbed(vllm_server, "step_1")
    barrier = threading.Barrier(8)
    results: list[int] = []
    lock = threading.Lock()

    def fire(i: int) -> None:
        barrier.wait()
        path, body = ("/update_weights", {"weight_dir": str(step)}) if i % 2 else ("/reload_weights", None)
        code = _admin(vllm_server, path, body, lane=bool(i % 4 < 2)).status_code
        with lock:
            results.append(code)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(8)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(results) <= {200, 409} and 200 in results, results
    conflicts = [r for r in results if r == 409]
    # The log proves mutual exclusion: between an rpc.start and its rpc.done no other rpc.start.
    spans = []
    for line in vllm_server.log_path.read_text().splitlines():
        e = events.parse_line(line)
        if isinstance(e, events.Event) and e.key in ("weights.rpc.start", "weights.rpc.done") and e["t"] >= start:
            spans.append(e.key)
    assert spans == ["weights.rpc.start", "weights.rpc.done"] * (len(results) - len(conflicts))
    assert _admin(vllm_server, "/reload_weights").status_code == 200
    assert _complete(vllm_server) == original


def test_vllm_endpoints_lane_and_server_metrics(vllm_server, original):
    assert httpx.get(f"{vllm_server.admin_url}/health", timeout=30).json() == {"status": "ok", "lane": "admin"}
    # The lane serves the admin API only; generation stays on the main port.
    assert httpx.post(f"{vllm_server.admin_url}/v1/completions", json={}, timeout=30).status_code == 404
    models = httpx.get(f"{vllm_server.base_url}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == vllm_server.model_name
    text = httpx.get(vllm_server.metrics_url, timeout=30).text  # classic text format for old scrapers
    assert "vllm:num_requests_running" in text
    for name in ("rl_event_loop_lag_seconds_count", "rl_http_inflight_requests", "rl_admin_server_seconds_count"):
        assert name in text, name
    lag_count = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("rl_event_loop_lag_seconds_count")]
    assert lag_count and lag_count[0] > 0


def test_engine_processes_keep_their_priority_unless_asked(vllm_server):
    """Engine renicing is opt-in (``--engine-nice``): by default vLLM's EngineCore and workers run at the API server's priority."""
    import os

    from weightwatch.inference.engine_priority import descendants

    api = next(p for p in descendants(vllm_server.proc.pid) if b"api_server" in Path(f"/proc/{p}/cmdline").read_bytes())
    engine = descendants(api)
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in engine}
    # /proc/PID/comm is cut at 15 characters: "VLLM::EngineCore" reads "VLLM::EngineCor"
    assert any("EngineCor" in n for n in names.values()), names

    def nice(pid: int) -> set[int]:
        return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}

    api_nice = nice(api)
    assert len(api_nice) == 1
    for pid, name in names.items():
        if "EngineCor" in name or "Worker" in name:
            assert nice(pid) == api_nice, (name, nice(pid), api_nice)
    # and the server still generates
    assert _complete(vllm_server, max_tokens=4)["tokens"]
