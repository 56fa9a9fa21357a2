"""Join the halves of each weight update by trace id: the orchestrator's client.send/client.done and
the server's server.recv/rpc.start/rpc.done (or the same from span files).

One trace id covers one update of all servers (one child span per server), so a client half is keyed
by (trace id, server); server halves are told apart by the log (process) they come from and matched
to client halves by the server's reported rpc_ms, then by order. Halves that find no partner stay, with
what is missing named.

The common case (one send and one done per trace id in one orchestrator log, nothing else) is joined
column-wise with dicts and C-level maps; everything else goes through ``Update`` objects. Both end as
row tuples (``ROW_FIELDS``), the representation the report works on.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from itertools import repeat
from typing import Any

from weightwatch.analysis.collect import Partial
from weightwatch.analysis.rules import HEALTHY, Diagnosis, diagnose, signature_of

CLIENT_EVENTS = ("client.send", "client.done")
SERVER_EVENTS = ("server.recv", "rpc.start", "rpc.done")

ROW_FIELDS = (
    "tid", "server", "op", "step", "t", "attempts", "wall_ms", "queue_ms", "rpc_ms", "server_rpc_ms", "server_ms",
    "pool_wait_ms", "recv_delay_ms", "recv_t", "rpc_start_t", "missing", "client_source", "server_source",
    "client_seq", "ckpt_wait_ms", "ckpt_step", "signature",
)
R = {name: i for i, name in enumerate(ROW_FIELDS)}
R_T, R_WALL, R_QUEUE, R_RPC, R_MISSING, R_RECV_T, R_SIG = R["t"], R["wall_ms"], R["queue_ms"], R["rpc_ms"], R["missing"], R["recv_t"], R["signature"]


class Update:
    """One weight update of one server, joined from whatever halves were found."""

    __slots__ = (*ROW_FIELDS, "around")

    def __init__(self, tid: str) -> None:
        self.tid = tid
        self.server: str | None = None
        self.op: str | None = None
        self.step: int | None = None
        self.t: float | None = None
        self.attempts = 0
        self.wall_ms: float | None = None
        self.queue_ms: float | None = None
        self.rpc_ms: float | None = None
        self.server_rpc_ms: float | None = None
        self.server_ms: float | None = None
        self.pool_wait_ms: float | None = None
        self.recv_delay_ms: float | None = None
        self.recv_t: float | None = None
        self.rpc_start_t: float | None = None
        self.missing: tuple[str, ...] = ()
        self.client_source: str | None = None
        self.server_source: str | None = None
        self.client_seq: int | None = None
        self.ckpt_wait_ms: float | None = None
        self.ckpt_step: int | None = None
        self.signature = HEALTHY
        self.around: list[dict[str, Any]] | None = None

    @classmethod
    def from_row(cls, row: tuple) -> Update:
        u = cls.__new__(cls)
        for name, value in zip(ROW_FIELDS, row):
            setattr(u, name, value)
        u.around = None
        return u

    def to_row(self) -> tuple:
        return tuple(getattr(self, name) for name in ROW_FIELDS)

    @property
    def start(self) -> float | None:
        """Best-known start time (epoch seconds): client.send, else server.recv."""
        return self.t if self.t is not None else self.recv_t

    def diagnosis(self) -> Diagnosis:
        """The full diagnosis with the rule that fired (built on demand: millions of updates need only the id)."""
        return diagnose(self.queue_ms, self.rpc_ms, self.ckpt_wait_ms)

    def to_dict(self) -> dict[str, Any]:
        diag = self.diagnosis()
        d = {
            "trace_id": self.tid, "server": self.server, "op": self.op, "step": self.step, "t": self.start,
            "wall_ms": self.wall_ms, "queue_ms": self.queue_ms, "rpc_ms": self.rpc_ms, "server_ms": self.server_ms,
            "server_rpc_ms": self.server_rpc_ms, "pool_wait_ms": self.pool_wait_ms,
            "recv_delay_ms": self.recv_delay_ms, "recv_delay_clock_skew_sensitive": self.recv_delay_ms is not None,
            "ckpt_wait_ms": self.ckpt_wait_ms, "ckpt_step": self.ckpt_step, "attempts": self.attempts,
            "missing": list(self.missing), "signature": self.signature, "rule": diag.rule, "also": list(diag.also),
            "client_source": self.client_source, "server_source": self.server_source,
        }
        if self.around is not None:
            d["generation_around"] = self.around
        return d


def row_start(row: tuple) -> float:
    """Sort key: best-known start time, unknown last."""
    t = row[R_T]
    if t is None:
        t = row[R_RECV_T]
    return float("inf") if t is None else t


# --------------------------------------------------------------------------- client halves


def _send_rows(p: Partial, idx: Sequence[int]) -> list[tuple]:
    s = p.send
    return [(s["seq"][i], s["tid"][i], s["server"][i], s["op"][i], s["t"][i], s["step"][i]) for i in idx]


def _done_rows(p: Partial, idx: Sequence[int]) -> list[tuple]:
    d = p.done
    return [(d["seq"][i], d["tid"][i], d["wall_ms"][i], d["rpc_ms"][i], d["queue_ms"][i], d["server"][i], d["server_ms"][i],
             d["pool_wait_ms"][i]) for i in idx]


def _client_objects(source: str, sends: list[tuple], dones: list[tuple]) -> dict[str, list[Update]]:
    """Per trace id, one Update per (tid, server) of one client source."""
    by_tid: dict[str, list[Update]] = {}
    for seq, tid, srv, op, t, step in sends:
        ups = by_tid.get(tid)
        if ups is None:
            ups = by_tid[tid] = []
        else:
            u = next((x for x in ups if x.server == srv), None)
            if u is not None:
                u.attempts += 1  # a retry to the same server
                continue
        u = Update(tid)
        u.server, u.op, u.t, u.step, u.attempts = srv, op, t, step, 1
        u.client_source, u.client_seq = source, seq
        ups.append(u)
    for seq, tid, wall, rpc, queue, srv, sms, pool in dones:
        ups = by_tid.get(tid)
        u = None
        if ups:
            open_ = [x for x in ups if x.wall_ms is None]
            if srv is not None:
                u = next((x for x in open_ if x.server == srv), None)
            elif open_:
                u = open_[0]
        else:
            ups = by_tid[tid] = []
        if u is None:
            u = Update(tid)
            u.server, u.client_source, u.client_seq = srv, source, seq
            u.missing = ("client.send",)
            ups.append(u)
        u.wall_ms, u.rpc_ms, u.queue_ms, u.pool_wait_ms = wall, rpc, queue, pool
        if sms is not None:
            u.server_ms = sms
        if queue is None and wall is not None and sms is not None:
            u.queue_ms = max(0.0, wall - sms)
    for ups in by_tid.values():
        for u in ups:
            if u.wall_ms is None and "client.send" not in u.missing:
                u.missing = u.missing + ("client.done",)
    return by_tid


class _ServerHalf:
    __slots__ = ("source", "path", "recv_t", "op", "start_t", "done_t", "rpc_ms", "server_ms")

    def __init__(self, source: str) -> None:
        self.source = source
        self.path = self.op = None
        self.recv_t = self.start_t = self.done_t = self.rpc_ms = self.server_ms = None


def _server_halves(parts: Sequence[Partial], skip: set[str] | None) -> dict[str, list[_ServerHalf]]:
    out: dict[str, list[_ServerHalf]] = {}
    for p in parts:
        mine: dict[str, _ServerHalf] = {}

        def half(tid: str, p: Partial = p, mine: dict[str, _ServerHalf] = mine) -> _ServerHalf | None:
            if skip is not None and tid in skip:
                return None
            h = mine.get(tid)
            if h is None:
                h = mine[tid] = _ServerHalf(p.source)
            return h

        for _seq, tid, path, t in p.recvs:
            if (h := half(tid)) is not None and h.recv_t is None:
                h.path, h.recv_t = path, t
        for _seq, tid, op, t in p.rpc_starts:
            if (h := half(tid)) is not None and h.start_t is None:
                h.op, h.start_t = op, t
        for _seq, tid, op, t, rpc in p.rpc_dones:
            if (h := half(tid)) is not None:
                h.op, h.done_t, h.rpc_ms = op, t, rpc
        for tid, sms in p.server_ms.items():
            if (h := half(tid)) is not None:
                h.server_ms = sms
        for tid, h in mine.items():
            out.setdefault(tid, []).append(h)
    return out


def _attach(u: Update, h: _ServerHalf | None) -> None:
    if h is None:
        u.missing = u.missing + SERVER_EVENTS
        return
    u.server_source = h.source
    u.recv_t, u.rpc_start_t, u.server_rpc_ms = h.recv_t, h.start_t, h.rpc_ms
    if h.server_ms is not None and u.server_ms is None:
        u.server_ms = h.server_ms
    missing = [e for e, v in (("server.recv", h.recv_t), ("rpc.start", h.start_t), ("rpc.done", h.done_t)) if v is None]
    u.missing = u.missing + tuple(missing)
    if u.rpc_ms is None and h.rpc_ms is not None:
        u.rpc_ms = h.rpc_ms
    if u.op is None:
        u.op = h.op
    if u.queue_ms is None and u.wall_ms is not None and u.server_ms is not None:
        u.queue_ms = max(0.0, u.wall_ms - u.server_ms)
    if u.t is not None and h.recv_t is not None:
        u.recv_delay_ms = (h.recv_t - u.t) * 1000.0


def _server_only(tid: str, h: _ServerHalf) -> Update:
    u = Update(tid)
    u.missing = CLIENT_EVENTS
    _attach(u, h)
    return u


def _pair(tid: str, ups: list[Update], hs: list[_ServerHalf] | None, out: list[Update]) -> None:
    if not hs:
        for u in ups:
            _attach(u, None)
        out.extend(ups)
        return
    if len(ups) == 1 and len(hs) == 1:
        _attach(ups[0], hs[0])
        out.append(ups[0])
        return
    free = list(hs)
    paired: set[int] = set()
    for u in ups:  # the server's rpc_ms is echoed in client.done: the best key
        m = next((h for h in free if u.rpc_ms is not None and h.rpc_ms is not None and abs(h.rpc_ms - u.rpc_ms) < 0.0015), None)
        if m is not None:
            free.remove(m)
            _attach(u, m)
            paired.add(id(u))
    for u in ups:
        if id(u) not in paired:
            _attach(u, free.pop(0) if free else None)
    out.extend(ups)
    out.extend(_server_only(tid, h) for h in free)


# --------------------------------------------------------------------------- the join


def _fast_rows(p: Partial, exclude: set[str]) -> tuple[list[tuple], list[int], list[int]]:
    """Rows of trace ids with exactly one send and one done in ``p`` and nowhere else; the rest's indices."""
    s, d = p.send, p.done
    stids, dtids = s["tid"], d["tid"]
    sidx = dict(zip(stids, range(len(stids))))
    didx = dict(zip(dtids, range(len(dtids))))
    bad = set(exclude)
    if len(sidx) != len(stids):
        bad.update(t for t, c in Counter(stids).items() if c > 1)
    if len(didx) != len(dtids):
        bad.update(t for t, c in Counter(dtids).items() if c > 1)
    if any(x is not None for x in d["server"]):
        bad.update(t for t, x in zip(dtids, d["server"]) if x is not None)
    fast = (sidx.keys() & didx.keys()) - bad
    if len(fast) == len(dtids):
        di: list[int] = list(range(len(dtids)))
    else:
        di = [i for i, t in enumerate(dtids) if t in fast]
    fast_tids = [dtids[i] for i in di] if len(di) != len(dtids) else dtids
    si = list(map(sidx.__getitem__, fast_tids))
    n = len(di)
    pick_s = lambda col: list(map(s[col].__getitem__, si))  # noqa: E731
    pick_d = (lambda col: d[col]) if n == len(dtids) else (lambda col: list(map(d[col].__getitem__, di)))  # noqa: E731
    none = repeat(None, n)
    rows = list(zip(
        fast_tids, pick_s("server"), pick_s("op"), pick_s("step"), pick_s("t"), repeat(1, n),
        pick_d("wall_ms"), pick_d("queue_ms"), pick_d("rpc_ms"), none, pick_d("server_ms"), pick_d("pool_wait_ms"),
        repeat(None, n), repeat(None, n), repeat(None, n), repeat(SERVER_EVENTS, n), repeat(p.source, n), repeat(None, n),
        pick_s("seq"), repeat(None, n), repeat(None, n), repeat(HEALTHY, n),
    ))
    rest_s = [i for i, t in enumerate(stids) if t not in fast] if len(fast) != len(stids) else []
    rest_d = [i for i, t in enumerate(dtids) if t not in fast] if n != len(dtids) else []
    return rows, rest_s, rest_d


