"""Rank 0's final report (its termination message, pretrain_operator.contract) sets the job's
last step, loss, checkpoint and validation exactly: the metrics the operator mirrors every few seconds end with
the pod and may have missed the last steps. A failed rank's reported error joins the restart's
and the failure's messages. Anything else in the message (a crash's log lines, a
custom command's text, wrong types) is ignored. reconcile.decide on observed state, no cluster:
tests/test_operator_lifecycle.py and tests/test_e2e_trainer.py show the same on the local cluster."""

from __future__ import annotations

import datetime as dt
import json

from pretrain_operator import classify, contract as c, reconcile
from tests.jobs import observed_gang


def _ended(pod: dict, code: int, message: str | None) -> None:
    t = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
    if message is not None:
        t["message"] = message
    pod["status"] = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": t}}]}


def _decide(steps: int, rank0_code: int, rank0_message: str | None, progress: dict | None = None) -> dict:
    job, spec, pods, ready, now = observed_gang("rep", steps=steps)
    job["status"]["failureSeenAt"] = reconcile.iso(now - dt.timedelta(minutes=5))  # a failure has settled
    if progress:
        job["status"]["progress"] = progress
        job["status"]["lastCheckpoint"] = {"step": 10, "time": "2026-11-30T00:00:00Z", "path": "/checkpoints/step-00000010"}
    _ended(pods[0], rank0_code, rank0_message)
    _ended(pods[1], rank0_code, None)
    return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=ready, service_exists=True,
                                               config_data=None, now=now)).status


def test_a_succeeded_job_shows_the_loss_of_its_last_step_from_rank_0s_report():
    mirrored = {"step": 18, "totalSteps": 20, "loss": 2.5, "tokensPerSecond": 99.0, "updated": "2026-11-30T00:00:00Z"}
    report = {"step": 20, "totalSteps": 20, "loss": 2.123456, "tokensSeen": 5120, "checkpointStep": 20}
    st = _decide(20, 0, json.dumps(report), progress=mirrored)
    assert st["phase"] == "Succeeded"
    assert st["progress"]["step"] == 20 and st["progress"]["loss"] == 2.1235
    assert st["progress"]["tokensPerSecond"] == 99.0  # what the report does not say stays as mirrored
    assert st["lastCheckpoint"]["step"] == 20


def test_a_preempted_rank_0s_report_records_its_emergency_checkpoint():
    report = {"step": 13, "totalSteps": 400, "loss": 3.0, "checkpointStep": 13}
    st = _decide(400, c.EXIT_PREEMPTED, json.dumps(report), progress={"step": 12, "totalSteps": 400, "loss": 3.1})
    assert st["restart"]["kind"] == "Preemption"
    assert st["lastCheckpoint"]["step"] == 13 and st["lastCheckpoint"]["path"].endswith("step-00000013")
    assert st["progress"]["step"] == 13 and st["progress"]["loss"] == 3.0


def test_a_message_that_is_not_a_report_changes_nothing():
    mirrored = {"step": 12, "totalSteps": 400, "loss": 3.1}
    for message in ("Traceback (most recent call last):\n  ValueError: boom", "[1, 2]", '{"step": "13"}',
                    '{"step": true, "loss": "low"}', json.dumps({"step": -1, "checkpointStep": 2.5}), "", None):
        st = _decide(400, c.EXIT_PREEMPTED, message, progress=mirrored)
        assert st["progress"] == mirrored and st["lastCheckpoint"]["step"] == 10, message


def test_a_report_keeps_only_known_fields_of_the_right_types():
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 0, "message": json.dumps(
        {"step": 5, "totalSteps": 5, "loss": float("nan"), "tokensSeen": 640, "checkpointStep": True, "extra": 1})}}}]}}
    # json.dumps writes NaN; it is not a loss.
    assert classify.report(pod) == {"step": 5, "totalSteps": 5, "tokensSeen": 640}
    # A validation's loss counts only with its step, each of its type.
    for doc, want in (({"validationLoss": 2.5, "validationStep": 4}, {"validationLoss": 2.5, "validationStep": 4}),
                      ({"validationLoss": 2.5}, {}), ({"validationLoss": True, "validationStep": 4}, {}),
                      ({"validationLoss": 2.5, "validationStep": 4.0}, {})):
        pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(doc)
        assert classify.report(pod) == want, doc


