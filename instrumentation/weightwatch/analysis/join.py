"""Join the halves of each admin call by trace id: the orchestrator's client.send/client.done and the
server's server.recv/rpc.start/rpc.done (or the same from span files), column-wise in polars.

One trace id covers one update (or one whole sync) of all servers, so a client half is keyed by
(source, trace id, server, op); a ``client.done`` that does not name its server or op (seed-era logs) takes
the next open call of its trace id. Server halves are told apart by the log (process) they come from and
the op, and matched to client halves by the server's reported rpc_ms, then by order. Halves that find no
partner stay, with what is missing named: a call sent and never answered is a row with its trace id and server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from weightwatch.analysis import rules
from weightwatch.analysis.collect import Source, ops_of_paths, servers_of
from weightwatch.analysis.rules import Diagnosis, diagnose

CLIENT_EVENTS = ("client.send", "client.done")
SERVER_EVENTS = ("server.recv", "rpc.start", "rpc.done")
#: The columns of the updates frame (one row per admin call of one server).
UPDATE_SCHEMA: dict[str, Any] = {
    "tid": pl.String, "server": pl.String, "op": pl.String, "step": pl.Int64, "t": pl.Float64, "attempts": pl.Int64,
    "wall_ms": pl.Float64, "queue_ms": pl.Float64, "rpc_ms": pl.Float64, "server_rpc_ms": pl.Float64, "server_ms": pl.Float64,
    "pool_wait_ms": pl.Float64, "recv_delay_ms": pl.Float64, "recv_t": pl.Float64, "rpc_start_t": pl.Float64, "missing": pl.String,
    "client_source": pl.String, "server_source": pl.String, "client_seq": pl.Int64, "ckpt_wait_ms": pl.Float64, "ckpt_step": pl.Int64,
    "status": pl.Int64, "ok": pl.Int64, "budget_s": pl.Float64, "reason": pl.String,
}
_SEND_COLS = ["source", "seq", "tid", "server", "op", "t", "step", "budget_s"]
_DONE_COLS = ["source", "seq", "tid", "server", "op", "wall_ms", "rpc_ms", "queue_ms", "server_ms", "pool_wait_ms", "status", "ok",
              "attempts", "step"]


def _client(src: Source, key: str, cols: list[str]) -> pl.DataFrame:
    f = src.of(key)
    server = pl.coalesce(pl.col("server"), servers_of(f["url"]).alias("u")) if f.height else pl.col("server")
    return f.with_columns(server.alias("server"), pl.lit(src.source).alias("source")).select(cols)


def _ranked(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """``_r``: the row's rank among the rows of its key, in line order (0 for all when the keys are unique)."""
    if not df.select(pl.struct(keys).is_duplicated().any()).item():
        return df.with_columns(pl.lit(0, dtype=pl.Int64).alias("_r"))
    return df.sort("seq").with_columns(pl.int_range(pl.len()).over(keys).cast(pl.Int64).alias("_r"))


