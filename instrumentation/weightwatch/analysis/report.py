"""The analysis of one run: build it from Partials, and its stable JSON form (``--format json``).

``Report.to_dict()`` is the documented schema (docs/analyze.md); bump SCHEMA_VERSION on any change
that is not purely additive.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import polars as pl

from weightwatch.analysis import rules
from weightwatch.analysis.collect import Source
from weightwatch.analysis.join import Update, join_updates
from weightwatch.analysis.stats import summarize
from weightwatch.analysis.sync import Syncs, find_syncs

SCHEMA_VERSION = 1
MEASURES = ("wall_ms", "queue_ms", "rpc_ms", "server_ms", "pool_wait_ms", "recv_delay_ms")


class Generation:
    """Generation batches per source in log order, to show what ran around an update."""

    def __init__(self, sources: Sequence[Source]):
        self.by_source: dict[str, pl.DataFrame] = {}
        for s in sources:
            g = s.of("gen.batch.done").select("seq", "completions", "dur_ms", "inflight")
            if g.height:
                self.by_source[s.source] = g
        self._seqs = {k: v["seq"].to_numpy() for k, v in self.by_source.items()}

    def around(self, u: Update, before: int = 3, after: int = 1) -> list[dict[str, Any]]:
        src, seq = u.client_source, u.client_seq  # type: ignore[attr-defined]
        if src is None or seq is None or src not in self.by_source:
            return []
        i = int(np.searchsorted(self._seqs[src], seq))
        rows = self.by_source[src].slice(max(0, i - before), min(i, before) + after).iter_rows(named=True)
        return [{"position": "before" if r["seq"] < seq else "after", "completions": r["completions"], "dur_ms": r["dur_ms"],
                 "inflight": r["inflight"]} for r in rows]


class UpdateList(Sequence[Update]):
    """The run's admin calls in time order; Update objects are built on access (a run may have millions)."""

    def __init__(self, frame: pl.DataFrame, gen: Generation):
        self.frame, self._gen = frame, gen

    def __len__(self) -> int:
        return self.frame.height

    @overload
    def __getitem__(self, i: int) -> Update: ...
    @overload
    def __getitem__(self, i: slice) -> list[Update]: ...
    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return [self._make(r) for r in self.frame.slice(start, max(0, stop - start)).iter_rows(named=True)]
            return [self[j] for j in range(start, stop, step)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._make(self.frame.row(i, named=True))

    def __iter__(self) -> Iterator[Update]:
        for r in self.frame.iter_rows(named=True):
            yield self._make(r)

    def column(self, name: str) -> list[Any]:
        """One field of every update, in time order."""
        if name == "missing":
            return [tuple(m for m in x.split(",") if m) for x in self.frame["missing"].to_list()]
        return self.frame[name].to_list()

    def values(self, name: str) -> list[Any]:
        return self.frame[name].drop_nulls().to_list()

    def _make(self, row: dict[str, Any]) -> Update:
        u = Update(row)
        if u.signature != rules.HEALTHY:
            u.around = self._gen.around(u)
        return u


@dataclass
class Verdict:
    """The run-level diagnosis: the dominant signature across updates, with counts."""

    signature: str
    rule: str
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"signature": self.signature, "rule": self.rule, "counts": dict(self.counts)}


@dataclass
class Report:
    """Everything ``weightwatch analyze`` found in a run."""

    verdict: Verdict
    updates: UpdateList
    inputs: list[dict[str, Any]]
    parse: dict[str, Any]
    updates_summary: dict[str, Any]
    measures: dict[str, dict[str, Any]]
    checkpoints: dict[str, Any]
    generation: dict[str, Any]
    rollout: dict[str, Any]
    baseline: dict[str, Any] | None
    slowest: list[Update]
    queue_breaches: int
    syncs: Syncs
    options: dict[str, Any] = field(default_factory=dict)
    # raw series for plots (not in the JSON)
    series: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return self.parse["events"] == 0 and not len(self.updates)

    @property
    def breached(self) -> bool:
        """Did any update queue for longer than the 300 ms threshold (the exit status says so)?"""
        return self.queue_breaches > 0

    def to_dict(self, updates_limit: int | None = None) -> dict[str, Any]:
        n = len(self.updates) if updates_limit is None or updates_limit < 0 else min(updates_limit, len(self.updates))
        return {
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict.to_dict(),
            "thresholds": {
                "queue_ms": rules.QUEUE_THRESHOLD_MS, "rpc_slow_ms": rules.RPC_SLOW_MS,
                "ckpt_wait_slow_ms": rules.CKPT_WAIT_SLOW_MS, "verdict_min_fraction": rules.VERDICT_MIN_FRACTION,
                "verdict_min_updates": rules.VERDICT_MIN_UPDATES,
                "truncation_warn_pct": rules.TRUNCATION_WARN_PCT, "ckpt_wait_over_write_ratio": rules.CKPT_WAIT_OVER_WRITE_RATIO,
            },
            "queue_breaches": self.queue_breaches,
            "inputs": self.inputs,
            "parse": self.parse,
            "updates_summary": self.updates_summary,
            "measures": self.measures,
            "slowest": [u.to_dict() for u in self.slowest],
            "checkpoints": self.checkpoints,
            "generation": self.generation,
            "rollout": self.rollout,
            "baseline": self.baseline,
            "updates": [u.to_dict() for u in self.updates[:n]],
            "updates_truncated": n < len(self.updates),
            "syncs": self.syncs.to_dict(slowest=int(self.options.get("slowest") or 10)),
        }


