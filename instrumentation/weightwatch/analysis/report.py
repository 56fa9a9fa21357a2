"""The analysis of one run: build it from Partials, and its stable JSON form (``--format json``).

``Report.to_dict()`` is the documented schema (docs/analyze.md); bump SCHEMA_VERSION on any change
that is not purely additive.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from weightwatch.analysis import join, rules
from weightwatch.analysis.collect import Partial
from weightwatch.analysis.join import Table, Update, gen_index, generation_around, join_table
from weightwatch.analysis.stats import summarize

SCHEMA_VERSION = 1
MEASURES = ("wall_ms", "queue_ms", "rpc_ms", "server_ms", "pool_wait_ms", "recv_delay_ms")


class UpdateList(Sequence[Update]):
    """The run's updates in time order; Update objects are built on access (a run may have millions)."""

    def __init__(self, table: Table, gen: dict[str, tuple[list[int], list[tuple]]]):
        self.table, self._gen = table, gen

    def __len__(self) -> int:
        return self.table.n

    @overload
    def __getitem__(self, i: int) -> Update: ...
    @overload
    def __getitem__(self, i: slice) -> list[Update]: ...
    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return [self._make(j) for j in self.table.order[i]]
        return self._make(self.table.order[i])

    def __iter__(self) -> Iterator[Update]:
        for j in self.table.order:
            yield self._make(j)

    def column(self, name: str) -> list[Any]:
        """One field of every update, in time order."""
        col = self.table.column(name)
        return [col[j] for j in self.table.order]

    def _make(self, j: int) -> Update:
        u = self.table.update(j)
        if u.signature != rules.HEALTHY:
            u.around = generation_around(u, self._gen)
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
    options: dict[str, Any] = field(default_factory=dict)
    # raw series for plots (not in the JSON)
    series: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return self.parse["events"] == 0 and not self.updates

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
                "truncation_warn_pct": rules.TRUNCATION_WARN_PCT,
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
        }


def _verdict(counts: Counter[str], n: int) -> Verdict:
    full = {s: counts.get(s, 0) for s in rules.SIGNATURES}
    if not n:
        return Verdict(rules.HEALTHY, "no weight updates found", full)
    bad = [(c, s) for s, c in counts.items() if s != rules.HEALTHY]
    if bad:
        c, s = max(bad)
        if c / n >= rules.VERDICT_MIN_FRACTION and c >= min(rules.VERDICT_MIN_UPDATES, n):
            return Verdict(s, f"{c} of {n} updates ({100 * c / n:.0f}%) show {s} (>= {100 * rules.VERDICT_MIN_FRACTION:.0f}%)", full)
        return Verdict(rules.HEALTHY, f"{n - sum(x for x, _ in bad)} of {n} updates healthy; outliers ({c} {s}) under "
                       f"{100 * rules.VERDICT_MIN_FRACTION:.0f}% of updates or fewer than {rules.VERDICT_MIN_UPDATES}", full)
    return Verdict(rules.HEALTHY, f"all {n} updates under their thresholds", full)


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


class _GenSeries(Sequence[tuple]):
    """Every generation batch as (seq, completions, dur_ms, inflight), sorted; built when first read (only plots do)."""

    def __init__(self, parts: Sequence[Partial]):
        self._parts: Sequence[Partial] | None = parts
        self._rows: list[tuple] = []

    def _get(self) -> list[tuple]:
        if self._parts is not None:
            ps, self._parts = self._parts, None
            self._rows = sorted(r for p in ps for r in zip(p.gen["seq"], p.gen["completions"], p.gen["dur_ms"], p.gen["inflight"], strict=False))
        return self._rows

    def __len__(self) -> int:
        return len(self._get())

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._get()[i]

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._get())


def _bulk_signature_counts(table: Table) -> Counter[str]:
    """Counter(signature of every row), keys in order of first appearance like Counter over the column."""
    import numpy as np

    codes, first, counts = np.unique(table.bulk_sig, return_index=True, return_counts=True)
    seen: dict[str, tuple[int, int]] = {rules.SIGNATURES[c]: (f, k) for c, f, k in zip(codes.tolist(), first.tolist(), counts.tolist(), strict=True)}
    for i, sig in enumerate(table._cols["signature"]):
        f, k = seen.get(sig, (table.nb + i, 0))
        seen[sig] = (f, k + 1)
    return Counter({sig: k for sig, (f, k) in sorted(seen.items(), key=lambda x: x[1][0])})


def _slowest_rows(table: Table, slowest: int) -> list[int]:
    """Rows of the ``slowest`` largest updates by wall time (else queue + rpc), ties to the later row (heapq.nlargest)."""
    n, k = table.n, max(0, slowest)
    if table.bulk is None:
        c = table.cols
        size = [w if w is not None else (q or 0.0) + (r or 0.0) for w, q, r in zip(c["wall_ms"], c["queue_ms"], c["rpc_ms"], strict=False)]
        return [j for _size, j in heapq.nlargest(k, zip(size, range(n), strict=False))]
    import numpy as np

    b, c = table.bulk, table._cols
    zero = lambda a: np.where(a == a, a, 0.0)  # noqa: E731
    bsize = np.where(b.wall_ms == b.wall_ms, b.wall_ms, zero(b.queue_ms) + zero(b.rpc_ms))
    rest = [w if w is not None else (q or 0.0) + (r or 0.0) for w, q, r in zip(c["wall_ms"], c["queue_ms"], c["rpc_ms"], strict=False)]
    size = np.concatenate([bsize, np.asarray(rest, dtype=np.float64)])
    if not k or not n:
        return []
    cand = np.argpartition(size, n - k)[n - k:] if k < n else np.arange(n)
    cut = size[cand].min()
    cand = np.flatnonzero(size >= cut)  # every row tied with the k-th largest, so ties break as in nlargest
    ranked = sorted(zip(size[cand].tolist(), cand.tolist(), strict=True), reverse=True)
    return [j for _s, j in ranked[:k]]


