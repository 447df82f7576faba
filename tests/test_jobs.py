"""Runs in flight (analysis/jobs.py): a second request joins the run instead of starting it again; Stop cancels it
with nothing stored and the model freed; a run nobody watches stops; progress moves within the information plane's
parts (issue 26, item 6). The browser test presses Stop on a real page (tests/test_browser.py)."""
from __future__ import annotations

import threading
import time

import pytest

from analysis import jobs
from analysis.analyses.infoplane.compute import InfoPlaneSpec
from analysis.analyses.patching.spec import PatchingSpec
from analysis.errors import RunCancelled
from analysis.runner import run
from analysis.store import Store

HEAVY = PatchingSpec.from_dict(dict(n_pairs=8, components="resid_pre,z_by_pos", methods="activation,atp"))


def test_a_second_request_joins_the_run_in_flight():
    calls, gate = [], threading.Event()

    def work(progress):
        calls.append(1)
        gate.wait(10)
        return "result"

    first, started = jobs.start("k-join", "alice", work)
    second, again = jobs.start("k-join", "bob", work)
    assert started and not again and second is first
    gate.set()
    assert first.done.wait(10) and first.outcome == "result" and calls == [1]
    third, new = jobs.start("k-join", "alice", work)  # once finished, the same key runs again (a store hit, then)
    assert new and third is not first
    third.done.wait(10)


def test_stop_cancels_only_when_nobody_else_watches(tmp_path, default_handle):
    store = Store(tmp_path / "s.duckdb")
    seen, asked = threading.Event(), threading.Event()

    def work(progress):
        def report(frac, what):  # the run's reports wait for the test to press Stop, so it cannot finish first
            seen.set()
            asked.wait(30)
            progress(frac, what)
        return run(HEAVY, store=store, progress=report)

    job, _ = jobs.start("k-stop", "alice", work)
    jobs.start("k-stop", "bob", work)
    assert seen.wait(60)
    assert not job.stop("alice")  # bob still waits for it
    assert not job.cancelled
    assert job.stop("bob")
    asked.set()
    assert job.done.wait(120)
    assert isinstance(job.error, RunCancelled) and "Stopped" in str(job.error)
    assert store.runs("patching").empty  # nothing stored
    assert default_handle.lock.acquire(timeout=5)  # the model is free
    default_handle.lock.release()
    assert jobs.running("k-stop") is None


def test_a_stop_after_the_last_report_of_the_compute_still_stores_nothing(tmp_path, default_handle):
    """A tab closed while the compute makes its last steps (no report left in it) used to store the run anyway
    (seen in CI's browser test): the runner reports once more before it writes the store."""
    store = Store(tmp_path / "s.duckdb")
    job = jobs.Job("k-late", watchers={"alice": time.monotonic()})
    stopped = []

    def report(frac, what):
        if what == "storing the result" and not stopped:  # the compute is over: Stop arrives now
            stopped.append(job.stop("alice"))
        job.progress(frac, what)

    with pytest.raises(RunCancelled):
        run(HEAVY, store=store, progress=report)
    assert stopped == [True] and store.runs("patching").empty


def test_a_run_nobody_watches_stops(monkeypatch, tmp_path):
    monkeypatch.setattr(jobs, "ORPHAN_S", 0.2)
    store = Store(tmp_path / "s.duckdb")

    def work(progress):
        time.sleep(0.5)  # the page that asked has gone quiet by the first report
        return run(HEAVY, store=store, progress=progress)

    job, _ = jobs.start("k-orphan", "gone", work)
    assert job.done.wait(120)
    assert isinstance(job.error, RunCancelled) and "Nobody was waiting" in str(job.error)
    assert store.runs("patching").empty


def test_time_left_from_the_pace_and_before_it_from_the_estimate():
    job = jobs.Job("k-time")
    job.started -= 10
    assert job.time_left() is None and job.time_left(30) == pytest.approx(20, abs=0.5)
    job.frac = 0.25  # a quarter done in 10 s: 30 s left
    assert job.time_left(1000) == pytest.approx(30, abs=0.5)


def test_the_information_plane_reports_progress_within_each_model(tmp_path):
    """A cold information-plane run showed "model 1 of 7 (step 100)" for minutes: now each layer of each model
    moves the bar."""
    reports = []
    spec = InfoPlaneSpec.from_dict(dict(n_samples=60, checkpoints="default"))
    run(spec, store=Store(tmp_path / "s.duckdb"), progress=lambda f, w: reports.append((f, w)))
    inside = [(f, w) for f, w in reports if "layer" in w]
    from analysis import load_model

    assert len(inside) == load_model("default").summary.n_layers
    fracs = [f for f, _ in reports if f < 1.0]
    assert fracs == sorted(fracs) and len(set(fracs)) > 3


def test_a_run_stops_once_every_page_watching_it_has_gone(tmp_path, default_handle):
    """A closed tab's script is stopped by Streamlit before it could stop its run (and a rerun stops the script the
    same way, so the script cannot tell the two apart): the run asks each watcher whether it is still there at every
    report. CI's browser test saw a tab closed in a run's last seconds outlive the orphan timer and store its run.
    Both directions: while one of two watchers is there the run goes on and is stored; when both have gone it stops
    and stores nothing."""
    there = {"alice": True, "bob": True}

    def watched(key, store):
        job = jobs.Job(key, watchers={w: time.monotonic() for w in there})
        for w in there:
            job.watch(w, lambda w=w: there[w])
        seen = []

        def report(frac, what):
            seen.append(what)
            if len(seen) == 2:
                there["alice"] = False  # alice's tab closes mid-run
            if what == "storing the result" and leave_bob:
                there["bob"] = False  # bob's too, in the run's last step
            job.progress(frac, what)

        return run(HEAVY, store=store, progress=report)

    leave_bob = False
    kept = Store(tmp_path / "kept.duckdb")
    assert not watched("k-alive", kept).hit and len(kept.runs("patching")) == 1  # bob still watches: stored
    there.update(alice=True, bob=True)
    leave_bob = True
    gone = Store(tmp_path / "gone.duckdb")
    with pytest.raises(RunCancelled, match="Nobody was waiting"):
        watched("k-gone", gone)
    assert gone.runs("patching").empty
    assert default_handle.lock.acquire(timeout=5)  # the model is free
    default_handle.lock.release()