def client_calls(sources: Sequence[Source]) -> pl.DataFrame:
    """Every admin call seen by a client (log halves first; span files only for trace ids the logs lack)."""
    logs = [s for s in sources if s.origin == "log"]
    spans = [s for s in sources if s.origin == "spans"]
    sends = [_client(s, "weights.client.send", _SEND_COLS) for s in logs]
    dones = [_client(s, "weights.client.done", _DONE_COLS) for s in logs]
    if spans:
        seen = pl.concat([pl.concat(sends)["tid"], pl.concat(dones)["tid"]]).unique() if logs else pl.Series([], dtype=pl.String)
        sends += [_client(s, "weights.client.send", _SEND_COLS).filter(~pl.col("tid").is_in(seen.implode())) for s in spans]
        dones += [_client(s, "weights.client.done", _DONE_COLS).filter(~pl.col("tid").is_in(seen.implode())) for s in spans]
    send = pl.concat(sends) if sends else pl.DataFrame(schema={c: UPDATE_SCHEMA.get(c, pl.Int64) for c in _SEND_COLS})
    done = pl.concat(dones) if dones else pl.DataFrame(schema={c: UPDATE_SCHEMA.get(c, pl.Int64) for c in _DONE_COLS})
    # one call per (source, tid, server, op); more sends of it are retries
    calls = (send.sort("seq").group_by("source", "tid", "server", "op", maintain_order=True)
             .agg(pl.col("seq").first(), pl.col("t").first(), pl.col("step").drop_nulls().first(), pl.len().alias("sends"),
                  pl.col("budget_s").drop_nulls().first())
             .with_row_index("sid"))
    done = done.with_row_index("did")
    pairs = []
    left = calls
    for keys in (["server", "op"], ["server"], ["op"], []):
        known = [pl.col(k).is_not_null() for k in keys] + [pl.col(k).is_null() for k in ("server", "op") if k not in keys]
        cls = done.filter(pl.all_horizontal(known)) if known else done
        if not cls.height or not left.height:
            continue
        full = ["source", "tid", *keys]
        j = _ranked(cls, full).join(_ranked(left, full).select(*full, "_r", "sid"), on=[*full, "_r"], how="inner")
        pairs.append(j.select("did", "sid"))
        left = left.filter(~pl.col("sid").is_in(j["sid"].implode()))
    pair = pl.concat(pairs) if pairs else pl.DataFrame(schema={"did": pl.UInt32, "sid": pl.UInt32})
    both = (pair.join(calls, on="sid").join(done.drop("source", "tid", "server", "op"), on="did", suffix="_done")
            .with_columns(pl.coalesce("step", "step_done").alias("step"), pl.coalesce("attempts", "sends").cast(pl.Int64).alias("attempts"),
                          pl.lit("").alias("missing"), pl.col("seq").alias("client_seq")))
    open_ = left.with_columns(pl.col("sends").cast(pl.Int64).alias("attempts"), pl.lit("client.done").alias("missing"),
                              pl.col("seq").alias("client_seq"))
    orphan = (done.filter(~pl.col("did").is_in(pair["did"].implode()))
              .with_columns(pl.lit("client.send").alias("missing"), pl.col("seq").alias("client_seq"), pl.lit(0, dtype=pl.Int64).alias("attempts")))
    out = pl.concat([_conform(both.rename({"source": "client_source"})), _conform(open_.rename({"source": "client_source"})),
                     _conform(orphan.rename({"source": "client_source"}))])
    fill = pl.when(pl.col("queue_ms").is_null() & pl.col("wall_ms").is_not_null() & pl.col("server_ms").is_not_null())
    return out.with_columns(fill.then((pl.col("wall_ms") - pl.col("server_ms")).clip(0.0)).otherwise(pl.col("queue_ms")).alias("queue_ms"))


def _conform(f: pl.DataFrame) -> pl.DataFrame:
    return f.select([pl.col(c).cast(t) if c in f.columns else pl.lit(None, dtype=t).alias(c) for c, t in UPDATE_SCHEMA.items()])


# --------------------------------------------------------------------------- server halves


def server_halves(sources: Sequence[Source]) -> list[dict[str, Any]]:
    """One half per (server log, trace id, op): when the request arrived, the engine call, its rpc_ms."""
    logs = [s for s in sources if s.origin == "log"]
    spans = [s for s in sources if s.origin == "spans"]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for group in (logs, spans):
        mine: list[dict[str, Any]] = []
        for src in group:
            f = pl.concat([src.of(k) for k in ("weights.server.recv", "weights.rpc.start", "weights.rpc.done")])
            if not f.height:
                continue
            f = f.with_columns(pl.coalesce(pl.col("op"), ops_of_paths(f["path"]).alias("p")).alias("op"))
            if group is spans:
                f = f.filter(~pl.col("tid").is_in(list(seen)))
            g = (f.sort("seq").group_by("tid", "op", maintain_order=True).agg(
                pl.col("t").filter(pl.col("key") == "weights.server.recv").first().alias("recv_t"),
                pl.col("t").filter(pl.col("key") == "weights.rpc.start").first().alias("start_t"),
                pl.col("t").filter(pl.col("key") == "weights.rpc.done").last().alias("done_t"),
                pl.col("rpc_ms").filter(pl.col("key") == "weights.rpc.done").last().alias("rpc_ms"),
                pl.col("server_ms").drop_nulls().last().alias("server_ms")))
            mine.extend(dict(r, source=src.source) for r in g.iter_rows(named=True))
        seen.update(h["tid"] for h in mine)
        out.extend(mine)
    return out