def join_rows(parts: Sequence[Partial]) -> list[tuple]:
    """All updates of the run as rows: log halves first, span files filling trace ids the logs do not cover."""
    logs = [p for p in parts if p.origin == "log"]
    spans = [p for p in parts if p.origin == "spans"]
    servers = _server_halves(logs, None)
    client_logs = [p for p in logs if p.send["tid"] or p.done["tid"]]
    # trace ids seen by more than one client source, or with a server half, take the general path
    shared: set[str] = set(servers)
    if len(client_logs) > 1:
        seen: Counter[str] = Counter()
        for p in client_logs:
            seen.update(set(p.send["tid"]) | set(p.done["tid"]))
        shared.update(t for t, c in seen.items() if c > 1)
    rows: list[tuple] = []
    objects: list[Update] = []
    clients: dict[str, list[Update]] = {}
    for p in client_logs:
        fast, rest_s, rest_d = _fast_rows(p, shared)
        rows.extend(fast)
        for tid, ups in _client_objects(p.source, _send_rows(p, rest_s), _done_rows(p, rest_d)).items():
            clients.setdefault(tid, []).extend(ups)
    log_client_tids = set(clients)
    for p in client_logs:
        log_client_tids.update(p.done["tid"])
        log_client_tids.update(p.send["tid"])
    for p in spans:
        if not (p.send["tid"] or p.done["tid"]):
            continue
        keep_s = [i for i, t in enumerate(p.send["tid"]) if t not in log_client_tids]
        keep_d = [i for i, t in enumerate(p.done["tid"]) if t not in log_client_tids]
        for tid, ups in _client_objects(p.source, _send_rows(p, keep_s), _done_rows(p, keep_d)).items():
            clients.setdefault(tid, []).extend(ups)
    if spans:
        servers.update(_server_halves(spans, set(servers)))
    for tid, ups in clients.items():
        _pair(tid, ups, servers.pop(tid, None), objects)
    if spans and any(r[0] in servers for r in rows):  # fast rows have no log server half; span files may know one
        keep = []
        for r in rows:
            hs = servers.pop(r[0], None)
            if hs is None:
                keep.append(r)
            else:
                u = Update.from_row(r)
                u.missing = ()
                _pair(r[0], [u], hs, objects)
        rows = keep
    for tid, hs in servers.items():
        objects.extend(_server_only(tid, h) for h in hs)
    rows.extend(u.to_row() for u in objects)
    rows = _attach_checkpoint_waits(rows, parts)
    # one signature per update; only updates over a threshold need the function call
    sigs = list(map(signature_of, (r[R_QUEUE] for r in rows), (r[R_RPC] for r in rows), (r[R["ckpt_wait_ms"]] for r in rows)))
    changed = [i for i, sig in enumerate(sigs) if sig != HEALTHY or rows[i][R_SIG] != HEALTHY]
    for i in changed:
        r = rows[i]
        rows[i] = (*r[:R_SIG], sigs[i])
    rows.sort(key=row_start)
    return rows