def _verdict(counts: Counter[str], n: int, sync_counts: dict[str, int] | None = None, n_syncs: int = 0) -> Verdict:
    """The dominant signature: a failed sync (hung, version_skew) whenever one occurs, else the signature shown by
    the largest fraction of updates (or of syncs) when that fraction and count are over the verdict's minimums."""
    sync_counts = sync_counts or {}
    full = {s: counts.get(s, 0) for s in rules.SIGNATURES} | {s: sync_counts.get(s, 0) for s in rules.SYNC_SIGNATURES}
    for s in rules.SYNC_FAILURES:
        c = sync_counts.get(s, 0)
        if c:
            return Verdict(s, f"{c} of {n_syncs} syncs {'hung' if s == rules.HUNG else 'left servers on different versions'}", full)
    if not n and not n_syncs:
        return Verdict(rules.HEALTHY, "no weight updates found", full)
    bad = [(c / n, c, s, n, "updates") for s, c in counts.items() if s != rules.HEALTHY and c and n]
    bad += [(c / n_syncs, c, s, n_syncs, "syncs") for s, c in sync_counts.items() if c and n_syncs]
    if bad:
        frac, c, s, total, what = max(bad)
        if frac >= rules.VERDICT_MIN_FRACTION and c >= min(rules.VERDICT_MIN_UPDATES, total):
            return Verdict(s, f"{c} of {total} {what} ({100 * frac:.0f}%) show {s} (>= {100 * rules.VERDICT_MIN_FRACTION:.0f}%)", full)
        healthy = n - sum(c for s_, c in counts.items() if s_ != rules.HEALTHY)
        return Verdict(rules.HEALTHY, f"{healthy} of {n} updates healthy; outliers ({c} {s}) under "
                       f"{100 * rules.VERDICT_MIN_FRACTION:.0f}% of {what} or fewer than {rules.VERDICT_MIN_UPDATES}", full)
    return Verdict(rules.HEALTHY, f"all {n} updates under their thresholds" + (f", {n_syncs} syncs without a signature" if n_syncs else ""), full)


def _baseline(measures: dict[str, dict[str, Any]], model_size: str | None) -> dict[str, Any] | None:
    if not model_size:
        return None
    limits = rules.BASELINES[model_size]
    checks = []
    for m, limit in limits.items():
        v = measures.get(m, {}).get(rules.BASELINE_PERCENTILE)
        checks.append({"measure": m, "limit_ms": limit, "value_ms": v, "ok": None if v is None else v < limit})
    ok = all(c["ok"] is not False for c in checks)
    return {"model_size": model_size, "percentile": rules.BASELINE_PERCENTILE, "checks": checks, "ok": ok}


def _checkpoints(sources: Sequence[Source]) -> tuple[list[float], dict[str, Any]]:
    """Checkpoint writes and waits; every slow wait named with its step, the write of that step and the cause."""
    writes = [s.of("ckpt.write.done").select("seq", "step", "write_ms") for s in sources]
    waits = [s.of("ckpt.wait.done").select("seq", "target_step", "wait_ms") for s in sources]
    w = pl.concat(writes) if writes else pl.DataFrame(schema={"seq": pl.Int64, "step": pl.Int64, "write_ms": pl.Float64})
    q = pl.concat(waits) if waits else pl.DataFrame(schema={"seq": pl.Int64, "target_step": pl.Int64, "wait_ms": pl.Float64})
    slow = q.filter(pl.col("wait_ms") > rules.CKPT_WAIT_SLOW_MS)
    write_of = dict(w.group_by("step").agg(pl.col("write_ms").last()).iter_rows()) if w.height else {}
    listed = [{"step": step, "wait_ms": wait, "write_ms": write_of.get(step), "cause": rules.checkpoint_cause(wait, write_of.get(step))}
              for step, wait in slow.select("target_step", "wait_ms").iter_rows()]
    return q.sort("seq")["wait_ms"].to_list(), {
        "writes": w.height, "write_ms": summarize(w["write_ms"].to_list()),
        "wait_starts": sum(s.of("ckpt.wait.start").height for s in sources),
        "waits": q.height, "wait_ms": summarize(q["wait_ms"].to_list()), "slow_waits": slow.height, "slow": listed,
    }