def _attach(u: dict[str, Any], h: dict[str, Any] | None) -> None:
    if h is None:
        return  # named missing below, with every call that found no server half
    missing = [m for m in u["missing"].split(",") if m]
    u["server_source"] = h["source"]
    u["recv_t"], u["rpc_start_t"], u["server_rpc_ms"] = h["recv_t"], h["start_t"], h["rpc_ms"]
    if h["server_ms"] is not None and u["server_ms"] is None:
        u["server_ms"] = h["server_ms"]
    missing += [e for e, v in (("server.recv", h["recv_t"]), ("rpc.start", h["start_t"]), ("rpc.done", h["done_t"])) if v is None]
    u["missing"] = ",".join(missing)
    if u["rpc_ms"] is None and h["rpc_ms"] is not None:
        u["rpc_ms"] = h["rpc_ms"]
    if u["op"] is None:
        u["op"] = h["op"]
    if u["queue_ms"] is None and u["wall_ms"] is not None and u["server_ms"] is not None:
        u["queue_ms"] = max(0.0, u["wall_ms"] - u["server_ms"])


def _server_only(h: dict[str, Any]) -> dict[str, Any]:
    u: dict[str, Any] = dict.fromkeys(UPDATE_SCHEMA)
    u.update(tid=h["tid"], op=h["op"], missing=",".join(CLIENT_EVENTS), attempts=0)
    _attach(u, h)
    return u


