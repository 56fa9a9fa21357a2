"""The demo's fault switches, turned into what each inference server is started with and the orchestrator's budgets.

Each switch makes one signature of the sync of today (ARCHITECTURE.md, "The weight sync of today") happen on real
vLLM, through the server's own fault injection (set in the server's environment, nothing is faked):

* ``--slow-pause MS``: every server sleeps MS before pausing the engine -> ``pause_slow``;
* ``--straggler MS``: the last server sleeps MS before loading the weights -> ``straggler`` (transfer phase);
* ``--hung-update``: every server sleeps ``--hung-delay`` (past half the transfer budget, under all of it) before
  loading -> ``hung`` while the call is in flight, then the call ends;
* ``--version-skew``: the last server's weight load fails (500) -> ``version_skew``;
* ``--slow-reload MS`` (the bare update's switch, kept): MS inside every engine reload -> ``engine_reload_slow``.

Pure functions of the parsed flags, so the plan is checked without starting anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from weightwatch.catalogue import HUNG_BUDGET_FRACTION
from weightwatch.contracts import PRIME_RL_BUDGETS_S

# The server's fault-injection variables (read by the inference plugin; ``weightwatch serve --inject-*`` sets the same).
from weightwatch.inference.config import ENV_INJECT_DELAY_MS, ENV_INJECT_FAIL, ENV_INJECT_RPC_DELAY_MS

#: --hung-update without its own budget: a 60 s transfer budget and a load of 90 % of it (54 s), so the call is in
#: flight past half its budget (30 s) for 24 s and then ends. AdminCallHung waits 15 s (``for: 15s``) once a call
#: passes half its budget, so with the budget below about 40 s the alert could not fire before the call ends.
HUNG_UPDATE_BUDGET_S = 60.0
HUNG_DELAY_FRACTION = 0.9
HUNG_UPDATE_DELAY_MS = HUNG_UPDATE_BUDGET_S * 1000 * HUNG_DELAY_FRACTION


class FaultPlanError(ValueError):
    """The switches cannot be combined as given (the message says why and what to do)."""


@dataclass(frozen=True)
class ServerFaults:
    """What one inference server is started with."""

    delay_ms: Mapping[str, float] = field(default_factory=dict)  # op -> ms slept before the engine call
    fail: tuple[str, ...] = ()  # ops that answer 500 as an engine failure
    rpc_delay_ms: float = 0.0  # added inside every engine reload (the bare update's --slow-reload)

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.delay_ms:
            out[ENV_INJECT_DELAY_MS] = ",".join(f"{op}={ms:g}" for op, ms in sorted(self.delay_ms.items()))
        if self.fail:
            out[ENV_INJECT_FAIL] = ",".join(self.fail)
        if self.rpc_delay_ms:
            out[ENV_INJECT_RPC_DELAY_MS] = repr(float(self.rpc_delay_ms))
        return out

    def describe(self) -> str:
        parts = [f"{op} +{ms:g} ms" for op, ms in sorted(self.delay_ms.items())]
        parts += [f"{op} fails" for op in self.fail]
        if self.rpc_delay_ms:
            parts.append(f"reload +{self.rpc_delay_ms:g} ms")
        return ", ".join(parts) or "no fault"


@dataclass(frozen=True)
class FaultPlan:
    servers: tuple[ServerFaults, ...]
    budgets_s: Mapping[str, float]  # op (pause, update_weights, resume) -> the orchestrator's total budget per call
    #: The signatures the switches should make the analyzer name (empty: none, healthy or a seed-era one).
    expected: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.servers)

    @property
    def any_fault(self) -> bool:
        return any(s.env() for s in self.servers)


def plan_faults(
    *,
    servers: int = 1,
    sync: str = "today",
    slow_pause_ms: float = 0.0,
    straggler_ms: float = 0.0,
    hung_update: bool = False,
    hung_delay_ms: float | None = None,
    version_skew: bool = False,
    slow_reload_ms: float = 0.0,
    pause_budget_s: float | None = None,
    update_budget_s: float | None = None,
    resume_budget_s: float | None = None,
) -> FaultPlan:
    """The per-server injections and the orchestrator's budgets for these switches, or a FaultPlanError."""
    notes: list[str] = []
    if servers < 1:
        raise FaultPlanError(f"--servers must be at least 1, got {servers}")
    needs_two = [name for name, on in (("--straggler", straggler_ms > 0), ("--version-skew", version_skew)) if on]
    if needs_two and servers < 2:
        verb = "needs" if len(needs_two) == 1 else "need"
        notes.append(f"{' and '.join(needs_two)} {verb} two servers: starting 2")
        servers = 2
    if sync == "bare" and (slow_pause_ms or hung_update):
        which = "--slow-pause" if slow_pause_ms else "--hung-update"
        raise FaultPlanError(f"{which} is a fault of the sync of today (pause -> update -> resume); drop --sync bare")
    budgets = {
        "pause": float(pause_budget_s or PRIME_RL_BUDGETS_S["pause"]),
        "update_weights": float(update_budget_s or (HUNG_UPDATE_BUDGET_S if hung_update else PRIME_RL_BUDGETS_S["update_weights"])),
        "resume": float(resume_budget_s or PRIME_RL_BUDGETS_S["resume"]),
    }
    delays: list[dict[str, float]] = [{} for _ in range(servers)]
    fails: list[list[str]] = [[] for _ in range(servers)]
    expected: list[str] = []
    if slow_pause_ms:
        for d in delays:
            d["pause"] = float(slow_pause_ms)
        expected.append("pause_slow")
    if hung_update:
        budget = budgets["update_weights"]
        delay = float(hung_delay_ms) if hung_delay_ms else budget * 1000 * HUNG_DELAY_FRACTION
        if not budget * 1000 * HUNG_BUDGET_FRACTION < delay < budget * 1000:
            raise FaultPlanError(
                f"--hung-delay {delay:g} ms must lie between half the update budget ({budget * 500:g} ms) and all of it "
                f"({budget * 1000:g} ms): past half it counts as hung, past all of it the call is cut off")
        for d in delays:
            d["update_weights"] = d.get("update_weights", 0.0) + delay
        expected.append("hung")
    if straggler_ms:
        target = servers - 1 if not version_skew else 0  # the skewed server fails fast; slow down a healthy one
        delays[target]["update_weights"] = delays[target].get("update_weights", 0.0) + float(straggler_ms)
        expected.append("straggler")
        if hung_update:
            notes.append("--straggler with --hung-update: the straggler's gap is measured against the hung servers' time")
    if version_skew:
        fails[servers - 1].append("update_weights")
        expected.append("version_skew")
    if slow_reload_ms:
        expected.append("engine_reload_slow")
    plan = tuple(
        ServerFaults(delay_ms=delays[i], fail=tuple(fails[i]), rpc_delay_ms=float(slow_reload_ms)) for i in range(servers)
    )
    return FaultPlan(servers=plan, budgets_s=budgets, expected=tuple(expected), notes=tuple(notes))