def build_report(parts: Sequence[Partial], *, slowest: int = 10, model_size: str | None = None, async_level: int | None = None) -> Report:
    """Join, diagnose and summarize a run read into Partials."""
    table = join_table(parts)
    n = table.n
    thr = rules.QUEUE_THRESHOLD_MS
    if table.bulk is not None:  # the numpy path: same numbers, no Python object per update
        measures = {m: summarize(table.array(m)) for m in MEASURES}
        breaches = int((table.array("queue_ms") > thr).sum())
        sig_counts = _bulk_signature_counts(table)
        missing_rows = Counter(table._cols["missing"])
        missing_rows[join.SERVER_EVENTS] += table.nb
    else:
        measures = {m: summarize(table.values(m)) for m in MEASURES}
        breaches = sum(1 for q in table.cols["queue_ms"] if q is not None and q > thr)
        sig_counts = Counter(table.cols["signature"])
        missing_rows = Counter(table.cols["missing"])
    measures["recv_delay_ms"]["clock_skew_sensitive"] = True
    missing: Counter[str] = Counter()
    incomplete = 0
    for miss, k in missing_rows.items():
        if miss:
            incomplete += k
            for e in miss:
                missing[e] += k
    updates_summary = {"count": n, "complete": n - incomplete, "incomplete": incomplete,
                       "missing_events": dict(sorted(missing.items())), "by_signature": dict(sig_counts)}

    writes = [r for p in parts for r in p.writes]
    waits = [r for p in parts for r in p.waits]
    wait_ms = [r[2] for r in waits]
    checkpoints = {
        "writes": len(writes),
        "write_ms": summarize(r[2] for r in writes),
        "wait_starts": sum(p.wait_starts for p in parts),
        "waits": len(waits),
        "wait_ms": summarize(wait_ms),
        "slow_waits": sum(1 for w in wait_ms if w > rules.CKPT_WAIT_SLOW_MS),
    }
    gen = gen_index(parts)
    completions = sum(sum(p.gen["completions"]) for p in parts)
    busy_s = sum(sum(p.gen["dur_ms"]) for p in parts) / 1000.0
    generation = {
        "batches": sum(len(p.gen["seq"]) for p in parts),
        "batch_starts": sum(len(p.gen_starts) for p in parts),
        "completions": completions,
        "batch_dur_ms": summarize([x for p in parts for x in p.gen["dur_ms"]]),
        "inflight": summarize([x for p in parts for x in p.gen["inflight"]]),
        "throughput_completions_per_s": (completions / busy_s) if busy_s > 0 else None,
    }
    roll = sorted((r for p in parts for r in p.rollouts), key=lambda r: r[2])
    lvl = async_level
    if lvl is None:
        lvls = [r[5] for r in roll if r[5] is not None]
        lvl = max(lvls) if lvls else None
    stale_over = sum(1 for r in roll if lvl is not None and r[4] > lvl)
    trunc = summarize(r[1] for r in roll)
    rollout = {
        "steps": len(roll),
        "trunc_pct": trunc,
        "truncation_warn": bool(trunc["mean"] is not None and trunc["mean"] > rules.TRUNCATION_WARN_PCT),
        "staleness": summarize(r[4] for r in roll),
        "async_level": lvl,
        "steps_over_async_level": stale_over if lvl is not None else None,
        "ok": (not roll) or (not (trunc["mean"] or 0) > rules.TRUNCATION_WARN_PCT and stale_over == 0),
    }
    top = [table.update(j) for j in _slowest_rows(table, slowest)]
    for u in top:
        u.around = generation_around(u, gen)
    rejected = Counter[str]()
    samples: dict[str, list[str]] = {}
    for p in parts:
        rejected.update(p.rejected)
        for cat, lines in p.samples.items():
            samples.setdefault(cat, []).extend(lines[:3])
    parse = {
        "lines": sum(p.lines for p in parts),
        "events": sum(p.events for p in parts) - sum(rejected.values()),
        "rejected_total": sum(rejected.values()),
        "rejected": dict(rejected.most_common()),
        "rejected_samples": {k: v[:3] for k, v in samples.items()},
    }
    inputs = [{"path": p.source, "kind": p.origin, "lines": p.lines, "events": p.events - sum(p.rejected.values()),
               "rejected": sum(p.rejected.values())} for p in parts]
    return Report(
        verdict=_verdict(sig_counts, n), updates=UpdateList(table, gen), inputs=inputs, parse=parse,
        updates_summary=updates_summary, measures=measures, checkpoints=checkpoints, generation=generation, rollout=rollout,
        baseline=_baseline(measures, model_size), slowest=top, queue_breaches=breaches,
        options={"slowest": slowest, "model_size": model_size, "async_level": async_level},
        series={"waits": waits, "writes": writes, "rollouts": roll,
                "gen": _GenSeries(parts)},
    )