def _pair(ups: list[dict[str, Any]], hs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Client calls and server halves of one (trace id, op): by the echoed rpc_ms, then in order."""
    if len(ups) == 1 and len(hs) == 1:
        _attach(ups[0], hs[0])
        return ups
    free = list(hs)
    paired: set[int] = set()
    for i, u in enumerate(ups):
        m = next((h for h in free if u["rpc_ms"] is not None and h["rpc_ms"] is not None and abs(h["rpc_ms"] - u["rpc_ms"]) < 0.0015), None)
        if m is not None:
            free.remove(m)
            _attach(u, m)
            paired.add(i)
    for i, u in enumerate(ups):
        if i not in paired:
            _attach(u, free.pop(0) if free else None)
    return ups + [_server_only(h) for h in free]


def join_updates(sources: Sequence[Source]) -> pl.DataFrame:
    """All admin calls of the run (UPDATE_SCHEMA), in time order, each with its signature."""
    calls = client_calls(sources)
    halves = server_halves(sources)
    if halves:
        by: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        for h in halves:
            by.setdefault((h["tid"], h["op"]), []).append(h)
        tids = list({h["tid"] for h in halves})
        hit = calls.filter(pl.col("tid").is_in(tids))
        rows = hit.to_dicts()
        ups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        for u in rows:
            ups.setdefault((u["tid"], u["op"]), []).append(u)
        joined: list[dict[str, Any]] = []
        for k, us in ups.items():
            joined.extend(_pair(us, by.pop(k, [])))
        for hs in by.values():
            joined.extend(_server_only(h) for h in hs)
        rest = calls.filter(~pl.col("tid").is_in(tids))
        calls = pl.concat([rest, pl.DataFrame(joined, schema=UPDATE_SCHEMA)]) if joined else rest
    server_missing = ",".join(SERVER_EVENTS)
    calls = calls.with_columns(
        pl.when(pl.col("server_source").is_null())
        .then(pl.concat_str([pl.col("missing"), pl.lit("," + server_missing)]).str.strip_chars_start(","))
        .otherwise(pl.col("missing")).alias("missing"),
        ((pl.col("recv_t") - pl.col("t")) * 1000.0).alias("recv_delay_ms"),
    )
    calls = attach_checkpoint_waits(calls, sources)
    calls = calls.with_columns(rules.signature_expr().alias("signature"))
    start = pl.coalesce("t", "recv_t")
    return calls.with_columns(start.alias("_start")).sort(["_start", "client_seq"], nulls_last=True).drop("_start")


def attach_checkpoint_waits(calls: pl.DataFrame, sources: Sequence[Source]) -> pl.DataFrame:
    """A checkpoint wait belongs to the updates of its step, else to the next trace its orchestrator sends
    (all calls of that trace share it: one wait per sync)."""
    waits = [s.of("ckpt.wait.done").select(pl.lit(s.source).alias("client_source"), "seq", "target_step", "wait_ms") for s in sources]
    waits = [w for w in waits if w.height]
    if not waits or not calls.height:
        return calls
    w = pl.concat(waits)
    by_step = w.group_by("client_source", "target_step").agg(pl.col("wait_ms").last().alias("_ws")).rename({"target_step": "step"})
    out = calls.join(by_step, on=["client_source", "step"], how="left")
    first = (out.filter(pl.col("client_seq").is_not_null() & pl.col("client_source").is_not_null())
             .group_by("client_source", "tid").agg(pl.col("client_seq").min().alias("seq")).sort("seq"))
    near = first.join_asof(w.sort("seq").rename({"seq": "wseq"}).with_columns(pl.col("wseq").alias("seq")),
                           on="seq", by="client_source", strategy="backward", check_sortedness=False)
    near = (near.filter(pl.col("wseq").is_not_null()).sort("seq").unique(["client_source", "wseq"], keep="first")
            .select("client_source", "tid", pl.col("wait_ms").alias("_wo"), pl.col("target_step").alias("_so")))
    out = out.join(near, on=["client_source", "tid"], how="left")
    has_step = pl.col("_ws").is_not_null()
    return out.with_columns(
        pl.when(has_step).then(pl.col("_ws")).otherwise(pl.col("_wo")).alias("ckpt_wait_ms"),
        pl.when(has_step).then(pl.col("step")).otherwise(pl.col("_so")).alias("ckpt_step"),
    ).drop("_ws", "_wo", "_so")


class Update:
    """One admin call of one server (a row of the updates frame), built on demand: a run may hold millions."""

    __slots__ = (*UPDATE_SCHEMA, "signature", "around")

    def __init__(self, row: dict[str, Any]) -> None:
        for name in UPDATE_SCHEMA:
            setattr(self, name, row.get(name))
        self.signature: str = row.get("signature") or rules.HEALTHY
        self.missing: tuple[str, ...] = tuple(m for m in (row.get("missing") or "").split(",") if m)  # type: ignore[assignment]
        self.around: list[dict[str, Any]] | None = None

    @property
    def start(self) -> float | None:
        """Best-known start time (epoch seconds): client.send, else server.recv."""
        return self.t if self.t is not None else self.recv_t  # type: ignore[attr-defined]

    def diagnosis(self) -> Diagnosis:
        """The full diagnosis with the rule that fired."""
        return diagnose(self.queue_ms, self.rpc_ms, self.ckpt_wait_ms)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        diag = self.diagnosis()
        g = self.__getattribute__
        d: dict[str, Any] = {
            "trace_id": g("tid"), "server": g("server"), "op": g("op"), "step": g("step"), "t": self.start,
            "wall_ms": g("wall_ms"), "queue_ms": g("queue_ms"), "rpc_ms": g("rpc_ms"), "server_ms": g("server_ms"),
            "server_rpc_ms": g("server_rpc_ms"), "pool_wait_ms": g("pool_wait_ms"),
            "recv_delay_ms": g("recv_delay_ms"), "recv_delay_clock_skew_sensitive": g("recv_delay_ms") is not None,
            "ckpt_wait_ms": g("ckpt_wait_ms"), "ckpt_step": g("ckpt_step"), "attempts": g("attempts"), "status": g("status"), "ok": g("ok"),
            "missing": list(self.missing), "signature": self.signature, "rule": diag.rule, "also": list(diag.also),
            "client_source": g("client_source"), "server_source": g("server_source"),
        }
        if self.around is not None:
            d["generation_around"] = self.around
        return d
