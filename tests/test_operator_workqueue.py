"""The operator's work queue: one entry per job, never one job in two workers, delayed re-adds,
and jobs not reconciled yet served before re-reconciles (so a burst of applies creates gangs first);
when a job is looked at again (a finished one rarely)."""

from __future__ import annotations

import time

from pretrain_operator.workqueue import WorkQueue


def drain(q: WorkQueue) -> list:
    out = []
    while (key := q.get(timeout=0.01)) is not None:
        out.append(key)
        q.done(key)
    return out


def test_a_key_added_twice_is_served_once():
    q = WorkQueue()
    q.add("a"), q.add("b"), q.add("a")
    assert drain(q) == ["a", "b"]


def test_a_key_added_while_in_a_worker_is_served_again_after_it_is_done():
    q = WorkQueue()
    q.add("a")
    assert q.get(timeout=0.01) == "a"
    q.add("a")
    assert q.get(timeout=0.01) is None  # not to a second worker while the first has it
    q.done("a")
    assert q.get(timeout=0.01) == "a"


def test_new_jobs_go_before_re_reconciles_in_arrival_order():
    q = WorkQueue()
    q.add("old-1"), q.add("new-1", first=True), q.add("old-2"), q.add("new-2", first=True)
    q.add("old-2", first=True)  # already waiting: moves up, still once
    assert drain(q) == ["new-1", "new-2", "old-2", "old-1"]


def test_a_delayed_key_waits_its_delay_and_back_off_holds_it_against_events():
    q = WorkQueue()
    q.add("a", delay=1.0)  # margins for a slow machine with CPU steal: delays of a second or more
    assert q.get(timeout=0.05) is None
    assert q.get(timeout=3.0) == "a"
    q.done("a")
    q.backoff("a", 0.3)
    t0 = time.monotonic()
    q.add("a")  # an event meanwhile does not cut the back-off short
    assert q.get(timeout=1.0) == "a" and time.monotonic() - t0 >= 0.25


def test_a_key_requeued_by_every_pass_keeps_one_delayed_entry_the_earliest():
    # Each reconcile requeues its key for later; events run extra passes. Without one entry per key,
    # every extra pass would start another self-renewing chain of reconciles.
    q = WorkQueue()
    q.add("a", delay=3.0)
    q.add("a", delay=0.2)  # earlier: replaces it
    q.add("a", delay=2.0)  # later than the one waiting: dropped
    t0 = time.monotonic()
    assert q.get(timeout=3.0) == "a" and time.monotonic() - t0 < 1.5
    q.done("a")
    assert q.get(timeout=3.5) is None  # nothing else was waiting (the 2.0 and 3.0 entries were not kept)
    assert len(q) == 0


def test_a_finished_job_with_nothing_left_is_looked_at_only_at_the_finished_resync():
    from pretrain_operator.controller import next_pass
    from pretrain_operator.settings import OperatorSettings
    s = OperatorSettings(resync_s=30, finished_resync_s=600)
    assert next_pass(None, "Succeeded", s) == next_pass(None, "Failed", s) == 600
    assert next_pass(None, "Running", s) == 30 and next_pass(5.0, "Running", s) == 5.0
    assert next_pass(900.0, "Starting", s) == 30  # a long timeout is still looked at
    assert next_pass(2.0, "Failed", s) == 2.0  # pods still going, or a TTL due


def test_events_during_a_failed_pass_wait_for_its_back_off():
    q = WorkQueue()
    q.add("a")
    assert q.get(timeout=1.0) == "a"
    q.add("a")  # an event while the pass runs
    q.backoff("a", 1.5)  # the pass failed
    q.done("a")
    assert q.get(timeout=0.5) is None  # not at once
    assert q.get(timeout=3.0) == "a"


def test_a_requeue_left_by_an_earlier_pass_waits_for_a_later_failures_back_off():
    q = WorkQueue()
    q.add("a")
    assert q.get(timeout=1.0) == "a"
    q.add("a", delay=0.3)  # a pass's requeue (progress, resync) ...
    q.done("a")
    q.add("a")  # ... an event runs the next pass before it ...
    assert q.get(timeout=0.1) == "a"
    q.backoff("a", 1.5)  # ... which fails
    q.done("a")
    assert q.get(timeout=0.8) is None  # the requeue, due at 0.3 s, waits for the back-off
    assert q.get(timeout=3.0) == "a"
