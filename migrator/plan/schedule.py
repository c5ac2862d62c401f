"""Placing a plan's tests on its queues, before anything runs.

::

    history = History.load(results_root)               # durations of earlier runs
    expected = history.expected(plan, default_s=60)
    placements = schedule(plan, expected)              # predicted start of each, its queues
    makespan(placements)                               # the predicted end of the last

**Automatic assignment** (what seed 004's authors wished for): longest expected test first
(LPT; of three tie-breaks, the one whose schedule ends first), each onto the queues that free
first — a test over ``n`` hosts takes the earliest-free
queue of each of the ``n`` hosts whose such queue frees first, and starts when the last of
them frees. Queues or hosts a test is given (``where:``, a set's ``assign:``) are taken as
given; the scheduler picks the rest. Expected durations are the median of the test's last
runs (a history file next to the results), else its ``expected_s``, else a default.

**The global order.** The placements have one order (predicted start, then place order):
the runner (:mod:`.runner`) starts tests in it, each taking the queues that are really free
when its turn comes; the queues here are the prediction ``--dry-run`` prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from .model import Plan, TestEntry

HISTORY_FILE = "plan-history.json"
#: durations kept per test
HISTORY_KEEP = 5


@dataclass
class Placement:
    test: TestEntry
    queues: list[str]
    """The queues it holds, in the order of its hosts."""
    start: float
    """Predicted start, seconds from the plan's start."""
    expected: float
    order: int
    """Its place in the global order (see the module)."""

    @property
    def end(self) -> float:
        return self.start + self.expected

    @property
    def hosts(self) -> list[str]:
        return [q.rsplit("/", 1)[0] for q in self.queues]


def test_key(test: TestEntry) -> str:
    """A test's identity in the history: its name and what it runs (a changed test starts
    afresh)."""
    what = json.dumps([test.scenario, test.spec.hosts, test.spec.all_hosts, test.spec.params,
                       str(test.config)], sort_keys=True, default=str)
    return f"{test.name}:{hashlib.sha256(what.encode()).hexdigest()[:10]}"


class History:
    """Durations of earlier runs of tests (``plan-history.json`` in the results root)."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def load(cls, root: Path) -> "History":
        path = Path(root) / HISTORY_FILE
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        return cls(path, data)

    def expected(self, plan: Plan, default_s: float) -> dict[str, float]:
        """Test name -> expected seconds."""
        out = {}
        for t in plan.tests:
            seen = self.data.get(test_key(t), [])
            out[t.name] = (statistics.median(seen) if seen
                           else t.spec.expected_s or default_s)
        return out

    def record(self, test: TestEntry, seconds: float) -> None:
        """Add a finished run's duration and write the file (atomically)."""
        key = test_key(test)
        self.data[key] = (self.data.get(key, []) + [round(seconds, 3)])[-HISTORY_KEEP:]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def schedule(plan: Plan, expected: dict[str, float]) -> list[Placement]:
    """Every test of the plan placed (see the module), in the global order: the shortest of
    three greedy list schedules, all longest-expected-first, ties broken by file order, by
    tests with fixed places first, and by tests over more hosts first."""
    n = len(plan.tests)
    orders = [sorted(range(n), key=lambda i: (-expected[plan.tests[i].name], i)),
              sorted(range(n), key=lambda i: (-expected[plan.tests[i].name],
                                               not plan.tests[i].fixed, i)),
              sorted(range(n), key=lambda i: (-expected[plan.tests[i].name],
                                               -plan.tests[i].spec.hosts, i))]
    return min((_list_schedule(plan, expected, o) for o in orders), key=makespan)


def _list_schedule(plan: Plan, expected: dict[str, float], order: list[int]
                   ) -> list[Placement]:
    free = {q: 0.0 for q in plan.queues}
    rank = {q: i for i, q in enumerate(plan.queues)}
    by_host: dict[str, list[str]] = {}
    for q in plan.queues:
        by_host.setdefault(plan.host_of(q), []).append(q)

    def first_free(host: str, ranged: bool = False) -> str:
        return min((q for q in by_host[host] if not ranged or q in plan.queue_range),
                   key=lambda q: (free[q], rank[q]))

    placed = []
    for i in order:
        t = plan.tests[i]
        chosen = [place if "/" in place else first_free(place, t.needs_range and n == 0)
                  for n, place in enumerate(t.fixed)]
        if t.needs_range and not chosen:        # its first queue gives its addresses
            chosen = [min(plan.queue_range, key=lambda q: (free[q], rank[q]))]
        used = {plan.host_of(q) for q in chosen}
        others = sorted((first_free(h) for h in by_host if h not in used),
                        key=lambda q: (free[q], rank[q]))
        chosen += others[:t.spec.hosts - len(chosen)]
        start = max(free[q] for q in chosen)
        d = expected[t.name]
        for q in chosen:
            free[q] = start + d
        placed.append(Placement(t, chosen, start, d, 0))
    placed.sort(key=lambda p: (p.start, plan.tests.index(p.test)))
    for n, p in enumerate(placed):
        p.order = n
    return placed


def makespan(placements: list[Placement]) -> float:
    return max((p.end for p in placements), default=0.0)


def packing_bound(placements: list[Placement], queues: int) -> float:
    """Σ (duration × queues held) ÷ queues: no schedule ends sooner."""
    return sum(p.expected * len(p.queues) for p in placements) / max(1, queues)


__all__ = ["HISTORY_FILE", "History", "Placement", "makespan", "packing_bound", "schedule",
           "test_key"]