def _attach_checkpoint_waits(rows: list[tuple], parts: Sequence[Partial]) -> list[tuple]:
    """A checkpoint wait belongs to the next update its orchestrator sends (or the one with its step)."""
    waits = {p.source: sorted(p.waits) for p in parts if p.waits}
    if not waits:
        return rows
    src_i, seq_i, step_i, tid_i = R["client_source"], R["client_seq"], R["step"], R["tid"]
    cw_i, cs_i = R["ckpt_wait_ms"], R["ckpt_step"]
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r[src_i] in waits and r[seq_i] is not None:
            by_source.setdefault(r[src_i], []).append(i)
    for source, idx in by_source.items():
        ws = waits[source]
        by_step = {step: (ms, step) for _s, step, ms in ws}
        idx.sort(key=lambda i: rows[i][seq_i])
        used: dict[str, tuple[float, int]] = {}
        wi, pending = 0, None
        for i in idx:
            r = rows[i]
            got = by_step.get(r[step_i]) if r[step_i] is not None else None
            if got is None:
                got = used.get(r[tid_i])
            if got is None:
                while wi < len(ws) and ws[wi][0] < r[seq_i]:
                    pending = ws[wi]
                    wi += 1
                if pending is None:
                    continue
                got = used[r[tid_i]] = (pending[2], pending[1])
                pending = None  # one wait per update; all servers of that trace share it
            rows[i] = (*r[:cw_i], got[0], got[1], *r[cs_i + 1:])
    return rows


def gen_index(parts: Sequence[Partial]) -> dict[str, tuple[list[int], list[tuple]]]:
    """Per source, generation batches in order: (seqs, rows of (seq, completions, dur_ms, inflight))."""
    out = {}
    for p in parts:
        g = p.gen
        if g["seq"]:
            rows = sorted(zip(g["seq"], g["completions"], g["dur_ms"], g["inflight"]))
            out[p.source] = ([r[0] for r in rows], rows)
    return out


def generation_around(u: Update, gen_by_source: dict[str, tuple[list[int], list[tuple]]], before: int = 3, after: int = 1) -> list[dict[str, Any]]:
    """Generation batches logged just before and after an update by the same orchestrator."""
    if u.client_source is None or u.client_seq is None or u.client_source not in gen_by_source:
        return []
    seqs, rows = gen_by_source[u.client_source]
    i = bisect_left(seqs, u.client_seq)
    return [{"position": "before" if r[0] < u.client_seq else "after", "completions": r[1], "dur_ms": r[2], "inflight": r[3]}
            for r in rows[max(0, i - before): i + after]]