def build_report(sources: Sequence[Source], *, slowest: int = 10, model_size: str | None = None, async_level: int | None = None) -> Report:
    """Join, diagnose and summarize a run read into Sources."""
    table = join_updates(sources)
    n = table.height
    thr = rules.QUEUE_THRESHOLD_MS
    measures = {m: summarize(table[m].drop_nulls().to_numpy()) for m in MEASURES}
    measures["recv_delay_ms"]["clock_skew_sensitive"] = True
    breaches = int((table["queue_ms"] > thr).sum() or 0)
    sig = table["signature"].value_counts(sort=False) if n else None
    sig_counts: Counter[str] = Counter(dict(zip(sig["signature"].to_list(), sig["count"].to_list(), strict=True))) if sig is not None else Counter()
    miss = table["missing"].value_counts() if n else None
    missing: Counter[str] = Counter()
    incomplete = 0
    if miss is not None:
        for m, k in miss.iter_rows():
            if m:
                incomplete += k
                for e in m.split(","):
                    missing[e] += k
    never_done = table.filter(pl.col("missing").str.starts_with("client.done"))
    updates_summary = {"count": n, "complete": n - incomplete, "incomplete": incomplete,
                       "missing_events": dict(sorted(missing.items())), "by_signature": dict(sig_counts),
                       "never_done": [{"trace_id": r["tid"], "server": r["server"], "op": r["op"], "step": r["step"], "t": r["t"],
                                       "client_source": r["client_source"]} for r in never_done.head(50).iter_rows(named=True)],
                       "never_done_total": never_done.height}
    syncs = find_syncs(table, sources)
    waits, checkpoints = _checkpoints(sources)
    gen = Generation(sources)
    g = pl.concat([f for f in gen.by_source.values()]) if gen.by_source else pl.DataFrame(
        schema={"seq": pl.Int64, "completions": pl.Int64, "dur_ms": pl.Float64, "inflight": pl.Int64})
    completions = int(g["completions"].sum() or 0)
    busy_s = float(g["dur_ms"].sum() or 0.0) / 1000.0
    generation = {
        "batches": g.height, "batch_starts": sum(s.of("gen.batch.start").height for s in sources), "completions": completions,
        "batch_dur_ms": summarize(g["dur_ms"].drop_nulls().to_numpy()), "inflight": summarize(g["inflight"].cast(pl.Float64).to_numpy()),
        "throughput_completions_per_s": (completions / busy_s) if busy_s > 0 else None,
    }
    roll_frames = [s.of("rollout").select("seq", "trunc_pct", "current_step", "ckpt_step", "staleness", "async_level") for s in sources]
    roll = sorted((r for f in roll_frames for r in f.iter_rows()), key=lambda r: r[2])
    lvl = async_level
    if lvl is None:
        lvls = [r[5] for r in roll if r[5] is not None]
        lvl = max(lvls) if lvls else None
    stale_over = sum(1 for r in roll if lvl is not None and r[4] > lvl)
    trunc = summarize(r[1] for r in roll)
    rollout = {
        "steps": len(roll), "trunc_pct": trunc,
        "truncation_warn": bool(trunc["mean"] is not None and trunc["mean"] > rules.TRUNCATION_WARN_PCT),
        "staleness": summarize(r[4] for r in roll), "async_level": lvl,
        "steps_over_async_level": stale_over if lvl is not None else None,
        "ok": (not roll) or (not (trunc["mean"] or 0) > rules.TRUNCATION_WARN_PCT and stale_over == 0),
    }
    size = pl.coalesce("wall_ms", pl.col("queue_ms").fill_null(0.0) + pl.col("rpc_ms").fill_null(0.0))
    top_rows = table.with_row_index("_i").with_columns(size.alias("_size")).sort(["_size", "_i"], descending=True).head(max(0, slowest))
    top = [Update(r) for r in top_rows.iter_rows(named=True)]
    for u in top:
        u.around = gen.around(u)
    rejected = Counter[str]()
    samples: dict[str, list[str]] = {}
    for p in sources:
        rejected.update(p.rejected)
        for cat, lines in p.samples.items():
            samples.setdefault(cat, []).extend(lines[:3])
    parse = {
        "lines": sum(p.lines for p in sources), "events": sum(p.events for p in sources),
        "rejected_total": sum(rejected.values()), "rejected": dict(rejected.most_common()),
        "rejected_samples": {k: v[:3] for k, v in samples.items()},
    }
    inputs = [{"path": p.source, "kind": p.origin, "lines": p.lines, "events": p.events, "rejected": sum(p.rejected.values())} for p in sources]
    sync_counts = syncs.counts()
    return Report(
        verdict=_verdict(sig_counts, n, sync_counts, len(syncs)), updates=UpdateList(table, gen), inputs=inputs, parse=parse,
        updates_summary=updates_summary, measures=measures, checkpoints=checkpoints, generation=generation, rollout=rollout,
        baseline=_baseline(measures, model_size), slowest=top, queue_breaches=breaches, syncs=syncs,
        options={"slowest": slowest, "model_size": model_size, "async_level": async_level},
        series={"rollouts": roll, "gen": g, "waits": waits},
    )
