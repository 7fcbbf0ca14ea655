"""A hang: every pod runs, the step does not move (a collective waiting on a peer that never
answers). With failurePolicy.progressDeadlineSeconds the operator restarts such an attempt as a
failure, judged by rank 0's metrics as it reads them; reconcile.decide on observed state, then the
stand-in trainer hung on the local cluster."""

from __future__ import annotations

import datetime as dt


from pretrain_operator import reconcile
from tests.jobs import Jobs, job_manifest, observed_gang



def _hung(name: str, *, deadline: int | None = 60, running_s: int = 300, still_s: int = 70, step: int = 57):
    """A gang Running for `running_s`, rank 0's step `step` unchanged for `still_s` by a read just now."""
    job, spec, pods, nodes, now = observed_gang(name)
    spec = spec.model_copy(update={"failurePolicy": spec.failurePolicy.model_copy(update={"progressDeadlineSeconds": deadline})})
    job["status"]["conditions"] = [{"type": "Running", "status": "True", "reason": "AllNodesRunning", "message": "",
                                    "lastTransitionTime": reconcile.iso(now - dt.timedelta(seconds=running_s))}]
    job["status"]["progress"] = {"step": step, "totalSteps": spec.training.steps, "updated": reconcile.iso(now - dt.timedelta(seconds=still_s))}
    return job, spec, pods, nodes, now


def _decide(job, spec, pods, nodes, now, read) -> reconcile.Plan:
    return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                               config_data=None, now=now, progress_read=read))


def test_a_running_gang_whose_step_has_not_moved_past_the_deadline_is_restarted_as_a_failure():
    job, spec, pods, nodes, now = _hung("hung")
    plan = _decide(job, spec, pods, nodes, now, read=now)
    st = plan.status
    assert st["attempt"] == 2 and st["failures"] == 1 and st["preemptions"] == 0
    assert st["restart"]["kind"] == "Failure" and st["restart"]["reason"] == "ProgressDeadlineExceeded"
    assert "step 57 has not moved for 70 s (failurePolicy.progressDeadlineSeconds 60)" in st["restart"]["message"]
    assert any(e[:2] == ("Warning", "Failure") and "ProgressDeadlineExceeded" in e[2] for e in plan.events), plan.events
    # A step within the deadline: still Running, nothing said.
    job, spec, pods, nodes, now = _hung("moving", still_s=50)
    plan = _decide(job, spec, pods, nodes, now, read=now)
    assert plan.status["attempt"] == 1 and plan.status["phase"] == "Running" and not plan.events
    # One pod not up any more, yet not ended (its trainer's state unknown to its kubelet): the same
    # hang (no start timeout judges a gang that was all up).
    job, spec, pods, nodes, now = _hung("half")
    pods[1]["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": "Unknown"}}}]
    st = _decide(job, spec, pods, nodes, now, read=now).status
    assert st["attempt"] == 2 and st["restart"]["reason"] == "ProgressDeadlineExceeded" and st["readyNodes"] == "0/2"


def test_the_deadline_is_judged_at_the_last_successful_read_and_not_without_one():
    # No read (a network in the way, an operator just started): nothing known of the trainer.
    job, spec, pods, nodes, now = _hung("unread", still_s=600)
    assert _decide(job, spec, pods, nodes, now, read=None).status["attempt"] == 1
    # The last read 30 s after the last change, however late this pass is: within the deadline.
    job, spec, pods, nodes, now = _hung("read-early", still_s=600)
    assert _decide(job, spec, pods, nodes, now, read=now - dt.timedelta(seconds=570)).status["attempt"] == 1


def test_a_new_attempts_clock_starts_when_its_gang_runs_not_at_the_previous_attempts_last_step():
    job, spec, pods, nodes, now = _hung("started", running_s=40, still_s=900)  # its start: imports, checkpoint load
    assert _decide(job, spec, pods, nodes, now, read=now).status["attempt"] == 1
    job, spec, pods, nodes, now = _hung("never-stepped", running_s=70, still_s=900)
    assert _decide(job, spec, pods, nodes, now, read=now).status["restart"]["reason"] == "ProgressDeadlineExceeded"


def test_the_last_step_and_a_job_without_a_deadline_are_not_judged():
    job, spec, pods, nodes, now = _hung("saving", step=400, still_s=900)  # the final save may take long
    assert _decide(job, spec, pods, nodes, now, read=now).status["attempt"] == 1
    job, spec, pods, nodes, now = _hung("no-deadline", deadline=None, still_s=3600)
    assert _decide(job, spec, pods, nodes, now, read=now).status["attempt"] == 1


def test_a_hung_gang_on_the_cluster_is_restarted_and_resumes_from_its_checkpoint(api, namespace, operator):
    # Every rank stops at step 12 of attempt 1 (deaf to SIGTERM, as a stuck collective is), after
    # the checkpoint of step 10; the pods keep running and rank 0 keeps serving its metrics.
    jobs = Jobs(api, namespace)
    body = job_manifest("stuck", steps=20, interval=5, failurePolicy={"progressDeadlineSeconds": 10})
    body["spec"]["template"]["terminationGracePeriodSeconds"] = 2
    body["spec"]["template"]["env"].append({"name": "STANDIN_HANG", "value": "1:12"})
    jobs.create(body)
    st = jobs.wait_phase("stuck", "Succeeded", timeout=120)
    assert st["attempt"] == 2 and st["failures"] == 1 and st["preemptions"] == 0
    assert st["restart"]["reason"] == "ProgressDeadlineExceeded" and "step 12 has not moved" in st["restart"]["message"]
    assert "resuming at step 10 of 20" in jobs.logs("stuck-a2-n0")
    jobs.wait_events("stuck", "Failure")


def test_the_operator_judges_only_by_a_read_of_the_current_attempt_whose_progress_the_status_shows():
    from kubernetes import client

    from pretrain_operator.controller import Controller
    from pretrain_operator.settings import OperatorSettings
    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0))
    try:
        job, spec, pods, nodes, now = _hung("memo")
        seen = reconcile.progress_of(job["status"])
        key = ("ns", "memo")
        ctl.progress_read[key] = ("u1", 1, now, seen)
        assert ctl._progress_read(key, job) == now
        # A status that does not show what was read (its write refused): the read is not used.
        assert ctl._progress_read(key, {**job, "status": {**job["status"], "progress": {**seen, "step": 56}}}) is None
        # Another attempt's read, or a deleted job's of the same name: not this one's.
        assert ctl._progress_read(key, {**job, "status": {**job["status"], "attempt": 2}}) is None
        assert ctl._progress_read(key, {**job, "metadata": {**job["metadata"], "uid": "u2"}}) is None
        # A read that fails (nothing answers at rank 0's address) forgets the last one that did not.
        pods[0]["status"]["podIP"] = "192.0.2.1"  # TEST-NET-1: never reached
        ctl._progress(job, reconcile.Plan(status=job["status"]), pods)
        assert key not in ctl.progress_read and ctl._progress_read(key, job) is None
    finally:
        ctl.pool.shutdown()
