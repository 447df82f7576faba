"""Runs in flight in this process, each on its own thread, watched by the pages that asked for them.

A page does not compute in its own script thread: it starts a run here (or joins the one already going for the
same spec: a second press of Run, a second person asking for the same result) and watches it, drawing its
progress. That is what lets a person stop a run, and lets a page rerun (a click elsewhere, the Run button pressed
again) without starting the run over. A run is cancelled when the last page watching it stops it, or when no page
has looked at it for `ORPHAN_S` seconds, or when every page watching it says it has gone (a watcher may hand in an
`alive` check, e.g. "is this browser session still connected"): its progress callback raises `RunCancelled`, so
nothing is stored and the model's session is closed as for any failure (analysis.runner). The run checks at every
progress report, the last one just before it writes the store, so a tab closed in a run's last seconds stores
nothing either (the timer alone let such a run finish: a closed tab's page stops polling at once).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import RunCancelled

ORPHAN_S = 20.0  # a run nobody has watched for this long is stopped (a page polls several times a second)


@dataclass(eq=False)
class Job:
    key: str
    frac: float = 0.0
    what: str = "starting"
    started: float = field(default_factory=time.monotonic)
    outcome: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    watchers: dict[str, float] = field(default_factory=dict)  # who watches -> when they last looked
    alive: dict[str, Callable[[], bool]] = field(default_factory=dict)  # who watches -> are they still there
    cancelled: str = ""  # why it was stopped, once it was

    # -- the run's side ---------------------------------------------------------------------------------------
    def progress(self, frac: float, what: str) -> None:
        """The run's progress callback: records where it is; stops it when it was cancelled or nobody watches."""
        with _LOCK:
            if not self.cancelled and self.watchers and all(map(self._gone, self.watchers)):
                self.cancelled = "Nobody was waiting for this run any more (its page was closed); it was stopped."
            if self.cancelled:
                raise RunCancelled(self.cancelled)
            self.frac, self.what = min(max(float(frac), 0.0), 1.0), str(what)

    # -- the watchers' side -----------------------------------------------------------------------------------
    def _gone(self, who: str) -> bool:
        if time.monotonic() - self.watchers[who] > ORPHAN_S:
            return True
        check = self.alive.get(who)
        return check is not None and not check()

    def watch(self, who: str, alive: Callable[[], bool] | None = None) -> None:
        """`who` is looking at the run now; `alive`, when given, tells the run later whether `who` is still there."""
        with _LOCK:
            self.watchers[who] = time.monotonic()
            if alive is not None:
                self.alive[who] = alive

    def stop(self, who: str, why: str = "Stopped: nothing was stored.") -> bool:
        """`who` stops watching; the run is cancelled when nobody else watches it. Returns whether it was."""
        with _LOCK:
            self.watchers.pop(who, None)
            self.alive.pop(who, None)
            if not self.watchers and not self.done.is_set():
                self.cancelled = self.cancelled or why
                return True
            return False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self, estimate: float | None = None) -> float | None:
        """Seconds left: from the pace so far once a tenth is done, else from the estimate (None when neither)."""
        done = self.frac
        if done >= 0.1:
            return self.elapsed * (1 - done) / done
        if estimate:
            return max(estimate - self.elapsed, 0.0)
        return None


_LOCK = threading.RLock()
_JOBS: dict[str, Job] = {}


def start(key: str, who: str, work: Callable[[Callable[[float, str], None]], Any]) -> tuple[Job, bool]:
    """The run in flight for `key`, joined by `who`, or a new one running `work(progress)` on its own thread.
    Returns (job, started): started is False when an earlier request's run was joined."""
    with _LOCK:
        job = _JOBS.get(key)
        if job is not None and not job.done.is_set() and not job.cancelled:
            job.watchers[who] = time.monotonic()
            return job, False
        job = Job(key, watchers={who: time.monotonic()})
        _JOBS[key] = job

    def body() -> None:
        try:
            job.outcome = work(job.progress)
        except BaseException as e:  # noqa: BLE001 - handed to whoever watches
            job.error = e
        finally:
            with _LOCK:
                if _JOBS.get(key) is job:
                    del _JOBS[key]
            job.done.set()

    threading.Thread(target=body, name=f"run {key[:40]}", daemon=True).start()
    return job, True


def running(key: str) -> Job | None:
    with _LOCK:
        return _JOBS.get(key)
