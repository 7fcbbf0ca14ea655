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


def _decide(job, spec, pods, nodes, now, gone: list[dict] = ()) -> dict:
    """The status after one pass; `gone`: pods deleted before it that the watch last saw."""
    return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                               config_data=None, now=now,
                                               last_seen={p["metadata"]["name"]: p for p in gone})).status


_DISRUPTION = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}


def _evicted(name: str, rank: int, step: int, checkpoint: int):
    """A running gang whose rank `rank` is being evicted while rank 0 reports `step`, its last
    checkpoint at `checkpoint`, and the status of the pass that sees it (a restart recorded)."""
    job, spec, pods, nodes, now = observed_gang(name)
    _running_for(job, now, 25)
    job["status"].update(progress={"step": step, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=1))},
                         lastCheckpoint={"step": checkpoint, "time": reconcile.iso(now),
                                         "path": f"/checkpoints/step-{checkpoint:08d}"})
    pods[rank]["status"]["conditions"].append(dict(_DISRUPTION))
    return job, spec, pods, nodes, now, _decide(job, spec, pods, nodes, now)


def _exited_evicted(pod: dict, report: dict) -> dict:
    """`pod` as the watch last saw it: exited preempted with `report`, its DisruptionTarget kept."""
    _preempt(pod, report)
    pod["status"]["conditions"] = [dict(_DISRUPTION)]
    return pod


def _next_gang(job, spec, pods, nodes, now, st: dict) -> tuple[dict, dict]:
    """The passes after a restart was recorded in `st`: the old `pods` going (as seen), then gone and
    the next gang created. The status after each."""
    job = {**job, "status": st}
    going = _decide(job, spec, pods, nodes, now + dt.timedelta(seconds=1))
    created = _decide({**job, "status": going}, spec, [], nodes, now + dt.timedelta(seconds=2))
    assert created["attemptStartTime"] and created["attempt"] == st["attempt"], created
    return going, created


def test_a_crash_past_the_last_checkpoint_counts_the_steps_the_next_attempt_trains_again():
    job, spec, pods, nodes, now = observed_gang("lossy")
    _running_for(job, now, 25)
    job["status"].update(runningSeconds=100, lostSteps=3,
                         progress={"step": 57, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=2))},
                         lastCheckpoint={"step": 50, "time": reconcile.iso(now), "path": "/checkpoints/step-00000050"})
    _preempt(pods[1])  # a rank's node reclaimed without notice: no checkpoint of its own
    st = _decide(job, spec, pods, nodes, now)
    assert st["restart"]["kind"] == "Preemption" and st["attempt"] == 2 and st["runningSeconds"] == 100 + 25
    assert st["restart"]["reachedStep"] == 57
    _preempt(pods[0])  # stopped too, its last save not committed (its node gone first): no report
    going, created = _next_gang(job, spec, pods, nodes, now, st)
    assert going["lostSteps"] == 3  # counted when the next gang starts, from the checkpoint it starts from
    assert created["lostSteps"] == 3 + 7 and created["runningSeconds"] == 100 + 25
    # Counted once: a pass after the create (an operator killed after that write) adds nothing.
    assert _decide({**job, "status": created}, spec, [], nodes, now + dt.timedelta(seconds=3))["lostSteps"] == 3 + 7


def test_a_preemption_that_checkpointed_its_step_loses_nothing():
    job, spec, pods, nodes, now = observed_gang("saved")
    _running_for(job, now, 25)
    job["status"].update(progress={"step": 57, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=2))},
                         lastCheckpoint={"step": 50, "time": reconcile.iso(now), "path": "/checkpoints/step-00000050"})
    _preempt(pods[0], {"step": 58, "totalSteps": 400, "checkpointStep": 58})  # its SIGTERM checkpoint
    _preempt(pods[1])
    st = _decide(job, spec, pods, nodes, now)
    assert st["restart"]["kind"] == "Preemption" and st["lastCheckpoint"]["step"] == 58
    assert _next_gang(job, spec, pods, nodes, now, st)[1].get("lostSteps", 0) == 0


def test_a_sigterm_checkpoint_committed_after_the_restart_was_decided_loses_nothing():
    # As in make demo: the restart is decided at the eviction, while rank 0 still trains (its
    # progress 2 steps past the notice's checkpoint); the gang stops at its next step and saves it,
    # and rank 0's final report, read as the old pods go, says so. Before: 2 steps counted lost.
    job, spec, pods, nodes, now, st = _evicted("evicted", rank=1, step=84, checkpoint=82)
    assert st["restart"]["kind"] == "Preemption" and st["restart"]["reachedStep"] == 84
    for i, p in enumerate(pods):
        _preempt(p, {"step": 86, "totalSteps": 400, "checkpointStep": 86} if i == 0 else None)
    going, created = _next_gang(job, spec, pods, nodes, now, st)
    assert going["lastCheckpoint"]["step"] == 86 and going["restart"]["reachedStep"] == 86
    assert created.get("lostSteps", 0) == 0


