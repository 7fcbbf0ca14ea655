"""What restarts cost a job, in its status and metrics: `status.runningSeconds` (time with every
node up, over all attempts) and `status.lostSteps` (steps trained past the last checkpoint by an
attempt that then ended: the next attempt trains them again). reconcile.decide on observed state,
no cluster; tests/test_operator_preemption.py shows them on the local cluster."""

from __future__ import annotations

import datetime as dt
import json

from pretrain_operator import contract as c, reconcile
from tests.jobs import observed_gang


def _running_for(job: dict, now: dt.datetime, seconds: int) -> None:
    job["status"]["conditions"] = [{"type": "Running", "status": "True", "reason": "AllNodesRunning", "message": "",
                                    "lastTransitionTime": reconcile.iso(now - dt.timedelta(seconds=seconds))}]


def _preempt(pod: dict, report: dict | None = None) -> None:
    t = {"exitCode": c.EXIT_PREEMPTED, "reason": "Error"}
    if report:
        t["message"] = json.dumps(report)
    pod["status"] = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": t}}]}


def _decide(job, spec, pods, nodes, now) -> dict:
    return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                               config_data=None, now=now)).status


def test_a_crash_past_the_last_checkpoint_counts_the_steps_the_next_attempt_trains_again():
    job, spec, pods, nodes, now = observed_gang("lossy")
    _running_for(job, now, 25)
    job["status"].update(runningSeconds=100, lostSteps=3,
                         progress={"step": 57, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=2))},
                         lastCheckpoint={"step": 50, "time": reconcile.iso(now), "path": "/checkpoints/step-00000050"})
    _preempt(pods[1])  # a rank's node reclaimed without notice: no checkpoint of its own
    st = _decide(job, spec, pods, nodes, now)
    assert st["restart"]["kind"] == "Preemption" and st["attempt"] == 2
    assert st["lostSteps"] == 3 + 7 and st["runningSeconds"] == 100 + 25


def test_a_preemption_that_checkpointed_its_step_loses_nothing():
    job, spec, pods, nodes, now = observed_gang("saved")
    _running_for(job, now, 25)
    job["status"].update(progress={"step": 57, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=2))},
                         lastCheckpoint={"step": 50, "time": reconcile.iso(now), "path": "/checkpoints/step-00000050"})
    _preempt(pods[0], {"step": 58, "totalSteps": 400, "checkpointStep": 58})  # its SIGTERM checkpoint
    _preempt(pods[1])
    st = _decide(job, spec, pods, nodes, now)
    assert st["restart"]["kind"] == "Preemption" and st.get("lostSteps", 0) == 0 and st["lastCheckpoint"]["step"] == 58


def test_a_restart_before_the_new_attempt_reported_progress_counts_nothing_again():
    # Attempt 2 began after the progress was last reported (by attempt 1, whose loss was counted
    # at its restart): it ends before reporting, so the same steps are not counted twice.
    job, spec, pods, nodes, now = observed_gang("again")
    job["status"].update(lostSteps=7, attemptStartTime=reconcile.iso(now - dt.timedelta(seconds=20)), phase="Starting",
                         progress={"step": 57, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=60))},
                         lastCheckpoint={"step": 50, "time": reconcile.iso(now), "path": "/checkpoints/step-00000050"})
    _preempt(pods[1])
    st = _decide(job, spec, pods, nodes, now)
    assert st["attempt"] == 2 and st["lostSteps"] == 7


def test_a_job_that_finishes_says_what_its_restarts_cost():
    job, spec, pods, nodes, now = observed_gang("done")
    _running_for(job, now, 30)
    job["status"].update(runningSeconds=600, lostSteps=12)
    for p in pods:
        p["status"] = {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 0}}}]}
    plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                               config_data=None, now=now))
    assert plan.status["phase"] == "Succeeded" and plan.status["runningSeconds"] == 630
    assert ("Normal", "Succeeded", "training finished in attempt 1: 630 s running, 12 step(s) trained again after restarts") in plan.events
    assert reconcile.running_seconds(plan.status, now + dt.timedelta(hours=1)) == 630  # no longer Running: no longer counted
