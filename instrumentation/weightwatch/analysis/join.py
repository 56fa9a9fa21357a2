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

import operator
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from itertools import islice
from typing import Any

from weightwatch.analysis.collect import BLOCK_SEQ, Bulk, Partial
from weightwatch.analysis.rules import (
    ENGINE_RELOAD_SLOW,
    FRONT_END_QUEUE,
    HEALTHY,
    QUEUE_THRESHOLD_MS,
    RPC_SLOW_MS,
    SIGNATURES,
    Diagnosis,
    diagnose,
    signature_of,
)

CLIENT_EVENTS = ("client.send", "client.done")
SERVER_EVENTS = ("server.recv", "rpc.start", "rpc.done")

ROW_FIELDS = (
    "tid", "server", "op", "step", "t", "attempts", "wall_ms", "queue_ms", "rpc_ms", "server_rpc_ms", "server_ms",
    "pool_wait_ms", "recv_delay_ms", "recv_t", "rpc_start_t", "missing", "client_source", "server_source",
    "client_seq", "ckpt_wait_ms", "ckpt_step", "signature",
)


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
        for name, value in zip(ROW_FIELDS, row, strict=False):
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
        d: dict[str, Any] = {
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
        self.path: str | None = None
        self.op: str | None = None
        self.recv_t: float | None = None
        self.start_t: float | None = None
        self.done_t: float | None = None
        self.rpc_ms: float | None = None
        self.server_ms: float | None = None


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


class Table:
    """All updates column-wise (ROW_FIELDS -> equal-length lists) and their time order.

    A 1 GB log holds millions of updates: columns cost a few C-level operations each, where
    per-update objects or tuples cost a Python call each. The updates joined inside fast blocks
    (``collect.Bulk``) stay numpy columns as rows ``0 .. nb-1``; ``cols`` turns them into lists on
    first use (the general path), the report's hot spots read them as arrays (``array``, ``bulk_sig``).
    """

    def __init__(self) -> None:
        self._cols: dict[str, list[Any]] = {f: [] for f in ROW_FIELDS}
        self.n = 0
        self.order: Any = []
        self.bulk: Bulk | None = None
        self.bulk_source: str | None = None
        self.bulk_sig: Any = None  # signature codes (index into SIGNATURES) of the bulk rows
        self.nb = 0

    def set_bulk(self, bulk: Bulk, source: str) -> None:
        """Put the bulk rows first (before any ``add``)."""
        assert self.n == 0
        self.bulk, self.bulk_source, self.nb = bulk, source, len(bulk)
        self.n = self.nb

    @property
    def cols(self) -> dict[str, list[Any]]:
        """Every row's fields as lists (turns the bulk rows into lists first)."""
        self.materialize()
        return self._cols

    def _bulk_lists(self) -> dict[str, list[Any]]:
        b = self.bulk
        assert b is not None
        j = b.joined_lists()
        nb = self.nb
        sig = [SIGNATURES[i] for i in self.bulk_sig.tolist()] if self.bulk_sig is not None else [HEALTHY] * nb
        out: dict[str, list[Any]] = {name: [None] * nb for name in ROW_FIELDS}
        out.update(tid=j["tid"], server=j["server"], op=j["op"], t=j["t"], attempts=[1] * nb, wall_ms=j["wall_ms"],
                   queue_ms=j["queue_ms"], rpc_ms=j["rpc_ms"], missing=[SERVER_EVENTS] * nb, client_source=[self.bulk_source] * nb,
                   client_seq=j["seq"], signature=sig)
        return out

    def materialize(self) -> None:
        """Turn the bulk rows into list rows (same row numbers)."""
        if self.bulk is None:
            return
        front = self._bulk_lists()
        for name in ROW_FIELDS:
            self._cols[name] = front[name] + self._cols[name]
        self.bulk, self.bulk_sig, self.nb = None, None, 0

    def add(self, n: int, **cols: Any) -> None:
        """Append ``n`` updates; a field not given is None, a non-list value is repeated."""
        for name in ROW_FIELDS:
            v = cols.get(name)
            if isinstance(v, list):
                assert len(v) == n, name
                self._cols[name] += v
            else:
                self._cols[name] += [v] * n
        self.n += n

    def add_updates(self, ups: Sequence[Update]) -> None:
        if ups:
            self.add(len(ups), **{name: [getattr(u, name) for u in ups] for name in ROW_FIELDS})

    def row(self, i: int) -> tuple:
        i = int(i)
        if i < self.nb:
            b = self.bulk
            assert b is not None

            def f(a: Any) -> float | None:
                v = float(a[i])
                return None if v != v else v

            values = dict(
                tid=b.tid[i].decode(), server=b.server_labels[b.server_codes[i]], op=b.op_labels[b.op_codes[i]], t=f(b.t),
                attempts=1, wall_ms=f(b.wall_ms), queue_ms=f(b.queue_ms), rpc_ms=f(b.rpc_ms), missing=SERVER_EVENTS,
                client_source=self.bulk_source, client_seq=int(b.seq[i]),
                signature=SIGNATURES[self.bulk_sig[i]] if self.bulk_sig is not None else HEALTHY,
            )
            return tuple(values.get(name) for name in ROW_FIELDS)
        return tuple(self._cols[name][i - self.nb] for name in ROW_FIELDS)

    def update(self, i: int) -> Update:
        return Update.from_row(self.row(i))

    def column(self, name: str) -> list[Any]:
        """One field of every row, in row order."""
        if self.bulk is None:
            return self._cols[name]
        return self._bulk_lists()[name] + self._cols[name]

    def values(self, name: str) -> list[Any]:
        """Non-None values of one field (any order)."""
        if self.bulk is None:
            return [v for v in self._cols[name] if v is not None]
        return self.array(name).tolist()

    def array(self, name: str) -> Any:
        """Non-None values of a float field as a float64 array, in row order (what ``values`` holds)."""
        import numpy as np

        rest = [v for v in self._cols[name] if v is not None]
        b = self.bulk
        a = getattr(b, name, None) if b is not None and name in _BULK_FLOATS else None
        if a is None:
            return np.asarray(rest, dtype=np.float64)
        a = a[a == a]
        return np.concatenate([a, np.asarray(rest, dtype=np.float64)]) if rest else a

    def drop(self, idx: set[int]) -> list[tuple]:
        """Remove rows by index, returning them as tuples."""
        if not idx:
            return []
        self.materialize()
        out = [self.row(i) for i in sorted(idx)]
        keep = [i for i in range(self.n) if i not in idx]
        for name in ROW_FIELDS:
            col = self._cols[name]
            self._cols[name] = [col[i] for i in keep]
        self.n = len(keep)
        return out


_BULK_FLOATS = ("t", "wall_ms", "rpc_ms", "queue_ms")


def _concat_bulk(chunks: Sequence[Bulk]) -> Bulk:
    """One Bulk of many (label lists merged, codes remapped)."""
    import numpy as np

    if len(chunks) == 1:
        return chunks[0]

    def labels(kind: str) -> tuple[list[str], Any]:
        merged: dict[str, int] = {}
        codes = []
        for c in chunks:
            remap = np.array([merged.setdefault(x, len(merged)) for x in getattr(c, f"{kind}_labels")], dtype=np.int32)
            codes.append(remap[getattr(c, f"{kind}_codes")] if len(remap) else getattr(c, f"{kind}_codes"))
        return list(merged), np.concatenate(codes)

    sl, sc = labels("server")
    ol, oc = labels("op")
    cat = lambda name: np.concatenate([getattr(c, name) for c in chunks])  # noqa: E731
    return Bulk(seq=cat("seq"), tid=cat("tid"), hash=cat("hash"), server_labels=sl, server_codes=sc, op_labels=ol, op_codes=oc,
                t=cat("t"), wall_ms=cat("wall_ms"), rpc_ms=cat("rpc_ms"), queue_ms=cat("queue_ms"))


def _bulk_take(b: Bulk, idx: Any) -> Bulk:
    return Bulk(seq=b.seq[idx], tid=b.tid[idx], hash=b.hash[idx], server_labels=b.server_labels, server_codes=b.server_codes[idx], op_labels=b.op_labels,
                op_codes=b.op_codes[idx], t=b.t[idx], wall_ms=b.wall_ms[idx], rpc_ms=b.rpc_ms[idx], queue_ms=b.queue_ms[idx])


def _bulk_columns(p: Partial, exclude: set[str], table: Table) -> tuple[list[tuple], list[tuple]]:
    """``_joined_columns`` for a source whose joined updates are all Bulk: numpy instead of hashes and lists."""
    import numpy as np

    b = _concat_bulk(p.bulk)
    h = b.hash
    if len(h) and hash(bytes(b.tid[0])) != int(h[0]):  # not forked from this process: hash here
        h = b.hash = np.fromiter(map(hash, b.tid.tolist()), dtype=np.int64, count=len(b.tid))
    # A trace id joined in two blocks (duplicated log lines) or also seen elsewhere takes the general path;
    # by hash, so a collision only sends a few more updates that way.
    uniq, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    bad = counts[inverse] > 1
    if exclude:
        bad |= np.isin(h, np.fromiter((hash(t.encode()) for t in exclude), dtype=np.int64, count=len(exclude)))
    sends: list[tuple] = []
    dones: list[tuple] = []
    if bad.any():
        out = _bulk_take(b, np.flatnonzero(bad)).joined_lists()
        sends = list(zip(out["seq"], out["tid"], out["server"], out["op"], out["t"], out["step"], strict=True))
        dones = list(zip(out["seq"], out["tid"], out["wall_ms"], out["rpc_ms"], out["queue_ms"], out["server"], out["server_ms"],
                         out["pool_wait_ms"], strict=True))
        b = _bulk_take(b, np.flatnonzero(~bad))
    table.set_bulk(b, p.source)
    return sends, dones


def _signature_codes(b: Bulk) -> Any:
    """``rules.signature_of`` for every bulk row (no checkpoint waits there), as codes into SIGNATURES."""
    import numpy as np

    q = b.queue_ms
    r = b.rpc_ms
    with np.errstate(invalid="ignore"):
        over_q = q > QUEUE_THRESHOLD_MS
        best = np.where(over_q, q, 0.0)
        over_r = (r > RPC_SLOW_MS) & (r > best)
    codes = np.full(len(q), SIGNATURES.index(HEALTHY), dtype=np.int8)
    codes[over_q] = SIGNATURES.index(FRONT_END_QUEUE)
    codes[over_r] = SIGNATURES.index(ENGINE_RELOAD_SLOW)
    return codes


def _joined_columns(p: Partial, exclude: set[str], table: Table) -> tuple[list[tuple], list[tuple]]:
    """Add the updates ``prejoin`` joined inside blocks to ``table``; those whose trace id shows up
    elsewhere (other sources, server halves, leftovers) come back as (send, done) tuples for the general path."""
    j = p.joined
    n = len(j["tid"])
    if not n:
        return [], []
    hashes = j["hash"]
    excl = {hash(t) for t in exclude}
    if len(set(hashes)) != n:  # a trace id joined in two blocks (duplicated log lines): the general path decides
        excl.update(h for h, c in Counter(hashes).items() if c > 1)
    bad = [i for i, h in enumerate(hashes) if h in excl] if excl else []
    if bad:
        badset = set(bad)
        sends = [(j["seq"][i], j["tid"][i], j["server"][i], j["op"][i], j["t"][i], j["step"][i]) for i in bad]
        dones = [(j["seq"][i], j["tid"][i], j["wall_ms"][i], j["rpc_ms"][i], j["queue_ms"][i], j["server"][i], j["server_ms"][i],
                  j["pool_wait_ms"][i]) for i in bad]
        keep = [i for i in range(n) if i not in badset]
        cols = {c: [v[i] for i in keep] for c, v in j.items()}
        n = len(keep)
    else:
        sends, dones, cols = [], [], j
    table.add(
        n, tid=cols["tid"], server=cols["server"], op=cols["op"], step=cols["step"], t=cols["t"], attempts=1,
        wall_ms=cols["wall_ms"], queue_ms=cols["queue_ms"], rpc_ms=cols["rpc_ms"], server_ms=cols["server_ms"],
        pool_wait_ms=cols["pool_wait_ms"], missing=SERVER_EVENTS, client_source=p.source, client_seq=cols["seq"], signature=HEALTHY,
    )
    return sends, dones


def join_table(parts: Sequence[Partial]) -> Table:
    """All updates of the run: log halves first, span files filling trace ids the logs do not cover."""
    logs = [p for p in parts if p.origin == "log"]
    spans = [p for p in parts if p.origin == "spans"]
    servers = _server_halves(logs, None)
    client_logs = [p for p in logs if p.send["tid"] or p.done["tid"] or p.joined["tid"] or p.bulk]
    # The numpy path takes one client log whose blocks all joined as arrays; anything else is joined as lists.
    fast = client_logs[0] if len(client_logs) == 1 and client_logs[0].bulk and not client_logs[0].joined["tid"] else None
    for p in client_logs:
        if p.bulk and p is not fast:
            _bulk_into_lists(p)
    # Trace ids with a server half, seen by more than one client source, or also among the halves left
    # unjoined (a retry, a send and its done in different blocks) take the general path.
    shared: set[str] = set(servers)
    loose = [set(p.send["tid"]) | set(p.done["tid"]) for p in client_logs]
    for x in loose:
        shared |= x
    if len(client_logs) > 1:
        seen: Counter[str] = Counter()
        for p, x in zip(client_logs, loose, strict=True):
            seen.update(x | set(p.joined["tid"]))
        shared.update(t for t, c in seen.items() if c > 1)
    table = Table()
    objects: list[Update] = []
    clients: dict[str, list[Update]] = {}
    for p in client_logs:
        js, jd = _bulk_columns(p, shared, table) if p is fast else _joined_columns(p, shared, table)
        sends = sorted(js + _send_rows(p, range(len(p.send["tid"]))))
        dones = sorted(jd + _done_rows(p, range(len(p.done["tid"]))), key=lambda r: r[0])
        for tid, ups in _client_objects(p.source, sends, dones).items():
            clients.setdefault(tid, []).extend(ups)
    if spans:
        log_client_tids = set(clients)
        for p in client_logs:
            log_client_tids.update(p.done["tid"])
            log_client_tids.update(p.send["tid"])
            log_client_tids.update(p.joined["tid"])
            if table.bulk is not None:
                log_client_tids.update(t.decode() for t in table.bulk.tid.tolist())
        for p in spans:
            if not (p.send["tid"] or p.done["tid"]):
                continue
            keep_s = [i for i, t in enumerate(p.send["tid"]) if t not in log_client_tids]
            keep_d = [i for i, t in enumerate(p.done["tid"]) if t not in log_client_tids]
            for tid, ups in _client_objects(p.source, _send_rows(p, keep_s), _done_rows(p, keep_d)).items():
                clients.setdefault(tid, []).extend(ups)
        servers.update(_server_halves(spans, set(servers)))
        # span files may know the server half of an update the logs joined without one
        hit = {i for i, t in enumerate(table.cols["tid"]) if t in servers}
        for r in table.drop(hit):
            u = Update.from_row(r)
            u.missing = ()
            clients.setdefault(u.tid, []).append(u)
    for tid, ups in clients.items():
        _pair(tid, ups, servers.pop(tid, None), objects)
    for tid, hs in servers.items():
        objects.extend(_server_only(tid, h) for h in hs)
    table.add_updates(objects)
    _attach_checkpoint_waits(table, parts)
    c = table._cols  # the list rows (after the bulk rows, if any)
    c["signature"] = list(map(signature_of, c["queue_ms"], c["rpc_ms"], c["ckpt_wait_ms"]))
    t, recv = c["t"], c["recv_t"]
    inf = float("inf")
    start = [x if x is not None else (y if y is not None else inf) for x, y in zip(t, recv, strict=False)]
    seq = [-1 if q is None else q for q in c["client_seq"]]
    b = table.bulk
    if b is None:
        order = sorted(range(table.n), key=seq.__getitem__)  # ties in time keep log order, however the log was cut
        order.sort(key=start.__getitem__)
        table.order = order
        return table
    import numpy as np

    table.bulk_sig = _signature_codes(b)
    all_start = np.concatenate([np.where(b.t == b.t, b.t, inf), np.asarray(start, dtype=np.float64)])
    all_seq = np.concatenate([b.seq, np.asarray(seq, dtype=np.int64)])
    table.order = np.lexsort((all_seq, all_start))  # by time, then log position, then row: as the sorts above
    return table


def _bulk_into_lists(p: Partial) -> None:
    """Move a source's Bulk updates into its ``joined`` lists, in block order (the list path's row order)."""
    rows = [(r[0] // BLOCK_SEQ, k, r) for k, r in enumerate(zip(*(p.joined[c] for c in p.joined), strict=True))]
    for chunk in p.bulk:
        cols = chunk.joined_lists()
        rows.extend((r[0] // BLOCK_SEQ, len(rows), r) for r in zip(*(cols[c] for c in p.joined), strict=True))
    rows.sort(key=lambda x: (x[0], x[1]))
    names = list(p.joined)
    p.joined = {c: [r[2][i] for r in rows] for i, c in enumerate(names)}
    p.bulk = []


def _attach_checkpoint_waits(table: Table, parts: Sequence[Partial]) -> None:
    """A checkpoint wait belongs to the next update its orchestrator sends (or the one with its step)."""
    waits = {p.source: sorted(p.waits) for p in parts if p.waits}
    if not waits:
        return
    c = table.cols
    src, seqc, stepc, tidc, cw, cs = c["client_source"], c["client_seq"], c["step"], c["tid"], c["ckpt_wait_ms"], c["ckpt_step"]
    by_source: dict[str, list[int]] = {}
    for i, (s_, q) in enumerate(zip(src, seqc, strict=False)):
        if q is not None and s_ in waits:
            by_source.setdefault(s_, []).append(i)
    for source, idx in by_source.items():
        ws = waits[source]
        by_step = {step: (ms, step) for _s, step, ms in ws}
        idx.sort(key=seqc.__getitem__)
        used: dict[str, tuple[float, int]] = {}
        wi, pending = 0, None
        for i in idx:
            got = by_step.get(stepc[i]) if stepc[i] is not None else None
            if got is None:
                got = used.get(tidc[i])
            if got is None:
                while wi < len(ws) and ws[wi][0] < seqc[i]:
                    pending = ws[wi]
                    wi += 1
                if pending is None:
                    continue
                got = used[tidc[i]] = (pending[2], pending[1])
                pending = None  # one wait per update; all servers of that trace share it
            cw[i], cs[i] = got


def gen_index(parts: Sequence[Partial]) -> dict[str, tuple[list[int], Any]]:
    """Per source, generation batches in order: (seqs, rows of (seq, completions, dur_ms, inflight))."""
    out: dict[str, tuple[list[int], Any]] = {}
    for p in parts:
        g = p.gen
        s = g["seq"]
        if not s:
            continue
        if all(map(operator.lt, s, islice(s, 1, None))):  # already in log order (always, from one log): no copies
            out[p.source] = (s, _GenRows(g))
            continue
        rows = sorted(zip(s, g["completions"], g["dur_ms"], g["inflight"], strict=False))
        out[p.source] = ([r[0] for r in rows], rows)
    return out


class _GenRows:
    """Rows (seq, completions, dur_ms, inflight) of sorted generation columns, made when sliced."""

    def __init__(self, g: dict[str, list[Any]]):
        self.g = g

    def __len__(self) -> int:
        return len(self.g["seq"])

    def __getitem__(self, i: slice) -> list[tuple]:
        g = self.g
        return list(zip(g["seq"][i], g["completions"][i], g["dur_ms"][i], g["inflight"][i], strict=True))


def generation_around(u: Update, gen_by_source: dict[str, tuple[list[int], list[tuple]]], before: int = 3, after: int = 1) -> list[dict[str, Any]]:
    """Generation batches logged just before and after an update by the same orchestrator."""
    if u.client_source is None or u.client_seq is None or u.client_source not in gen_by_source:
        return []
    seqs, rows = gen_by_source[u.client_source]
    i = bisect_left(seqs, u.client_seq)
    return [{"position": "before" if r[0] < u.client_seq else "after", "completions": r[1], "dur_ms": r[2], "inflight": r[3]}
            for r in rows[max(0, i - before): i + after]]