def test_a_restart_before_the_new_attempt_reported_progress_counts_nothing_again():
    # Attempt 2 began after the progress was last reported (by attempt 1, whose loss was counted
    # at its restart): it ends before reporting, so the same steps are not counted twice.
    job, spec, pods, nodes, now = observed_gang("again")
    job["status"].update(lostSteps=7, attemptStartTime=reconcile.iso(now - dt.timedelta(seconds=20)), phase="Starting",
                         progress={"step": 57, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=60))},
                         lastCheckpoint={"step": 50, "time": reconcile.iso(now), "path": "/checkpoints/step-00000050"})
    _preempt(pods[1])
    st = _decide(job, spec, pods, nodes, now)
    assert st["attempt"] == 2 and st["restart"]["reachedStep"] == 0
    assert _next_gang(job, spec, pods, nodes, now, st)[1]["lostSteps"] == 7


def _carried(name: str):
    """Attempt 2 replaced before its gang was created (suspended while it waited, attempt 1's pods
    still going), then resumed as attempt 3. Returns (job, spec, pods, nodes, now, the status after
    the suspend, the status after the resume)."""
    job, spec, pods, nodes, now = observed_gang(name)
    job["status"].update(attempt=2, phase="Restarting", attemptStartTime="", gangCreated=False,
                         restart={"fromAttempt": 1, "kind": "Preemption", "reason": "Evicted", "message": "",
                                  "requestedAt": reconcile.iso(now), "reachedStep": 57},
                         progress={"step": 57, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=5))},
                         lastCheckpoint={"step": 50, "time": reconcile.iso(now), "path": "/checkpoints/step-00000050"})
    job["spec"]["suspend"] = True
    suspended = _decide(job, spec.model_copy(update={"suspend": True}), pods, nodes, now)
    job["spec"]["suspend"] = False
    resumed = _decide({**job, "status": suspended}, spec, pods, nodes, now + dt.timedelta(seconds=1))
    return job, spec, pods, nodes, now, suspended, resumed


def test_steps_of_an_attempt_whose_successor_never_started_are_counted_at_the_next_gang():
    # Attempt 1's steps past the checkpoint are carried to the gang of attempt 3, not dropped.
    job, spec, pods, nodes, now, suspended, resumed = _carried("carried")
    assert suspended["phase"] == "Suspended" and suspended.get("lostSteps", 0) == 0
    assert resumed["attempt"] == 3 and resumed["restart"]["reachedStep"] == 57
    created = _decide({**job, "status": resumed}, spec, [], nodes, now + dt.timedelta(seconds=2))
    assert created["attemptStartTime"] and created["lostSteps"] == 7


def test_the_final_report_of_a_pod_whose_attempt_was_carried_past_a_never_started_one_still_counts():
    # Attempt 1's rank 0 exits after the resume: its last step (its SIGTERM save refused) raises the
    # figure carried to attempt 3. Before: only attempt 2's pods (it had none) were read for it.
    job, spec, pods, nodes, now, _, resumed = _carried("carried-report")
    assert resumed["attempt"] == 3 and resumed["restart"]["fromAttempt"] == 1
    _preempt(pods[0], {"step": 60, "totalSteps": 400, "checkpointStep": 55})
    _preempt(pods[1])
    going, created = _next_gang(job, spec, pods, nodes, now, resumed)
    assert going["restart"]["reachedStep"] == 60 and going["lastCheckpoint"]["step"] == 55
    assert created["lostSteps"] == 60 - 55


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


def test_the_final_report_of_an_evicted_rank_0_gone_before_the_next_pass_still_counts():
    # As in make demo when the reclaimed node runs rank 0: its pod saves on the eviction's SIGTERM,
    # exits and is deleted before the operator lists the pods again; the watch saw its last state.
    # Before: its checkpoint was not seen, and steps were counted that the next attempt resumed after.
    job, spec, pods, nodes, now, st = _evicted("rank0-evicted", rank=0, step=83, checkpoint=82)
    assert st["restart"]["reachedStep"] == 83
    evicted = _exited_evicted(pods[0], {"step": 85, "totalSteps": 400, "checkpointStep": 85})
    going = _decide({**job, "status": st}, spec, [pods[1]], nodes, now + dt.timedelta(seconds=1), gone=[evicted])
    assert going["lastCheckpoint"]["step"] == 85 and going["restart"]["reachedStep"] == 85
    created = _decide({**job, "status": going}, spec, [], nodes, now + dt.timedelta(seconds=2))
    assert created["attemptStartTime"] and created.get("lostSteps", 0) == 0


