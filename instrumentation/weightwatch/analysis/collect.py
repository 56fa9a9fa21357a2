"""Collect parsed events of one block of one source into flat, picklable, mergeable lists.

Workers scan byte ranges of big files in parallel; each returns a ``Partial`` and the parent merges
them in file order. Every event keeps ``seq``, its position in its source, so the join can tell what
happened before what within one process's log (checkpoint wait before an update, batches around it).
"""

from __future__ import annotations

import gc
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import compress
from typing import Any
from urllib.parse import urlsplit

from weightwatch.events import FAST_EVENTS, ArrayColumns, Columns, Rejected, scan_arrays, scan_columns

#: How many rejected lines are kept verbatim per reason (the rest are only counted).
SAMPLES_PER_REASON = 3
_VALUE_IN_REASON = re.compile(r"=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")


def reason_category(reason: str) -> str:
    """A rejection reason without the offending value, so equal problems count together."""
    if reason.startswith("unknown event "):
        return "unknown event"
    return _VALUE_IN_REASON.sub("", reason)


def server_of(url: str) -> str:
    """host:port of a URL (the ``server`` label), or the text itself when it is not a URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    return parts.netloc or url


SEND_COLS = ("seq", "tid", "server", "op", "t", "step")
DONE_COLS = ("seq", "tid", "wall_ms", "rpc_ms", "queue_ms", "server", "server_ms", "pool_wait_ms")
GEN_COLS = ("seq", "completions", "dur_ms", "inflight")
#: Updates already joined inside one block: one send and one done with that trace id (see ``prejoin``).
JOINED_COLS = ("seq", "tid", "server", "op", "step", "t", "wall_ms", "rpc_ms", "queue_ms", "server_ms", "pool_wait_ms", "hash")


def _cols(names: tuple[str, ...]) -> dict[str, list[Any]]:
    return {n: [] for n in names}


@dataclass(frozen=True)
class _Joined:
    text: str
    n: int


@dataclass
class Bulk:
    """Updates joined inside one fast block (one send and one done per trace id, no extra fields), as numpy
    columns: no Python object per update, cheap to pickle back from a worker and to summarize.

    ``t``, ``wall_ms``, ``rpc_ms``, ``queue_ms`` are float64 with NaN for unknown (``na``); ``tid`` is a bytes
    array; server and op are codes into label lists; step, server_ms and pool_wait_ms are unknown (None).
    """

    seq: Any
    tid: Any
    hash: Any  # hash() of each trace id's bytes, computed where they are hot (forked workers share the hash secret)
    server_labels: list[str]
    server_codes: Any
    op_labels: list[str]
    op_codes: Any
    t: Any
    wall_ms: Any
    rpc_ms: Any
    queue_ms: Any

    def __len__(self) -> int:
        return len(self.seq)

    def shifted(self, base: int) -> Bulk:
        return Bulk(self.seq + base, self.tid, self.hash, self.server_labels, self.server_codes, self.op_labels, self.op_codes,
                    self.t, self.wall_ms, self.rpc_ms, self.queue_ms)

    def joined_lists(self) -> dict[str, list[Any]]:
        """The same updates as ``prejoin``'s list columns (JOINED_COLS), for the general path."""
        tids = [t.decode() for t in self.tid.tolist()]
        n = len(tids)
        nones = [None] * n
        return {
            "seq": self.seq.tolist(), "tid": tids, "server": [self.server_labels[i] for i in self.server_codes.tolist()],
            "op": [self.op_labels[i] for i in self.op_codes.tolist()], "step": nones, "t": nan_to_none(self.t),
            "wall_ms": nan_to_none(self.wall_ms), "rpc_ms": nan_to_none(self.rpc_ms), "queue_ms": nan_to_none(self.queue_ms),
            "server_ms": list(nones), "pool_wait_ms": list(nones), "hash": list(map(hash, tids)),
        }


def nan_to_none(a: Any) -> list[Any]:
    """A float64 array as a list of floats with None where it is NaN (unknown)."""
    values = a.tolist()
    if len(a) and (a != a).any():
        return [None if v != v else v for v in values]
    return values