def test_the_last_validation_of_the_report_is_in_the_progress():
    mirrored = {"step": 18, "totalSteps": 20, "loss": 2.5, "validationLoss": 2.7, "validationStep": 15}
    report = {"step": 20, "totalSteps": 20, "loss": 2.1, "checkpointStep": 20, "validationStep": 20, "validationLoss": 2.345678}
    st = _decide(20, 0, json.dumps(report), progress=mirrored)
    assert st["progress"]["validationStep"] == 20 and st["progress"]["validationLoss"] == 2.3457


def test_the_error_a_failed_rank_reported_is_in_the_restart_and_the_failure_messages():
    st = _decide(400, 1, json.dumps({"error": "rank 2: RuntimeError: the loss is NaN"}))
    assert st["restart"]["kind"] == "Failure", st
    assert st["restart"]["message"].endswith("exited with code 1 (Error): rank 2: RuntimeError: the loss is NaN")
    st = _decide(400, c.EXIT_PERMANENT, json.dumps({"error": "rank 0: data.path /d is not a prepared folder"}))
    assert st["phase"] == "Failed" and st["message"].endswith(": rank 0: data.path /d is not a prepared folder"), st


def test_the_checkpoint_a_suspended_or_restarted_gang_saved_on_sigterm_is_the_jobs_last_checkpoint():
    # Progress is mirrored only while Running: the SIGTERM checkpoint of a gang going (suspended,
    # or an old attempt draining) was missing from status all through a suspension.
    report = json.dumps({"step": 57, "totalSteps": 400, "loss": 3.0, "checkpointStep": 57})
    for suspend in (True, False):
        job, spec, pods, ready, now = observed_gang("going")
        job["spec"]["suspend"] = suspend
        if not suspend:  # a restart recorded: attempt 2, whose gang waits for attempt 1's to go
            job["status"].update(attempt=2, phase="Restarting", gangCreated=False)
        job["status"]["lastCheckpoint"] = {"step": 50, "time": "2026-11-30T00:00:00Z", "path": "/checkpoints/step-00000050"}
        _ended(pods[0], c.EXIT_PREEMPTED, report)
        pods[0]["metadata"]["deletionTimestamp"] = reconcile.iso(now)
        spec = spec.model_copy(update={"suspend": suspend})
        st = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=ready, service_exists=True,
                                                 config_data=None, now=now)).status
        assert st["lastCheckpoint"]["step"] == 57 and st["progress"]["step"] == 57, (suspend, st)


def test_a_suspended_gangs_last_checkpoint_names_the_folder_it_saved_to_after_checkpoint_path_changed():
    # checkpoint.path may change while the job is Suspended, as its pods still save on SIGTERM:
    # their checkpoint was recorded under the new path, which does not hold it.
    job, spec, pods, ready, now = observed_gang("moved")
    job["spec"]["suspend"] = True
    job["spec"]["checkpoint"] = {**job["spec"]["checkpoint"], "path": "/checkpoints/run2"}
    job["status"].update(phase="Suspended")
    _ended(pods[0], c.EXIT_PREEMPTED, json.dumps({"step": 130, "totalSteps": 400, "loss": 3.0, "checkpointStep": 130}))
    spec = spec.model_copy(update={"suspend": True, "checkpoint": spec.checkpoint.model_copy(update={"path": "/checkpoints/run2"})})
    st = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=ready, service_exists=True,
                                             config_data=None, now=now)).status
    assert classify.env_of(pods[0], c.ENV_CHECKPOINT_DIR) == "/checkpoints"  # what the pod was given
    assert st["lastCheckpoint"]["step"] == 130 and st["lastCheckpoint"]["path"] == "/checkpoints/step-00000130", st["lastCheckpoint"]