def test_a_report_read_in_the_pass_that_creates_the_next_gang_is_not_taken_for_the_new_attempts_progress():
    # Every old pod gone at the first pass after the restart, rank 0 known from the watch: its
    # report (its SIGTERM save refused) is read in the pass that creates attempt 2's gang. Attempt 2
    # then ends before reporting anything: the same steps must not be counted again at attempt 3.
    job, spec, pods, nodes, now, st = _evicted("same-pass", rank=0, step=84, checkpoint=82)
    evicted = _exited_evicted(pods[0], {"step": 86, "totalSteps": 400, "checkpointStep": 82})
    later = now + dt.timedelta(seconds=1)
    created = _decide({**job, "status": st}, spec, [], nodes, later, gone=[evicted])
    assert created["attemptStartTime"] and created["progress"]["step"] == 86 and created["lostSteps"] == 4
    # Attempt 2's gang cannot start (its start timeout) before any progress of its own.
    timed_out = _decide({**job, "status": created}, spec, [], nodes, later + dt.timedelta(seconds=spec.scheduling.startTimeoutSeconds + 1))
    assert timed_out["attempt"] == 3 and timed_out["restart"]["reachedStep"] == 0
    assert _decide({**job, "status": timed_out}, spec, [], nodes, later + dt.timedelta(seconds=spec.scheduling.startTimeoutSeconds + 2))["lostSteps"] == 4


def test_an_older_attempts_evicted_pod_seen_by_the_watch_does_not_move_progress_back():
    job, spec, pods, nodes, now = observed_gang("older")
    _preempt(pods[0], {"step": 40, "totalSteps": 400, "checkpointStep": 40})  # attempt 1's rank 0, evicted long ago
    job["status"].update(attempt=3, phase="Restarting", attemptStartTime="", gangCreated=False,
                         restart={"fromAttempt": 2, "kind": "Preemption", "reason": "Evicted", "message": "",
                                  "requestedAt": reconcile.iso(now), "reachedStep": 200},
                         progress={"step": 200, "totalSteps": 400, "updated": reconcile.iso(now - dt.timedelta(seconds=5))},
                         lastCheckpoint={"step": 200, "time": reconcile.iso(now), "path": "/checkpoints/step-00000200"})
    st = _decide(job, spec, [], nodes, now, gone=[pods[0]])
    assert st["progress"]["step"] == 200 and st["lastCheckpoint"]["step"] == 200 and st.get("lostSteps", 0) == 0


def test_the_checkpoint_a_suspended_or_failed_jobs_rank_0_saves_on_its_way_out_is_recorded_once_its_pod_is_gone():
    # The operator's own deletions (a suspend, an active deadline) add no DisruptionTarget: rank 0's
    # final report was read only while its pod was listed, and its kubelet deletes it at once.
    # A Failed job did not read reports at all: its deadline's SIGTERM checkpoint never showed.
    for case in ("suspend", "deadline"):
        job, spec, pods, nodes, now = observed_gang(f"out-{case}")
        _running_for(job, now, 25)
        job["status"]["lastCheckpoint"] = {"step": 40, "time": reconcile.iso(now), "path": "/checkpoints/step-00000040"}
        if case == "suspend":
            job["spec"]["suspend"] = True
        else:
            job["spec"]["activeDeadlineSeconds"] = 20
        spec = type(spec).model_validate(job["spec"])
        st = _decide(job, spec, pods, nodes, now)
        assert st["phase"] == ("Suspended" if case == "suspend" else "Failed"), st["phase"]
        gone = dict(pods[0], metadata={**pods[0]["metadata"], "deletionTimestamp": reconcile.iso(now)})
        _preempt(gone, {"step": 57, "totalSteps": 400, "checkpointStep": 57})
        after = _decide({**job, "status": st}, spec, [pods[1]], nodes, now + dt.timedelta(seconds=2), gone=[gone])
        assert after["lastCheckpoint"]["step"] == 57 and after["progress"]["step"] == 57, case
        assert after["phase"] == st["phase"]