@dataclass
class Partial:
    """Events of one source (or one block of it); ``seq`` orders them within the source.

    The high-volume events (client.send, client.done, gen batch.done) are kept column-wise (parallel
    lists, cheap to build, pickle and join in bulk); the rest as tuples.
    """

    source: str
    origin: str = "log"  # "log" or "spans"
    n: int = 0  # the next seq number
    events: int = 0  # events and rejected lines seen
    lines: int = 0
    send: dict[str, list[Any]] = field(default_factory=lambda: _cols(SEND_COLS))
    done: dict[str, list[Any]] = field(default_factory=lambda: _cols(DONE_COLS))
    gen: dict[str, list[Any]] = field(default_factory=lambda: _cols(GEN_COLS))
    joined: dict[str, list[Any]] = field(default_factory=lambda: _cols(JOINED_COLS))
    # (seq, tid, path, t)
    recvs: list[tuple] = field(default_factory=list)
    # (seq, tid, op, t)
    rpc_starts: list[tuple] = field(default_factory=list)
    # (seq, tid, op, t, rpc_ms)
    rpc_dones: list[tuple] = field(default_factory=list)
    # (seq, step, write_ms)
    writes: list[tuple] = field(default_factory=list)
    wait_starts: int = 0
    # (seq, target_step, wait_ms)
    waits: list[tuple] = field(default_factory=list)
    # (seq, inflight, target_batch)
    gen_starts: list[tuple] = field(default_factory=list)
    # (seq, trunc_pct, current_step, ckpt_step, staleness, async_level|None)
    rollouts: list[tuple] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    # server-side timings only spans know: tid -> server_ms
    server_ms: dict[str, float] = field(default_factory=dict)
    # updates ``prejoin_arrays`` joined inside fast blocks, as numpy columns (see ``Bulk``), in block order
    bulk: list[Bulk] = field(default_factory=list)

    def __getstate__(self) -> dict[str, Any]:
        # Workers send Partials back through a pipe: a million trace ids pickle far faster as one string.
        state = dict(self.__dict__)
        for name in ("send", "done", "joined"):
            cols = dict(state[name])
            cols["tid"] = _Joined("\n".join(cols["tid"]), len(cols["tid"]))
            state[name] = cols
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("send", "done", "joined"):
            tids = state[name]["tid"]
            if isinstance(tids, _Joined):
                state[name]["tid"] = tids.text.split("\n") if tids.n else []
        self.__dict__.update(state)

    def reject(self, reason: str, line: str) -> None:
        cat = reason_category(reason)
        self.rejected[cat] += 1
        kept = self.samples.setdefault(cat, [])
        if len(kept) < SAMPLES_PER_REASON:
            kept.append(line[:500])

    def shifted(self, offset: int) -> Partial:
        """A copy whose seq numbers start at ``offset`` (to append a whole later file after this one)."""
        base = -(-offset // BLOCK_SEQ) * BLOCK_SEQ if offset else 0
        if not base:
            return self
        q = Partial(self.source, origin=self.origin, n=self.n + base, events=self.events, lines=self.lines,
                    wait_starts=self.wait_starts, rejected=self.rejected, samples=self.samples, server_ms=self.server_ms)
        for name in ("send", "done", "gen", "joined"):
            cols = dict(getattr(self, name))
            cols["seq"] = [x + base for x in cols["seq"]]
            setattr(q, name, cols)
        for name in ("recvs", "rpc_starts", "rpc_dones", "writes", "waits", "gen_starts", "rollouts"):
            setattr(q, name, [(r[0] + base, *r[1:]) for r in getattr(self, name)])
        q.bulk = [b.shifted(base) for b in self.bulk]
        return q

    def extend(self, other: Partial) -> None:
        """Append a later block of the same source (its seq numbers start above ours: see BLOCK_SEQ)."""
        for name in ("send", "done", "gen", "joined"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for col, values in theirs.items():
                mine[col].extend(values)
        for name in ("recvs", "rpc_starts", "rpc_dones", "writes", "waits", "gen_starts", "rollouts"):
            getattr(self, name).extend(getattr(other, name))
        self.bulk.extend(other.bulk)
        self.n = max(self.n, other.n)
        self.events += other.events
        self.lines += other.lines
        self.wait_starts += other.wait_starts
        self.rejected.update(other.rejected)
        for cat, lines in other.samples.items():
            kept = self.samples.setdefault(cat, [])
            kept.extend(lines[: max(0, SAMPLES_PER_REASON - len(kept))])
        self.server_ms.update(other.server_ms)


def _num(x: Any) -> float | None:
    try:
        return None if x is None or x == "na" else float(x)
    except (TypeError, ValueError):
        return None


def _int(x: Any) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None


def _sort_cols(cols: dict[str, list[Any]]) -> None:
    order = sorted(range(len(cols["seq"])), key=cols["seq"].__getitem__)
    for name, values in cols.items():
        cols[name] = [values[i] for i in order]


class _Servers(dict):
    """url -> host:port, computed once per distinct url."""

    def __missing__(self, url: str) -> str:
        srv = self[url] = server_of(url)
        return srv


def ingest_columns(p: Partial, c: Columns) -> None:
    """Add one parsed block (``events.scan_columns``) to ``p``; seq numbers start at ``p.n``."""
    base = p.n
    servers = _Servers()
    touched: set[str] = set()
    for key, (seqs, tids, vals, extras) in c.fast.items():
        sq = [s + base for s in seqs] if base else seqs
        n = len(seqs)
        if key == "weights.client.done":
            d = p.done
            d["seq"] += sq
            d["tid"] += tids or []
            d["wall_ms"] += vals[0]
            d["rpc_ms"] += vals[1]
            d["queue_ms"] += vals[2]
            if extras is None:
                nones = [None] * n
                d["server"] += nones
                d["server_ms"] += nones
                d["pool_wait_ms"] += nones
            else:  # what weightwatch's own client writes after the fields: server_ms=, pool_wait_ms=, url=
                srvs = [(x.get("server") or x.get("url")) if x else None for x in extras]
                d["server"] += [servers[v] if v else None for v in srvs]
                d["server_ms"] += [_num(x.get("server_ms")) if x else None for x in extras]
                d["pool_wait_ms"] += [_num(x.get("pool_wait_ms")) if x else None for x in extras]
        elif key == "weights.client.send":
            s = p.send
            s["seq"] += sq
            s["tid"] += tids or []
            s["server"] += list(map(servers.__getitem__, vals[0]))
            s["op"] += vals[1]
            s["t"] += vals[2]
            s["step"] += [None] * n if extras is None else [_int(x.get("step")) if x else None for x in extras]
        elif key == "gen.batch.done":
            g = p.gen
            g["seq"] += sq
            g["completions"] += vals[0]
            g["dur_ms"] += vals[1]
            g["inflight"] += vals[2]
    for seq, item in c.other:
        seq += base
        if isinstance(item, Rejected):
            p.reject(item.reason, item.line)
            continue
        key, tid, v, x = item
        if key == "weights.client.done":
            srv = (x.get("server") or x.get("url")) if x else None
            d = p.done
            for col, val in zip(DONE_COLS, (seq, tid, v[0], v[1], v[2], servers[srv] if srv else None,
                                            _num(x.get("server_ms")) if x else None, _num(x.get("pool_wait_ms")) if x else None), strict=False):
                d[col].append(val)
            touched.add("done")
        elif key == "weights.client.send":
            s = p.send
            for col, val in zip(SEND_COLS, (seq, tid, servers[v[0]], v[1], v[2], _int(x.get("step")) if x else None), strict=False):
                s[col].append(val)
            touched.add("send")
        elif key == "gen.batch.done":
            g = p.gen
            for col, val in zip(GEN_COLS, (seq, v[0], v[1], v[2]), strict=False):
                g[col].append(val)
            touched.add("gen")
        elif key == "gen.batch.start":
            p.gen_starts.append((seq, v[0], v[1]))
        elif key == "weights.server.recv":
            p.recvs.append((seq, tid, v[0], v[1]))
        elif key == "weights.rpc.start":
            p.rpc_starts.append((seq, tid, v[0], v[1]))
        elif key == "weights.rpc.done":
            p.rpc_dones.append((seq, tid, v[0], v[1], v[2]))
        elif key == "ckpt.wait.done":
            p.waits.append((seq, v[0], v[1]))
        elif key == "ckpt.write.done":
            p.writes.append((seq, v[0], v[1]))
        elif key == "ckpt.wait.start":
            p.wait_starts += 1
        elif key == "rollout":
            p.rollouts.append((seq, v[0], v[1], v[2], v[3], _int(x.get("async_level")) if x else None))
    for name in touched:
        if c.fast:
            _sort_cols(getattr(p, name))
    p.events += c.count
    p.n = base + c.count


#: Block k of a source numbers its events from k * BLOCK_SEQ, so blocks parsed apart still sort in file order.
BLOCK_SEQ = 1 << 40


def prejoin(p: Partial) -> None:
    """Join, inside one block, the trace ids with exactly one send and one done (to the same server).

    Done where the block is parsed (in parallel, with dicts small enough to stay in cache); the parent
    only checks these against trace ids seen elsewhere and joins what crosses block boundaries.
    """
    s, d = p.send, p.done
    stids, dtids = s["tid"], d["tid"]
    if not stids or not dtids:
        return
    sidx = dict(zip(stids, range(len(stids)), strict=True))
    didx = dict(zip(dtids, range(len(dtids)), strict=True))
    both = sidx.keys() & didx.keys()
    if len(sidx) != len(stids):
        both -= {t for t, c in Counter(stids).items() if c > 1}
    if len(didx) != len(dtids):
        both -= {t for t, c in Counter(dtids).items() if c > 1}
    if any(x is not None for x in d["server"]):
        ss, ds = s["server"], d["server"]
        both -= {t for t in both if ds[didx[t]] is not None and ds[didx[t]] != ss[sidx[t]]}
    if not both:
        return
    everything = len(both) == len(stids) == len(dtids)
    di = list(range(len(dtids))) if everything else [i for i, t in enumerate(dtids) if t in both]
    tids = dtids if everything else [dtids[i] for i in di]
    si = list(map(sidx.__getitem__, tids))
    j = p.joined
    j["tid"] += tids
    # hash(tid), computed where the strings are hot; forked workers share the parent's hash secret, so the
    # parent checks millions of trace ids for duplicates without touching the strings
    j["hash"] += list(map(hash, tids))
    for col in ("seq", "server", "op", "step", "t"):
        j[col] += list(map(s[col].__getitem__, si))
    for col in ("wall_ms", "rpc_ms", "queue_ms", "server_ms", "pool_wait_ms"):
        j[col] += d[col] if everything else list(map(d[col].__getitem__, di))
    if everything:
        p.send, p.done = _cols(SEND_COLS), _cols(DONE_COLS)
        return
    keep_s = [i for i, t in enumerate(stids) if t not in both]
    keep_d = [i for i, t in enumerate(dtids) if t not in both]
    for cols, keep in ((s, keep_s), (d, keep_d)):
        for col, values in cols.items():
            cols[col] = [values[i] for i in keep]


def _take(values: list[Any], idx: list[int]) -> list[Any]:
    return list(map(values.__getitem__, idx))


def _send_lists(p: Partial, base: int, send: tuple[Any, list[bytes], list[Any]], keep: list[int]) -> None:
    seqs, tids, (url, op, t) = send
    servers = _Servers()
    s = p.send
    s["seq"] += (seqs[keep] + base).tolist()
    s["tid"] += [x.decode() for x in _take(tids, keep)]
    s["server"] += [servers[x.decode()] for x in _take(url, keep)]
    s["op"] += [x.decode() for x in _take(op, keep)]
    s["t"] += nan_to_none(t[keep])
    s["step"] += [None] * len(keep)


def _done_lists(p: Partial, base: int, done: tuple[Any, list[bytes], list[Any]], keep: list[int]) -> None:
    seqs, tids, (wall, rpc, queue) = done
    d = p.done
    d["seq"] += (seqs[keep] + base).tolist()
    d["tid"] += [x.decode() for x in _take(tids, keep)]
    d["wall_ms"] += nan_to_none(wall[keep])
    d["rpc_ms"] += nan_to_none(rpc[keep])
    d["queue_ms"] += nan_to_none(queue[keep])
    for col in ("server", "server_ms", "pool_wait_ms"):
        d[col] += [None] * len(keep)


def _codes(values: list[bytes], label: Any) -> tuple[list[str], Any]:
    """(distinct labels, int32 code per value): a categorical column, by hashing (few distinct values)."""
    import numpy as np

    uniq = list(dict.fromkeys(values))
    index = dict(zip(uniq, range(len(uniq)), strict=True))
    return [label(u) for u in uniq], np.fromiter(map(index.__getitem__, values), dtype=np.int32, count=len(values))


def prejoin_arrays(p: Partial, base: int, send: tuple[Any, list[bytes], list[Any]] | None, done: tuple[Any, list[bytes], list[Any]] | None) -> None:
    """``prejoin`` on the array columns of a fast block: trace ids with exactly one send and one done become
    a ``Bulk``; the rest go to ``p.send``/``p.done`` as lists (in line order) for the parent to join."""
    import numpy as np

    sj: list[int] = []
    dj: list[int] = []
    if send is not None and done is not None:
        st, dt = send[1], done[1]
        sidx = dict(zip(st, range(len(st)), strict=True))
        didx = dict(zip(dt, range(len(dt)), strict=True))
        both = sidx.keys() & didx.keys()
        if len(sidx) != len(st):
            both -= {t for t, c in Counter(st).items() if c > 1}
        if len(didx) != len(dt):
            both -= {t for t, c in Counter(dt).items() if c > 1}
        dj = list(compress(range(len(dt)), map(both.__contains__, dt)))
        sj = list(map(sidx.__getitem__, map(dt.__getitem__, dj)))
    for half, idx, to_lists in ((send, sj, _send_lists), (done, dj, _done_lists)):
        if half is not None and len(idx) < len(half[0]):
            taken = set(idx)
            to_lists(p, base, half, [i for i in range(len(half[0])) if i not in taken])
    if not sj:
        return
    assert send is not None and done is not None
    s_seq, _s_tid, (url, op, t) = send
    _d_seq, d_tid, (wall, rpc, queue) = done
    tids = _take(d_tid, dj)
    server_labels, server_codes = _codes(_take(url, sj), lambda u: server_of(u.decode()))
    op_labels, op_codes = _codes(_take(op, sj), bytes.decode)
    p.bulk.append(Bulk(
        seq=s_seq[sj] + base, tid=np.array(tids, dtype="S"), hash=np.fromiter(map(hash, tids), dtype=np.int64, count=len(tids)),
        server_labels=server_labels, server_codes=server_codes, op_labels=op_labels, op_codes=op_codes,
        t=t[sj], wall_ms=wall[dj], rpc_ms=rpc[dj], queue_ms=queue[dj],
    ))


def ingest_arrays(p: Partial, a: ArrayColumns) -> None:
    """Add one block parsed by ``events.scan_arrays`` to ``p`` and join its updates (``prejoin_arrays``)."""
    base = p.n
    gen = a.fast.get(FAST_EVENTS[2])
    if gen is not None:
        seqs, _, (comp, dur, inflight) = gen
        g = p.gen
        g["seq"] += (seqs + base).tolist()
        g["completions"] += comp.tolist()
        g["dur_ms"] += nan_to_none(dur)
        g["inflight"] += inflight.tolist()
    ingest_columns(p, Columns(count=a.count, other=a.other))  # the lines the token loop took
    if gen is not None and len(p.gen["seq"]) > len(gen[0]):
        _sort_cols(p.gen)
    send, done = a.fast.get(FAST_EVENTS[1]), a.fast.get(FAST_EVENTS[0])
    if p.send["seq"] or p.done["seq"]:  # some client line took the token loop (extra fields): the list path
        for half, to_lists in ((send, _send_lists), (done, _done_lists)):
            if half is not None:
                to_lists(p, base, half, list(range(len(half[0]))))
        _sort_cols(p.send)
        _sort_cols(p.done)
        prejoin(p)
        return
    prejoin_arrays(p, base, send, done)


def scan_block(source: str, data: bytes, index: int = 0) -> Partial:
    """Parse block ``index`` of a source (``\\n``-separated log lines) into a Partial: a worker's whole job."""
    p = Partial(source, n=index * BLOCK_SEQ)
    p.lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    enabled = gc.isenabled()
    gc.disable()  # millions of small objects, none cyclic: the cyclic GC would rescan them over and over
    try:
        arrays = scan_arrays(data)
        if arrays is not None:
            ingest_arrays(p, arrays)
        else:
            ingest_columns(p, scan_columns(data))
            prejoin(p)
    finally:
        if enabled:
            gc.enable()
    return p


# --------------------------------------------------------------------------- span files


def spans_to_partial(source: str, lines: Iterable[str]) -> Partial:
    """Turn telemetry.JsonLinesSpanExporter lines into the same tuples the log events give."""
    p = Partial(source, origin="spans")
    rows: list[tuple[float, int, str, tuple]] = []  # (time, order, kind, tuple-without-seq)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        p.lines += 1
        try:
            s = json.loads(line)
            name = s["name"]
            tid = str(s["trace_id"])
            start = int(s["start_time_unix_nano"]) / 1e9
            end = int(s["end_time_unix_nano"]) / 1e9
            a = s.get("attributes") or {}
            if not isinstance(a, dict):
                raise TypeError("attributes is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            p.reject(f"span line is not a span: {type(exc).__name__}", line)
            continue
        dur_ms = (end - start) * 1000.0
        if name == "weights.update.server":
            srv = server_of(str(a.get("rl.server", "?")))
            op = str(a.get("rl.op", "?"))
            rows.append((start, i, "send", (tid, srv, op, start, _int(a.get("rl.step")))))
            wall = _num(a.get("rl.wall_ms"))
            rows.append((end, i, "done", (tid, wall if wall is not None else dur_ms, _num(a.get("rl.rpc_ms")), _num(a.get("rl.queue_ms")),
                                          srv, None, _num(a.get("rl.pool_wait_ms")))))
        elif name == "admin.request":
            rows.append((start, i, "recv", (tid, str(a.get("http.target") or a.get("url.path") or a.get("rl.op") or "?"), start)))
            sms = _num(a.get("rl.server_ms"))
            p.server_ms[tid] = sms if sms is not None else dur_ms
        elif name == "engine.rpc":
            op = str(a.get("rl.op", "?"))
            rows.append((start, i, "rpc_start", (tid, op, start)))
            rpc = _num(a.get("rl.rpc_ms"))
            rows.append((end, i, "rpc_done", (tid, op, end, rpc if rpc is not None else dur_ms)))
        elif name == "ckpt.wait":
            wait = _num(a.get("rl.wait_ms"))
            rows.append((end, i, "wait", (_int(a.get("rl.step")), wait if wait is not None else dur_ms)))
        elif name == "ckpt.write":
            rows.append((end, i, "write", (_int(a.get("rl.step")), dur_ms)))
        elif name == "gen.batch":
            rows.append((end, i, "gen_done", (_int(a.get("rl.completions")) or 0, dur_ms, _int(a.get("rl.inflight")) or 0)))
    rows.sort(key=lambda r: (r[0], r[1]))
    target = {"recv": p.recvs, "rpc_start": p.rpc_starts, "rpc_done": p.rpc_dones, "wait": p.waits, "write": p.writes}
    columns = {"send": (p.send, SEND_COLS), "done": (p.done, DONE_COLS), "gen_done": (p.gen, GEN_COLS)}
    for seq, (_t, _i, kind, row) in enumerate(rows):
        if kind in columns:
            cols, names = columns[kind]
            for name, val in zip(names, (seq, *row), strict=False):
                cols[name].append(val)
        else:
            target[kind].append((seq, *row))
    p.n = len(rows)
    p.events = p.n + sum(p.rejected.values())
    return p
