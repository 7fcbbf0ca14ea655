"""A PretrainJob runs as a gang of torchrun-wired pods to Succeeded; its children carry the
contract; deletion and TTL clean up; a converged job gets no further writes; status.progress
follows the trainer, at a rate capped over all Running jobs."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from kubernetes import watch

from pretrain_operator import api, contract as c
from pretrain_operator.controller import progress_interval
from tests.helpers import wait_for
from tests.jobs import Jobs, job_manifest
from tests.kubeutil import pod_manifest
from tests.operator_fixture import STANDIN, OperatorProcess


# The trainer may take a moment to listen: retry for up to 20 s.
PROBE = """
import time, urllib.request
for i in range(100):
    try:
        print(urllib.request.urlopen("{url}", timeout=2).read().decode().splitlines()[0]); break
    except Exception as e:
        err = e; time.sleep(0.2)
else:
    print("unreachable:", err)
"""


@pytest.fixture
def jobs(api, namespace, operator) -> Jobs:
    return Jobs(api, namespace)


def test_a_job_runs_its_gang_to_succeeded_with_progress_and_checkpoint_in_status(jobs, core, namespace):
    jobs.create(job_manifest("life", steps=20, interval=5, step_s=0.3))
    st = jobs.wait_phase("life", "Running", timeout=60)
    assert st["attempt"] == 1 and st["readyNodes"] == "2/2"
    # Progress mirrored from rank 0's metrics while it runs.
    st = jobs.wait("life", lambda s: (s.get("progress") or {}).get("step", 0) > 0 and s.get("lastCheckpoint")
                   and "validationStep" in s["progress"], what="progress, a checkpoint and a validation in status")
    assert st["progress"]["totalSteps"] == 20
    vs = st["progress"]["validationStep"]
    assert vs % 5 == 0 and st["progress"]["validationLoss"] == round(10.0 / (1 + vs) + 1.0, 4)  # the stand-in's
    st = jobs.wait_phase("life", "Succeeded", timeout=60)
    assert st["failures"] == 0 and st["preemptions"] == 0 and st["completionTime"]
    assert st["progress"]["step"] == 20
    # The last loss, from rank 0's final report (its termination message), not the last one mirrored.
    assert st["progress"]["loss"] == round(10.0 / 21, 4)
    assert any(cd["type"] == "Succeeded" and cd["status"] == "True" for cd in st["conditions"])
    jobs.wait_events("life", "Starting", "Running", "Succeeded")


def test_a_trainer_with_no_loss_yet_shows_its_step_in_status(jobs):
    # Before its first step the trainer serves NaN for the loss; JSON has no NaN, and a status
    # patch carrying one is refused whole (phase and all).
    jobs.create(job_manifest("early", steps=3, step_s=6))
    st = jobs.wait("early", lambda s: "step" in (s.get("progress") or {}), timeout=60, what="progress at step 0")
    assert st["progress"]["step"] == 0 and "loss" not in st["progress"], st["progress"]
    assert "validationLoss" not in st["progress"] and "validationStep" not in st["progress"], st["progress"]


def test_a_loss_that_becomes_nan_leaves_status_instead_of_staying_at_its_last_value(jobs):
    # A diverging run serves NaN (no JSON for it): status.progress drops its loss. A merge patch of
    # progress without `loss` once kept the last finite one, and kubectl showed a healthy loss.
    jobs.create(job_manifest("diverging", steps=400, step_s=0.2,
                             template={"env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.2"},
                                               {"name": "STANDIN_NAN_LOSS_FROM", "value": "15"}]}))
    jobs.wait("diverging", lambda s: "loss" in (s.get("progress") or {}), timeout=60, what="a loss in status")
    st = jobs.wait("diverging", lambda s: (s.get("progress") or {}).get("step", 0) >= 20, timeout=60, what="step 20")
    assert "loss" not in st["progress"], st["progress"]
    # Its checkpoint time is NaN too from then on: the checkpoints are mirrored with the read's time
    # (fromtimestamp(NaN) raised out of every pass: no progress past step 15, no progress deadline).
    st = jobs.wait("diverging", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) >= 20, timeout=60, what="checkpoint 20")
    assert dt.datetime.fromisoformat(st["lastCheckpoint"]["time"].replace("Z", "+00:00")), st["lastCheckpoint"]


def test_a_job_with_a_queue_name_makes_each_attempts_pods_one_kueue_pod_group(jobs):
    # Without a pod group Kueue admits each plain pod on its own: no gang admission.
    jobs.create(job_manifest("queued", steps=400, scheduling={"queueName": "team-a"}))
    jobs.wait_phase("queued", "Running", timeout=60)
    uid = jobs.get("queued")["metadata"]["uid"]
    pods = jobs.pods("queued")
    assert len(pods) == 2
    for p in pods:
        assert p.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert p.metadata.labels["kueue.x-k8s.io/pod-group-name"] == f"{uid}-a1"
        assert p.metadata.annotations["kueue.x-k8s.io/pod-group-total-count"] == "2"


def test_a_job_s_pods_carry_its_labels_annotations_service_account_and_secrets(jobs, core, namespace):
    core.create_namespaced_secret(namespace, {"metadata": {"name": "wandb"}, "stringData": {"key": "s3cret"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hf"}, "stringData": {"TOKEN": "t0ken"}})
    # The trainer starts only if the Secrets' values and the ServiceAccount's token reached it.
    check = ('test "$WANDB_API_KEY" = s3cret && test "$HF_TOKEN" = t0ken && test "$POD_NAME" = ident-a1-n0 '
             f'&& test -s /var/run/secrets/kubernetes.io/serviceaccount/token && exec python {STANDIN}')
    jobs.create(job_manifest("ident", nodes=1, steps=10, step_s=0.1, template={
        "command": ["sh", "-c", check], "terminationGracePeriodSeconds": 5,
        "labels": {"team": "ml-research"}, "annotations": {"sidecar.istio.io/inject": "false"},
        "serviceAccountName": "trainer", "imagePullSecrets": [{"name": "registry"}],
        "env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.1"},
                {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "envFrom": [{"prefix": "HF_", "secretRef": {"name": "hf"}}]}))
    # Named before it exists: the ServiceAccount admission refuses the gang; said in status, retried.
    jobs.wait("ident", lambda st: 'serviceaccount "trainer" not found' in (st.get("message") or ""), timeout=60,
              what="the refused gang in status.message")
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "trainer"}})
    jobs.wait_phase("ident", "Succeeded", timeout=90)
    (p,) = jobs.pods("ident")
    assert p.metadata.labels["team"] == "ml-research" and p.metadata.labels[c.LABEL_JOB] == "ident"
    assert p.metadata.annotations["sidecar.istio.io/inject"] == "false"
    assert p.spec.service_account_name == "trainer" and p.spec.automount_service_account_token is None
    assert [s.name for s in p.spec.image_pull_secrets] == ["registry"]
    assert "GangCreateFailed" in [e.reason for e in jobs.events("ident")]


def test_the_running_operator_never_loads_torch(jobs, operator):
    # The operator image carries no torch: not at import (tests/test_layout.py) and not on any
    # path a reconcile takes either (progress, checkpoints, restarts).
    jobs.create(job_manifest("notorch", steps=20, interval=5, step_s=0.3))
    jobs.wait("notorch", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) > 0, timeout=90,
              what="progress and a checkpoint in status")
    maps = open(f"/proc/{operator.proc.pid}/maps").read()
    assert "libtorch" not in maps and "/torch/" not in maps


def test_the_gang_is_wired_for_torchrun_and_locked_down(jobs, core, namespace):
    jobs.create(job_manifest("wired", steps=200, step_s=0.5))
    jobs.wait_phase("wired", "Running", timeout=60)
    pods = sorted(jobs.pods("wired"), key=lambda p: p.metadata.name)
    assert [p.metadata.name for p in pods] == ["wired-a1-n0", "wired-a1-n1"]
    job = jobs.get("wired")
    for rank, p in enumerate(pods):
        env = {e.name: e.value for e in p.spec.containers[0].env}
        assert env["PET_NNODES"] == "2" and env["PET_NODE_RANK"] == str(rank) and env["PET_NPROC_PER_NODE"] == "1"
        assert env["PET_RDZV_ENDPOINT"] == f"wired-n0.wired:{c.RDZV_PORT}"
        assert env["PET_RDZV_ID"] == f"{job['metadata']['uid']}-a1"
        # The rendezvous waits for rank 0 as long as the operator waits for the gang (a minute more).
        wait = max(600, api.PretrainJobSpec.model_validate(job["spec"]).scheduling.startTimeoutSeconds + 60)
        assert env["PET_RDZV_CONF"] == f"join_timeout={wait},read_timeout={wait}"
        # torchrun's agent waits for the ranks' save on SIGTERM as long as the pod's grace period (not its 30 s).
        assert env["PET_SHUTDOWN_TIMEOUT"] == str(p.spec.termination_grace_period_seconds) == "5"
        assert env[c.ENV_JOB_UID] == job["metadata"]["uid"] and env[c.ENV_ATTEMPT] == "1"  # the checkpoint fence's owner
        assert p.metadata.labels[c.LABEL_ATTEMPT] == "1"
        ref = p.metadata.owner_references[0]
        assert ref.controller and ref.uid == job["metadata"]["uid"]
        assert p.spec.automount_service_account_token is False
        assert p.spec.security_context.run_as_non_root is True
        assert p.spec.containers[0].security_context.allow_privilege_escalation is False
        ctr = p.spec.containers[0]
        assert ctr.termination_message_path == env[c.ENV_TERMINATION_MESSAGE] == c.TERMINATION_MESSAGE_PATH
        assert ctr.termination_message_policy == "FallbackToLogsOnError"
        assert p.spec.hostname == f"wired-n{rank}" and p.spec.subdomain == "wired"
        # Its own memory-backed /dev/shm (a runtime's is 64 MiB: NCCL and async staging need more).
        shm = next(v for v in p.spec.volumes if v.name == "pretrain-shm")
        assert shm.empty_dir.medium == "Memory" and shm.empty_dir.size_limit is None
        assert {m.mount_path: m.name for m in ctr.volume_mounts}["/dev/shm"] == "pretrain-shm"
    svc = core.read_namespaced_service("wired", namespace)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
    cm = core.read_namespaced_config_map("wired-config", namespace)
    assert "steps: 200" in cm.data[c.CONFIG_FILE]
    # The rendezvous name resolves from inside the gang (rank 1 reaches rank 0's metrics by DNS).
    probe = pod_manifest("dns-probe", ["python", "-c", PROBE.format(url=f"http://wired-n0.wired:{c.METRICS_PORT}/metrics")])
    core.create_namespaced_pod(namespace, probe)
    wait_for(lambda: core.read_namespaced_pod("dns-probe", namespace).status.phase in ("Succeeded", "Failed"), what="the probe")
    out = core.read_namespaced_pod_log("dns-probe", namespace)
    assert out.startswith(c.METRIC_STEP), out


def test_dev_shm_takes_the_spec_s_size_or_gives_way_to_a_mount_of_the_user_s_own(jobs):
    jobs.create(job_manifest("sized", nodes=1, steps=200, template={"shmSize": "256Mi"}))
    own = {"volumes": [{"name": "big-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
           "volumeMounts": [{"name": "big-shm", "mountPath": "/dev/shm/"}]}
    jobs.create(job_manifest("own-shm", nodes=1, steps=200, template=own))
    # The API server refuses a pod with two mounts at one path: Running means ours gave way.
    for name in ("sized", "own-shm"):
        jobs.wait_phase(name, "Running", timeout=60)
    [sized] = jobs.pods("sized")
    assert next(v for v in sized.spec.volumes if v.name == "pretrain-shm").empty_dir.size_limit == "256Mi"
    [mine] = jobs.pods("own-shm")
    assert "pretrain-shm" not in {v.name for v in mine.spec.volumes}
    assert [m.name for m in mine.spec.containers[0].volume_mounts if m.mount_path.rstrip("/") == "/dev/shm"] == ["big-shm"]


def test_deleting_the_job_leaves_no_pod_service_or_configmap(jobs, core, namespace):
    jobs.create(job_manifest("gone", steps=500))
    jobs.wait_phase("gone", "Running", timeout=60)
    jobs.delete("gone")
    wait_for(lambda: not jobs.pods("gone", live=False) and not core.list_namespaced_service(namespace).items
             and not [m for m in core.list_namespaced_config_map(namespace).items if m.metadata.name == "gone-config"],
             timeout=60, what="garbage collection of the children")


def test_deleting_its_namespace_is_not_taken_for_a_preemption(jobs, core, namespace):
    # The namespace controller deletes the pods before the job: without a look at the namespace the
    # operator records a preemption and a new attempt, then retries a gang the API server refuses.
    # A job with no preemption left failed instead (MaxPreemptionsExceeded, an Event, the alert).
    jobs.create(job_manifest("doomed", steps=500))
    jobs.create(job_manifest("budgetless", steps=500, failurePolicy={"maxPreemptions": 0, "failureSettleSeconds": 1}))
    jobs.wait_phase("doomed", "Running", timeout=60)
    jobs.wait_phase("budgetless", "Running", timeout=60)
    rv = jobs.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)["metadata"]["resourceVersion"]
    seen: dict[str, list] = {"doomed": [], "budgetless": []}
    w = watch.Watch()
    core.delete_namespace(namespace)
    for ev in w.stream(jobs.custom.list_namespaced_custom_object, api.GROUP, api.VERSION, namespace, api.PLURAL,
                       resource_version=rv, timeout_seconds=90):
        st = ev["object"].get("status") or {}
        seen[ev["object"]["metadata"]["name"]].append((ev["type"], st.get("phase"), st.get("attempt"), st.get("preemptions")))
        if all(s and s[-1][0] == "DELETED" for s in seen.values()):
            w.stop()
    assert all(s and s[-1][0] == "DELETED" for s in seen.values()), seen
    assert all(attempt == 1 and preemptions == 0 and phase != "Failed"
               for s in seen.values() for _, phase, attempt, preemptions in s), seen


def test_ttl_after_finished_deletes_the_job(jobs):
    jobs.create(job_manifest("brief", steps=3, ttlSecondsAfterFinished=2))
    jobs.wait_phase("brief", "Succeeded", timeout=60)
    wait_for(lambda: jobs.get("brief") is None, timeout=30, what="the TTL to delete the job")


def test_a_converged_job_gets_no_further_writes(jobs, operator):
    jobs.create(job_manifest("still", steps=3))
    jobs.wait_phase("still", "Succeeded", timeout=60)
    time.sleep(1)
    reconciles, writes = operator.total("pretrain_operator_reconciles_total"), operator.total("pretrain_operator_api_writes_total")
    rv = jobs.get("still")["metadata"]["resourceVersion"]
    # More than two resyncs (3 s in tests, for finished jobs too, whose resync is 10 min by default):
    # the job is reconciled again, and again. (It passed with the 10 min resync only while other
    # tests' jobs were being reconciled: the count is the operator's.)
    time.sleep(7)
    assert operator.total("pretrain_operator_reconciles_total") >= reconciles + 2
    assert jobs.get("still")["metadata"]["resourceVersion"] == rv
    # Other tests' jobs may be writing meanwhile only if they run in parallel; they do not (one session, serial).
    assert operator.total("pretrain_operator_api_writes_total") == writes


def _progress_steps(jobs, operator, tmp_path, name: str, seconds: float, **env) -> set[int]:
    """The steps that status.progress shows over `seconds` of a Running job, polled every 0.25 s,
    under an operator with a 300 s resync and these settings (the session's operator stopped meanwhile)."""
    operator.stop()
    other = OperatorProcess(operator.kubeconfig, tmp_path).start(PRETRAIN_OPERATOR_RESYNC_S="300", **env)
    try:
        jobs.create(job_manifest(name, steps=2000, interval=1000, step_s=0.1))
        jobs.wait(name, lambda s: (s.get("progress") or {}).get("step", 0) > 0, timeout=60, what="a first step")
        seen = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seen.add(jobs.status(name)["progress"]["step"])
            time.sleep(0.25)
        return seen
    finally:
        other.stop()
        operator.start()


def test_a_running_trainer_whose_metrics_cannot_be_read_is_said_once_in_the_operators_log(jobs, operator):
    # A NetworkPolicy or a mesh's mTLS between the operator and the trainers: status.progress
    # stays empty, and the failed reads were logged at debug level only, so nobody knew why.
    # (The operator reads once a second here: the warning comes after 12 failed reads in a row.)
    start = operator.log_path.read_text().count("\n")
    jobs.create(job_manifest("unread", steps=3, template={"command": ["sleep", "600"]}))  # serves no metrics
    jobs.wait_phase("unread", "Running", timeout=60)

    def said() -> list[str]:
        return [line for line in operator.log_path.read_text().splitlines()[start:]
                if "progress of" in line and "/unread:" in line and "failed in a row" in line]
    wait_for(said, timeout=40, what="the operator's warning")
    time.sleep(13)  # as many failed reads again
    (line,) = said()
    assert "WARNING" in line and f":{c.METRICS_PORT}/metrics failed" in line and "docs/install.md" in line, line
    assert "progress" not in jobs.status("unread")


def test_status_progress_follows_a_running_trainer_between_resyncs(jobs, operator, tmp_path):
    # On a real cluster nothing may touch a running gang for minutes (a kubelet writes an unchanged
    # node status every 5 min): the progress must not wait for the resync, nor for node churn.
    seen = _progress_steps(jobs, operator, tmp_path, "followed", 8, PRETRAIN_OPERATOR_PROGRESS_INTERVAL_S="1")
    assert len(seen) >= 4, sorted(seen)  # a pass a second: about 8


def test_progress_reads_over_all_running_jobs_stay_under_the_rate_cap():
    # Each read is a reconcile, a metrics scrape and a status write: 5 s apiece at 1000 jobs would
    # be 200 of each a second. Up to rate x interval jobs (50 by default) keep the interval.
    assert [progress_interval(5.0, 10.0, n) for n in (0, 1, 50)] == [5.0, 5.0, 5.0]
    assert progress_interval(5.0, 10.0, 100) == 10.0 and progress_interval(5.0, 10.0, 1000) == 100.0
    for n in (1, 49, 51, 100, 1000):
        assert n / progress_interval(5.0, 10.0, n) <= 10.0


def test_a_capped_progress_rate_reads_a_running_job_less_often(jobs, operator, tmp_path):
    # One Running job, an interval of 1 s but at most 0.25 reads a second: one read every 4 s.
    seen = _progress_steps(jobs, operator, tmp_path, "capped", 8.5, PRETRAIN_OPERATOR_PROGRESS_INTERVAL_S="1",
                           PRETRAIN_OPERATOR_PROGRESS_RATE="0.25")
    assert 2 <= len(seen) <= 3, sorted(seen)  # uncapped: about 8 (without the cap: 9)
