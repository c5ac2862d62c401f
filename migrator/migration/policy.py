"""The convergence policy of one running migration: which action, when, and why.

:class:`PolicyTracker` is fed every progress record a driver reads (QEMU's query-migrate,
libvirt's job stats) and answers with the :class:`Decision` s due now; the driver carries them
out (:meth:`~migrator.migration.engine.BaseMigration._apply_decisions`). It holds no I/O, so
what it decides depends only on the records and the clock, and every decision says which
limit fired, with the figures it was taken on.

The rules (the policy's fields are documented in :class:`~migrator.config.ConvergencePolicy`):

* the **downtime ramp** steps are sent when their time comes (QEMU reads the limit at each of
  its iteration boundaries);
* a **limit** (completion or progress) that is passed takes the next action at the next
  iteration boundary, or at once when that action is ``abort``, or when the pass in progress
  has run on for a tenth of the limit since it was passed; both clocks then start again;
* a limit passed after ``pause`` (the list's last action that is not ``abort``) aborts;
* in postcopy (taken by the policy, or started by ``postcopy_after_s``) only the completion
  limit applies, and it ends the migration: nothing can be rolled back there, so the engine
  reports it SPLIT, as any failure after the switchover (``stall_s`` first tries recovery).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..config import ConvergencePolicy

#: a limit passed in the middle of a pass waits for the pass's end at most this share of it
GRACE = 0.1


@dataclass(frozen=True)
class Decision:
    """One decision of the policy, as the migration record keeps it."""

    t: float                 #: seconds since 'migrate'
    wall: float              #: time.time() when taken
    trigger: str             #: completion | progress | downtime-ramp
    action: str              #: auto-converge | postcopy | pause | abort | downtime
    reason: str              #: the limit and the figures it fired on, in words
    iteration: int           #: QEMU's dirty-bitmap syncs so far
    remaining: int           #: bytes
    dirty_pages_rate: int    #: pages/s
    mbps: float
    cpu_throttle: int        #: percent
    downtime_ms: int | None = None   #: the new limit (action downtime)

    def to_json(self) -> dict:
        return asdict(self)


class PolicyTracker:
    """Decides, from one migration's progress records, what its policy does and when.

    :param policy: the migration's policy.
    :param mem_mib: the guest's memory (the limits and the ramp scale with it).
    :param t0: ``time.monotonic()`` when 'migrate' was issued.
    """

    def __init__(self, policy: ConvergencePolicy, mem_mib: int, t0: float):
        self.policy = policy
        self.t0 = t0
        self.window = policy.completion_for(mem_mib)
        self._ramp = policy.downtime_ramp.schedule(mem_mib) if policy.downtime_ramp else []
        self._next_action = 0
        self._clock = t0              # both limits count from here (reset by each action)
        self._low: int | None = None  # the lowest remaining bytes since the clock started
        self._low_at = t0
        self._iteration = 0
        self._passed_at: float | None = None   # when the pending limit was passed
        self.paused = False           # 'pause' taken: the guest does not run
        self.in_postcopy = False      # only the completion limit applies, and it ends it
        self.done = False             # abort taken: nothing more
        self.decisions: list[Decision] = []

    def initial_downtime_ms(self) -> int | None:
        """The ramp's first step, set before 'migrate' (None: no ramp)."""
        if not self._ramp:
            return None
        return self._ramp.pop(0)[1]

    def step(self, rec, now: float | None = None, postcopy: bool = False) -> list[Decision]:
        """The decisions due after progress record ``rec`` (a
        :class:`~migrator.migration.engine.ProgressRecord`), taken at monotonic time ``now``.

        :param postcopy: the migration is in postcopy (then only the completion limit
            applies, and it ends the migration).
        """
        now = time.monotonic() if now is None else now
        due: list[Decision] = []
        boundary = rec.iteration > self._iteration
        self._iteration = max(self._iteration, rec.iteration)
        if rec.status != "setup" and rec.transferred > 0 and (
                self._low is None or rec.remaining < self._low):
            self._low, self._low_at = rec.remaining, now
        while self._ramp and self._ramp[0][0] <= now - self.t0:
            at, ms = self._ramp.pop(0)
            step = self.policy.downtime_ramp.steps - len(self._ramp)
            due.append(self._decide(rec, now, "downtime-ramp", "downtime",
                                    f"step {step} of {self.policy.downtime_ramp.steps} at "
                                    f"{at:.0f} s: tolerated downtime {ms} ms", downtime_ms=ms))
        if postcopy:
            self.in_postcopy = True
        if self.done:
            return due
        limit = self._passed(now)
        if limit is None:
            self._passed_at = None
            return due
        trigger, reason, span = limit
        if self._passed_at is None:
            self._passed_at = now
        action = (self.policy.actions[self._next_action]
                  if self._next_action < len(self.policy.actions) and not self.in_postcopy
                  else "abort")
        if action != "abort" and not boundary and now - self._passed_at < GRACE * span:
            return due                  # wait for the pass to end
        if self.in_postcopy:
            reason += " in postcopy"
        elif self._next_action >= len(self.policy.actions):
            reason += " after the guest was paused"
        self._next_action += 1
        due.append(self._decide(rec, now, trigger, action, reason))
        self._clock = self._low_at = now
        self._low = None
        self._passed_at = None
        if action == "pause":
            self.paused = True
        if action == "postcopy":
            self.in_postcopy = True
        if action == "abort":
            self.done = True
        return due

    def _passed(self, now: float) -> tuple[str, str, float] | None:
        """(trigger, reason, the limit's span) of the limit passed now, or None."""
        since = now - self._clock
        n = self._next_action
        if since >= self.window:
            return ("completion", f"not completed {since:.1f} s "
                    f"{'after the last action' if n else 'after migrate'} (limit "
                    f"{self.window:g} s)", self.window)
        p = self.policy.progress_timeout_s
        if p is not None and not self.paused and not self.in_postcopy \
                and now - self._low_at >= p:
            low = f"{self._low / 2**20:.0f} MiB" if self._low is not None else "none yet"
            return ("progress", f"remaining bytes not lower for {now - self._low_at:.1f} s "
                    f"(limit {p:g} s; lowest {low})", p)
        return None

    def _decide(self, rec, now: float, trigger: str, action: str, reason: str,
                downtime_ms: int | None = None) -> Decision:
        d = Decision(t=round(now - self.t0, 3), wall=time.time(), trigger=trigger,
                     action=action, reason=reason, iteration=rec.iteration,
                     remaining=rec.remaining, dirty_pages_rate=rec.dirty_pages_rate,
                     mbps=round(rec.mbps, 1), cpu_throttle=rec.cpu_throttle,
                     downtime_ms=downtime_ms)
        self.decisions.append(d)
        return d


__all__ = ["Decision", "PolicyTracker", "GRACE"]
