"""Failures spend the budget and stop at maxFailures; exit-code rules; a gang that cannot start
within startTimeoutSeconds is retried; suspend checkpoints and removes the pods, resume continues
as a new attempt from the checkpoint; activeDeadlineSeconds fails the job after a checkpoint, its
clock restarted by a resume."""

from __future__ import annotations

import time

import pytest

from pretrain_operator import api, classify, contract as c, reconcile, render
from tests.helpers import wait_for
from tests.jobs import Jobs, job_manifest, observed_gang
from tests.kubeutil import pod_manifest
from tests.operator_fixture import STANDIN



@pytest.fixture
def jobs(api, namespace, operator) -> Jobs:
    return Jobs(api, namespace)


def test_failures_count_and_stop_at_max_failures(jobs):
    # Rank 1 fails at step 3 in every attempt.
    jobs.create(job_manifest("flaky", steps=50, interval=1000, fail="*:1:3:1", failurePolicy={"maxFailures": 2, "failureSettleSeconds": 1}))
    st = jobs.wait_phase("flaky", "Failed", timeout=120)
    assert st["failures"] == 3 and st["preemptions"] == 0 and st["attempt"] == 3
    assert any(cd["type"] == "Failed" and cd["reason"] == "MaxFailuresExceeded" for cd in st["conditions"])
    # Terminal and sticky: no pods left holding capacity, nothing restarts.
    wait_for(lambda: not jobs.pods("flaky", live=False), timeout=30, what="the pods to be cleaned up")
    assert jobs.status("flaky")["phase"] == "Failed"


def test_a_failure_then_success_resumes_with_one_failure_spent(jobs):
    jobs.create(job_manifest("once", steps=20, fail="1:0:8:1"))
    st = jobs.wait_phase("once", "Succeeded", timeout=120)
    assert st["failures"] == 1 and st["preemptions"] == 0 and st["attempt"] == 2
    assert st["restart"]["kind"] == "Failure" and st["restart"]["reason"] == "ExitCode"
    # Attempt 2 resumed from the checkpoint of step 5, not from scratch.
    assert jobs.resumed_step("once", 2) == 5


def test_a_non_retryable_exit_code_fails_the_job_at_once(jobs):
    jobs.create(job_manifest("broken", steps=50, fail=f"*:0:2:{c.EXIT_PERMANENT}", failurePolicy={"maxFailures": 5}))
    st = jobs.wait_phase("broken", "Failed", timeout=60)
    assert st["attempt"] == 1 and st["failures"] == 0
    assert any(cd["type"] == "Failed" and cd["reason"] == "NonRetryableExitCode" for cd in st["conditions"])


def test_a_retryable_exit_code_restarts_without_spending_the_budget(jobs):
    jobs.create(job_manifest("transient", steps=15, fail="1:0:3:42",
                             failurePolicy={"maxFailures": 0, "retryableExitCodes": [42], "failureSettleSeconds": 1}))
    st = jobs.wait_phase("transient", "Succeeded", timeout=90)
    assert st["attempt"] == 2 and st["failures"] == 0 and st["preemptions"] == 0
    assert st["restart"]["kind"] == "Retryable"


STAGE = """if [ ! -e /ckpt/tried ]; then touch /ckpt/tried; echo 'no data yet' >&2; exit 3; fi
echo staged > /stage/data"""


def test_init_containers_run_before_the_trainer_and_one_that_fails_spends_the_budget_naming_it(jobs):
    # Attempt 1's init container fails (its first run leaves a mark on the claim); attempt 2's stages
    # a file the trainer needs before it starts.
    jobs.create(job_manifest("staged", nodes=1, steps=10, step_s=0.1, template={
        "command": ["sh", "-c", f"grep -q staged /stage/data && exec python {STANDIN}"], "terminationGracePeriodSeconds": 5,
        "volumes": [{"name": "stage", "emptyDir": {}}], "volumeMounts": [{"name": "stage", "mountPath": "/stage"}],
        "initContainers": [{"name": "stage", "image": "busybox:1.37", "command": ["sh", "-c", STAGE],
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "volumeMounts": [{"name": "stage", "mountPath": "/stage"}, {"name": "checkpoints", "mountPath": "/ckpt"}]}]}))
    st = jobs.wait_phase("staged", "Succeeded", timeout=90)
    assert st["attempt"] == 2 and st["failures"] == 1 and st["preemptions"] == 0
    assert st["restart"]["kind"] == "Failure" and st["restart"]["reason"] == "InitContainerFailed"
    assert "init container stage exited with code 3" in st["restart"]["message"] and "no data yet" in st["restart"]["message"]


def test_a_gang_waiting_on_a_missing_secret_says_so_and_starts_once_it_exists(jobs, core, namespace):
    jobs.create(job_manifest("secretive", nodes=1, steps=10, step_s=0.1, template={
        "command": ["python", STANDIN], "terminationGracePeriodSeconds": 5,
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]}))
    jobs.wait("secretive", lambda st: "CreateContainerConfigError" in (st.get("message") or ""), timeout=60,
              what="the waiting container in status.message")
    assert 'secret' in jobs.status("secretive")["message"] and "hf" in jobs.status("secretive")["message"]
    jobs.wait_events("secretive", "PodsNotStarting")
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hf"}, "stringData": {"token": "t"}})
    st = jobs.wait_phase("secretive", "Succeeded", timeout=60)
    assert st["attempt"] == 1 and st["failures"] == 0


def test_the_trainers_preempted_exit_code_is_a_preemption(jobs):
    jobs.create(job_manifest("sigtermed", steps=15, fail=f"1:1:3:{c.EXIT_PREEMPTED}",
                             failurePolicy={"maxFailures": 0}))
    st = jobs.wait_phase("sigtermed", "Succeeded", timeout=90)
    assert st["preemptions"] == 1 and st["failures"] == 0 and st["restart"]["reason"] == "CheckpointedOnNotice"


def test_a_gang_that_cannot_start_in_time_is_torn_down_and_retried(jobs):
    # Nothing matches the selector: the pods stay Pending, the attempt times out and is retried.
    jobs.create(job_manifest("stuck", steps=10, scheduling={"nodeSelector": {"pretrain.dev/no-such-pool": "x"},
                                                            "startTimeoutSeconds": 3}))
    st = jobs.wait_phase("stuck", "Restarting", "Starting", timeout=60, attempt=2)
    assert st["restart"]["kind"] == "StartTimeout" and st["failures"] == 0 and st["preemptions"] == 0
    # The timed-out gang is removed (the new one then waits for capacity like the first).
    wait_for(lambda: {p.metadata.labels["pretrain.dev/attempt"] for p in jobs.pods("stuck", live=False)} <= {"2", "3"},
             timeout=30, what="attempt 1's pods to be gone")


def test_pods_the_api_server_refuses_for_now_are_said_once_and_created_once_allowed(jobs):
    # A quota of one pod: the gang's second pod is refused (403). Said in status.message and one
    # Event (not one per retry), retried with back-off, created as soon as the quota allows it.
    from kubernetes import client
    jobs.core.create_namespaced_resource_quota(jobs.ns, client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="one-pod"), spec=client.V1ResourceQuotaSpec(hard={"pods": "1"})))
    wait_for(lambda: (jobs.core.read_namespaced_resource_quota("one-pod", jobs.ns).status or client.V1ResourceQuotaStatus()).hard,
             timeout=30, what="the quota's status")
    jobs.create(job_manifest("quota", steps=20))
    st = jobs.wait("quota", lambda s: "refused the others" in (s.get("message") or ""), timeout=60, what="the refusal in status")
    assert st["phase"] == "Starting" and "1/2 pod(s) created" in st["message"] and "exceeded quota" in st["message"], st
    time.sleep(5)  # retries with back-off meanwhile
    assert [e.reason for e in jobs.events("quota")].count("GangCreateFailed") == 1
    jobs.core.delete_namespaced_resource_quota("one-pod", jobs.ns)
    st = jobs.wait_phase("quota", "Succeeded", timeout=120)
    assert st["attempt"] == 1 and st["failures"] == 0


def test_pods_an_admission_policy_denies_are_retried_not_failed_for_good(jobs):
    # A ValidatingAdmissionPolicy's denial is a 422 (reason Invalid) by default, as a pod the API
    # server finds invalid is; but a policy can change, so the job waits and retries (it was Failed).
    from kubernetes import client
    adm = client.AdmissionregistrationV1Api(jobs.core.api_client)
    name = f"deny-{jobs.ns}"[:63]
    adm.create_validating_admission_policy({
        "metadata": {"name": name},
        "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": [
                     {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]},
                 "validations": [{"expression": "object.metadata.labels[?'pretrain.dev/job'].orValue('') != 'vapped'",
                                  "message": "no vapped pods here"}]}})
    try:
        adm.create_validating_admission_policy_binding({
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"],
                     "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": jobs.ns}}}}})

        def denied() -> bool:  # policies take effect a moment after they are made
            probe = pod_manifest("probe", ["true"], metadata={"labels": {"pretrain.dev/job": "vapped"}})
            try:
                jobs.core.create_namespaced_pod(jobs.ns, probe, dry_run="All")
            except client.ApiException as e:
                return e.status == 422 and "ValidatingAdmissionPolicy" in e.body
            return False
        wait_for(denied, timeout=30, what="the policy to deny")
        jobs.create(job_manifest("vapped", nodes=1, steps=10))
        st = jobs.wait("vapped", lambda s: "no vapped pods here" in (s.get("message") or ""), timeout=60, what="the denial in status")
        assert st["phase"] == "Starting" and st["failures"] == 0
        jobs.wait_events("vapped", "GangCreateFailed")  # emitted right after the status write that said it
    finally:
        adm.delete_validating_admission_policy_binding(name)
        adm.delete_validating_admission_policy(name)
    st = jobs.wait_phase("vapped", "Succeeded", timeout=120)
    assert st["attempt"] == 1 and st["failures"] == 0


def test_pods_the_api_server_finds_invalid_fail_the_job_at_once_with_its_message(jobs):
    # template.volumeMounts is passed through as-is (core/v1 VolumeMount): a mount of a volume
    # the pod lacks (a typo in its name) passes the CRD and is refused by the API server (422) for
    # every pod, in every attempt alike. Before, the job stayed in Starting for ever, retrying.
    jobs.create(job_manifest("badvolume", steps=10, template={"volumeMounts": [{"name": "scrach", "mountPath": "/scratch"}]}))
    st = jobs.wait_phase("badvolume", "Failed", timeout=60)
    cond = next(cd for cd in st["conditions"] if cd["type"] == "Failed")
    assert cond["reason"] == "PodInvalid" and 'volumeMounts[' in cond["message"] and 'Not found: "scrach"' in cond["message"], cond
    assert st["failures"] == 0 and st["attempt"] == 1
    jobs.wait_events("badvolume", "Failed")
    assert not jobs.pods("badvolume", live=False)


def test_a_service_of_the_jobs_name_that_is_not_the_jobs_fails_it_naming_the_conflict_and_is_left_alone(jobs):
    # The job's headless Service is named as the job; a user's Service of that name selects other
    # pods (the rendezvous name would not resolve), and was used as if it were the job's.
    from kubernetes import client
    jobs.core.create_namespaced_service(jobs.ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="taken", labels={"app": "mine"}),
        spec=client.V1ServiceSpec(selector={"app": "mine"}, ports=[client.V1ServicePort(port=80)])))
    jobs.create(job_manifest("taken", steps=10))
    st = jobs.wait_phase("taken", "Failed", timeout=60)
    cond = next(cd for cd in st["conditions"] if cd["type"] == "Failed")
    assert cond["reason"] == "NameConflict" and "Service taken already exists and is not this job's" in cond["message"], cond
    svc = jobs.core.read_namespaced_service("taken", jobs.ns)
    assert not svc.metadata.owner_references and svc.spec.selector == {"app": "mine"}
    wait_for(lambda: not jobs.pods("taken", live=False), timeout=30, what="the job's pods to be removed")


def test_a_job_re_applied_under_its_name_waits_for_the_deleted_ones_children_to_go(jobs, core, namespace):
    # docs/operations.md: delete a Failed job, re-apply it under the same name. `kubectl delete`
    # leaves the children to garbage collection, in the background: a new job that met the old
    # Service was failed as a NameConflict. Here a finalizer holds the old Service until released.
    hold = "test.pretrain.dev/hold"
    jobs.create(job_manifest("again", steps=3000, step_s=0.1))
    old_uid = jobs.get("again")["metadata"]["uid"]
    jobs.wait_phase("again", "Running", timeout=60)
    core.patch_namespaced_service("again", namespace, {"metadata": {"finalizers": [hold]}})
    try:
        jobs.delete("again")
        wait_for(lambda: jobs.get("again") is None, timeout=60, what="the first job to go")
        jobs.create(job_manifest("again", steps=10), claim=False)
        st = jobs.wait("again", lambda s: "still belongs to a deleted PretrainJob of this name" in s.get("message", ""),
                       timeout=30, what="the new job to say what it waits for")
        assert st["phase"] != "Failed" and old_uid in st["message"], st
        time.sleep(3)  # passes go on (every 2 s): it waits, not fails, and makes no pod on the old config
        new_uid = jobs.get("again")["metadata"]["uid"]
        assert jobs.status("again")["phase"] != "Failed"
        assert not [p for p in jobs.pods("again", live=False) if p.metadata.labels["pretrain.dev/job-uid"] == new_uid]
    finally:
        core.patch_namespaced_service("again", namespace, {"metadata": {"finalizers": None}})
    st = jobs.wait_phase("again", "Succeeded", timeout=120)
    assert st["attempt"] == 1 and st["failures"] == 0
    assert [o.uid for o in core.read_namespaced_service("again", namespace).metadata.owner_references] == [new_uid]


def test_a_job_re_applied_under_its_name_waits_for_the_deleted_ones_pods_to_end(jobs, core, namespace):
    # Garbage collection removes the Service and ConfigMap at once, the pods after their grace
    # period (a trainer writing its last checkpoint): the new gang (attempt 1's names, the old one
    # at attempt 2) ran beside them, and a real trainer found the folder held by another job's
    # live trainer: exit 85, the new job failed for good.
    body = job_manifest("redo", steps=3000, step_s=0.1)
    body["spec"]["template"]["terminationGracePeriodSeconds"] = 40
    body["spec"]["template"]["env"].append({"name": "STANDIN_TERM_SECONDS", "value": "15"})  # a slow last save
    jobs.create(body)
    old_uid = jobs.get("redo")["metadata"]["uid"]
    jobs.wait_phase("redo", "Running", timeout=60)
    core.delete_namespaced_pod("redo-a1-n1", namespace, grace_period_seconds=0)  # a preemption: attempt 2
    jobs.wait_phase("redo", "Running", timeout=60, attempt=2)
    # Their trainers up, SIGTERM handled (it prints after): a pod is Running as its process starts,
    # and on a loaded machine (CI's) the deletion's SIGTERM came during its imports, ended it at
    # once, and there was nothing left to wait for.
    wait_for(lambda: all("resuming at step" in core.read_namespaced_pod_log(f"redo-a2-n{r}", namespace) for r in (0, 1)),
             timeout=60, what="attempt 2's trainers to start")
    jobs.delete("redo")
    wait_for(lambda: jobs.get("redo") is None, timeout=60, what="the first job to go")
    jobs.create(job_manifest("redo", steps=10), claim=False)
    new_uid = jobs.get("redo")["metadata"]["uid"]
    old_left = lambda: [p for p in jobs.pods("redo", live=False) if p.metadata.labels["pretrain.dev/job-uid"] == old_uid]  # noqa: E731

    def waiting():  # what it waits for, said while they still run (one poll: they end 15 s after their SIGTERM)
        st, left = jobs.status("redo"), old_left()
        return (st, left) if "of a deleted PretrainJob of this name" in st.get("message", "") else None
    st, left = wait_for(waiting, timeout=40, what="the new job to say what it waits for")
    assert "redo-a2-n0, redo-a2-n1" in st["message"] and old_uid in st["message"] and st["phase"] != "Failed", st
    assert left and not [p for p in jobs.pods("redo", live=False) if p.metadata.labels["pretrain.dev/job-uid"] == new_uid]
    wait_for(lambda: not old_left() or [p for p in jobs.pods("redo", live=False)
                                         if p.metadata.labels["pretrain.dev/job-uid"] == new_uid],
             timeout=60, what="the old pods to end or a new one to come")
    assert not [p for p in old_left() if p.status.phase not in ("Succeeded", "Failed")], \
        "the new gang was made while the deleted job's pods still ran"
    st = jobs.wait_phase("redo", "Succeeded", timeout=120)
    assert st["attempt"] == 1 and st["failures"] == 0, st.get("restart")


def _strand_then_reapply(jobs, core, namespace, cluster, pool, name: str, attempt: int):
    """A one-node job at `attempt` whose node's kubelet dies, deleted and applied again at once:
    its pod stays Terminating, phase Running, for ever. Returns (that pod, the new job's end)."""
    from pretrain_localcluster import nodes as local_nodes
    label, _ = pool
    jobs.create(job_manifest(name, nodes=1, steps=3000, step_s=0.1, pool=label))
    jobs.wait_phase(name, "Running", timeout=60)
    if attempt == 2:
        core.delete_namespaced_pod(f"{name}-a1-n0", namespace, grace_period_seconds=0)  # a preemption
        jobs.wait_phase(name, "Running", timeout=60, attempt=2)
    (old,) = jobs.pods(name)
    local_nodes.kubelet_down(cluster.state_dir, old.spec.node_name)
    # Unschedulable at once, as the node's unreachable taint makes it within seconds: a new pod
    # placed there in between is lost with the node (a preemption, attempt 2), another story.
    core.patch_node(old.spec.node_name, {"spec": {"unschedulable": True}})
    jobs.delete(name)
    wait_for(lambda: jobs.get(name) is None, timeout=60, what="the first job to go")
    jobs.create(job_manifest(name, nodes=1, steps=10, pool=label), claim=False)
    st = jobs.wait_phase(name, "Succeeded", timeout=90)
    assert st["attempt"] == 1 and st["failures"] == 0, st.get("restart")
    return old, st


def test_a_job_re_applied_under_its_name_does_not_wait_for_a_deleted_ones_pod_stuck_on_a_dark_node(jobs, core, namespace, cluster, pool):
    # Its kubelet gone, the deleted job's pod stays Terminating, phase Running, for ever: past its
    # grace period (or on a node gone dark) nothing of it runs that a new gang must wait for.
    old, _ = _strand_then_reapply(jobs, core, namespace, cluster, pool, "strand", attempt=2)  # not the new pod's name
    stuck = core.read_namespaced_pod(old.metadata.name, namespace)  # still there: it was not waited for, nor removed
    assert stuck.metadata.deletion_timestamp and stuck.metadata.labels["pretrain.dev/job-uid"] == old.metadata.labels["pretrain.dev/job-uid"]


def test_a_deleted_ones_pod_stuck_on_a_dark_node_under_the_new_gangs_pod_name_is_removed_not_waited_on(jobs, core, namespace, cluster, pool):
    # The stuck pod is strand-a1-n0, the new job's first pod's name: its create met that pod
    # (AlreadyExists, not this job's) at every pass until the start timeout; the other ranks held
    # their nodes meanwhile, and an elastic job was shrunk as if capacity were short.
    old, _ = _strand_then_reapply(jobs, core, namespace, cluster, pool, "stranded", attempt=1)
    assert old.metadata.name == "stranded-a1-n0"
    now = core.read_namespaced_pod("stranded-a1-n0", namespace)  # the new job's own, the old one removed
    assert now.metadata.uid != old.metadata.uid and now.metadata.labels["pretrain.dev/job-uid"] != old.metadata.labels["pretrain.dev/job-uid"]
    assert not [e for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=stranded").items
                if e.reason == "GangCreateFailed"]


def test_a_refused_create_is_remembered_for_its_own_job_not_for_a_new_one_of_the_same_name():
    # A job whose pods were refused as invalid, deleted and re-applied fixed before a pass saw it
    # gone, inherited the refusal of its attempt 1 and failed as PodInvalid without a create.
    from kubernetes import client

    from pretrain_operator.controller import Controller
    from pretrain_operator.settings import OperatorSettings
    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0))
    try:
        ctl.create_errors[("ns", "redo")] = ("uid-old", 1, 422, "spec.containers[0].volumeMounts[0].name: Not found")
        old = {"metadata": {"uid": "uid-old"}, "status": {"attempt": 1}}
        new = {"metadata": {"uid": "uid-new"}, "status": {"attempt": 1}}
        assert ctl._create_error("ns", "redo", old) == (422, "spec.containers[0].volumeMounts[0].name: Not found")
        assert ctl._create_error("ns", "redo", new) is None
    finally:
        ctl.pool.shutdown()


def test_a_new_gangs_start_timeout_counts_from_its_first_create_not_from_the_old_gangs_drain():
    # The old gang may take its whole grace period to checkpoint and exit (up to an hour): the new
    # gang's startTimeoutSeconds starts once it is created. It once started at the restart's
    # decision, and a new gang created after a 700 s drain was torn down two seconds later.
    import datetime as dt
    job, spec, pods, nodes, now = observed_gang("drain")
    job["spec"]["scheduling"] = {"startTimeoutSeconds": 600}
    spec = api.PretrainJobSpec.model_validate(job["spec"])

    def decide(status, pods, at):
        job["status"] = status
        return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                                   config_data=render.trainer_config(spec), now=now + dt.timedelta(seconds=at)))
    pods[1]["status"] = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": c.EXIT_PREEMPTED}}}]}
    plan = decide(job["status"], pods, 0)
    assert plan.status["phase"] == "Restarting" and plan.status["attempt"] == 2
    plan = decide(plan.status, pods[:1], 700)  # rank 0 still draining
    assert not plan.create and plan.delete_pods == [pods[0]["metadata"]["name"]]
    plan = decide(plan.status, [], 701)  # gone: the new gang is created, and is Starting (docs/preemption.md)
    assert [p["metadata"]["name"] for p in plan.create] == ["drain-a2-n0", "drain-a2-n1"]
    conds = {cd["type"]: cd for cd in plan.status["conditions"]}
    assert plan.status["phase"] == "Starting" and conds["Restarting"]["status"] == "False"
    assert plan.status["restart"]["kind"] == "Preemption"  # what ended attempt 1 stays on record
    new = render.gang(job, spec, 2)
    for p in new:
        p["status"] = {"phase": "Pending"}
    plan = decide(plan.status, new, 703)
    assert plan.status["phase"] == "Starting" and plan.status["attempt"] == 2, plan.events
    assert 597 <= plan.requeue_after <= 599


@pytest.mark.parametrize("elastic", [False, True], ids=["whole", "elastic"])
def test_waiting_for_a_deleted_jobs_children_does_not_run_down_the_new_jobs_start_timeout(elastic):
    # A fresh job's first pass records attempt 1 before it reads any child; its Service create then
    # meets the deleted job's (garbage collection lags): passes wait for it. Their wait is not the
    # gang's start: it was, and the first pass after a long wait restarted (or shrank) the job
    # before a pod existed.
    import datetime as dt
    job, _, _, nodes, now = observed_gang("again")
    job["spec"]["scheduling"] = {"startTimeoutSeconds": 60}
    if elastic:
        job["spec"]["elastic"] = {"minNodes": 1}
    del job["status"]
    spec = api.PretrainJobSpec.model_validate(job["spec"])

    def decide(at, **seen):
        seen = {"service_exists": False, "config_data": None, **seen}
        plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[], nodes=nodes, now=now + dt.timedelta(seconds=at), **seen))
        job["status"] = plan.status
        return plan
    decide(0)  # attempt 1 recorded (its creates then refused: the name is the deleted job's)
    for at in (2, 30, 90):
        plan = decide(at, predecessor="waiting for the Service of a deleted job of this name to go")
        assert not plan.create and plan.status["attempt"] == 1
    plan = decide(95, service_exists=True, config_data=render.trainer_config(spec))
    assert [p["metadata"]["name"] for p in plan.create] == ["again-a1-n0", "again-a1-n1"], plan.status
    assert plan.status["attempt"] == 1 and plan.status["phase"] == "Starting" and not plan.status.get("restart")
    assert not [e for e in plan.events if e[1] in ("StartTimeout", "ElasticShrink")], plan.events
    assert plan.status["message"] == "creating the gang of attempt 1"  # not the wait's words until it ran


def test_a_suspended_jobs_passes_write_nothing_once_it_is_suspended():
    # Status as the API server returns it (the schema's defaults filled in): a pass that changes
    # nothing writes nothing (docs/metrics.md: a converged job adds no writes).
    import datetime as dt
    job, spec, pods, nodes, now = observed_gang("resting")
    job["spec"]["suspend"] = True
    spec = api.PretrainJobSpec.model_validate(job["spec"])

    def decide(at, pods):
        job["status"] = {**api.PretrainJobStatus().model_dump(exclude_none=True), **job["status"]}
        return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                                   config_data=render.trainer_config(spec), now=now + dt.timedelta(seconds=at)))
    plan = decide(0, pods)
    assert plan.status["phase"] == "Suspended" and sorted(plan.delete_pods) == ["resting-a1-n0", "resting-a1-n1"]
    job["status"] = plan.status
    for at in (30, 60):
        plan = decide(at, [])
        assert plan.status == job["status"], {k: (v, plan.status.get(k)) for k, v in job["status"].items() if plan.status.get(k) != v}


def test_pods_held_by_a_queues_scheduling_gate_do_not_run_down_the_start_timeout():
    # Kueue gates a pod group until its quota admits it, for minutes or hours: that is queueing, not
    # a gang failing to start. It was torn down at startTimeoutSeconds and queued again at the back.
    import datetime as dt
    job, spec, pods, nodes, now = observed_gang("queued")
    job["spec"]["scheduling"] = {"startTimeoutSeconds": 600, "queueName": "team-a"}
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    job["status"].update(phase="Starting", attemptStartTime=reconcile.iso(now), readyNodes="0/2")

    def decide(at):
        plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                                   config_data=render.trainer_config(spec), now=now + dt.timedelta(seconds=at)))
        job["status"] = plan.status
        return plan
    for p in pods:
        p["status"] = {"phase": "Pending"}
        p["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    plan = decide(700)  # queued past the start timeout
    assert plan.status["phase"] == "Starting" and plan.status["attempt"] == 1, plan.events
    assert "2/2 pod(s) held by scheduling gates (kueue.x-k8s.io/admission)" in plan.status["message"]
    for p in pods:
        del p["spec"]["schedulingGates"]  # admitted
    plan = decide(800)
    assert plan.status["attemptStartTime"] == reconcile.iso(now + dt.timedelta(seconds=800)) and not plan.status["admissionWaitSince"]
    assert 599 <= plan.requeue_after <= 600
    assert decide(1300).status["attempt"] == 1
    plan = decide(1401)  # 601 s after the admission: now it is a gang that cannot start
    assert plan.status["attempt"] == 2 and plan.status["restart"]["kind"] == "StartTimeout"
    # Admitted, and every pod already running at the next pass: the wait ends there too (it stayed
    # in status for the whole attempt).
    job["status"].update(phase="Starting", attempt=1, attemptStartTime=reconcile.iso(now), admissionWaitSince=reconcile.iso(now),
                         restart={})
    for p in pods:
        p["status"] = {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    plan = decide(900)
    assert plan.status["phase"] == "Running" and not plan.status["admissionWaitSince"]
    assert plan.status["attemptStartTime"] == reconcile.iso(now + dt.timedelta(seconds=900))


def test_a_gang_gated_as_kueue_gates_it_waits_past_its_start_timeout_and_starts_once_ungated(jobs):
    # On the local cluster, a MutatingAdmissionPolicy gates the namespace's pods as Kueue's webhook
    # does, and the test lifts the gates as Kueue does when it admits the group.
    from kubernetes import client
    custom = client.CustomObjectsApi(jobs.core.api_client)
    group, name = "admissionregistration.k8s.io", f"gate-{jobs.ns}"
    custom.create_cluster_custom_object(group, "v1", "mutatingadmissionpolicies", {
        "apiVersion": f"{group}/v1", "kind": "MutatingAdmissionPolicy", "metadata": {"name": name},
        "spec": {"matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                                         "resources": ["pods"]}]},
                 "failurePolicy": "Fail", "reinvocationPolicy": "Never",
                 "mutations": [{"patchType": "ApplyConfiguration", "applyConfiguration": {"expression":
                     'Object{spec: Object.spec{schedulingGates: [Object.spec.schedulingGates{name: "example.com/queue"}]}}'}}]}})
    custom.create_cluster_custom_object(group, "v1", "mutatingadmissionpolicybindings", {
        "apiVersion": f"{group}/v1", "kind": "MutatingAdmissionPolicyBinding", "metadata": {"name": name},
        "spec": {"policyName": name, "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": jobs.ns}}}}})
    try:
        probe = client.V1Pod(metadata=client.V1ObjectMeta(name="probe"), spec=client.V1PodSpec(
            containers=[client.V1Container(name="c", image="x", security_context=client.V1SecurityContext(
                allow_privilege_escalation=False, run_as_non_root=True, capabilities=client.V1Capabilities(drop=["ALL"]),
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")))]))
        wait_for(lambda: jobs.core.create_namespaced_pod(jobs.ns, probe, dry_run="All").spec.scheduling_gates,
                 timeout=30, what="the policy to gate pods")
        jobs.create(job_manifest("gated", steps=20, scheduling={"startTimeoutSeconds": 3}))
        st = jobs.wait("gated", lambda s: "held by scheduling gates" in (s.get("message") or ""), timeout=60, what="the gated gang")
        assert "2/2 pod(s) held by scheduling gates (example.com/queue)" in st["message"]
        time.sleep(8)  # well past startTimeoutSeconds
        st = jobs.status("gated")
        assert st["attempt"] == 1 and st["phase"] == "Starting" and st.get("admissionWaitSince"), st
        jobs.patch("gated", {"spec": {"scheduling": {"startTimeoutSeconds": 120}}})  # time for the pods to start
        for p in jobs.pods("gated"):
            jobs.core.patch_namespaced_pod(p.metadata.name, jobs.ns, {"spec": {"schedulingGates": None}})
        st = jobs.wait_phase("gated", "Succeeded", timeout=120)
        assert st["attempt"] == 1 and st["failures"] == 0 and not st["admissionWaitSince"]
    finally:
        custom.delete_cluster_custom_object(group, "v1", "mutatingadmissionpolicybindings", name)
        custom.delete_cluster_custom_object(group, "v1", "mutatingadmissionpolicies", name)


def test_suspend_checkpoints_and_removes_the_pods_and_resume_continues_from_it(jobs):
    jobs.create(job_manifest("pausable", steps=300, interval=1000, step_s=0.1))
    jobs.wait_phase("pausable", "Running", timeout=60)
    jobs.wait("pausable", lambda s: (s.get("progress") or {}).get("step", 0) >= 5, what="some progress")
    jobs.patch("pausable", {"spec": {"suspend": True}})
    st = jobs.wait_phase("pausable", "Suspended", timeout=30)
    assert any(cd["type"] == "Suspended" and cd["status"] == "True" for cd in st["conditions"])
    wait_for(lambda: not jobs.pods("pausable", live=False), timeout=30, what="the pods to be removed")
    # Training fields may change while suspended (and only then).
    jobs.patch("pausable", {"spec": {"training": {"steps": 40}}})
    jobs.patch("pausable", {"spec": {"suspend": False}})
    st = jobs.wait_phase("pausable", "Running", "Succeeded", timeout=60, attempt=2)
    assert st["failures"] == 0 and st["preemptions"] == 0 and st["restart"]["kind"] == "Resume"
    # The pods were stopped with SIGTERM and checkpointed; attempt 2 resumed there, not at 0.
    assert jobs.resumed_step("pausable", 2) >= 5
    assert jobs.wait_phase("pausable", "Succeeded", timeout=60)["progress"]["step"] == 40


def test_training_fields_are_immutable_while_the_job_runs(jobs, operator):
    from kubernetes import client
    jobs.create(job_manifest("fixed", steps=300))
    jobs.wait_phase("fixed", "Running", "Starting", timeout=60)
    with pytest.raises(client.ApiException) as exc:
        jobs.patch("fixed", {"spec": {"training": {"steps": 10}}})
    assert exc.value.status == 422 and "immutable while the job runs" in exc.value.body
    with pytest.raises(client.ApiException) as exc:  # an optional field, absent until now
        jobs.patch("fixed", {"spec": {"validation": {"everySteps": 10}}})
    assert exc.value.status == 422 and "immutable while the job runs" in exc.value.body
    # Suspended in the spec but not yet seen so (the operator down): its gang still runs the old
    # spec. A suspend, an edit and a resume before the operator looked left it running the old
    # model, and the next attempt loaded its checkpoints into the new one.
    operator.stop()
    try:
        jobs.patch("fixed", {"spec": {"suspend": True}})
        with pytest.raises(client.ApiException) as exc:
            jobs.patch("fixed", {"spec": {"training": {"steps": 10}}})
        assert exc.value.status == 422 and "wait for status.phase Suspended" in exc.value.body
    finally:
        operator.start()
    jobs.wait_phase("fixed", "Suspended", timeout=30)
    jobs.patch("fixed", {"spec": {"training": {"steps": 10}}})  # seen suspended: allowed


def test_an_active_deadline_fails_the_job_after_a_checkpoint_and_a_resume_restarts_its_clock(jobs):
    deadline = 8
    jobs.create(job_manifest("capped", steps=3000, interval=1000, step_s=0.1, activeDeadlineSeconds=deadline))
    jobs.wait_phase("capped", "Running", timeout=60)
    first = reconcile.parse(jobs.status("capped")["startTime"])
    jobs.patch("capped", {"spec": {"suspend": True}})
    jobs.wait_phase("capped", "Suspended", timeout=30)
    # Suspended past the deadline: a resume gets a new clock, as a Kubernetes Job does.
    time.sleep(max(0.0, deadline + 1 - (time.time() - first.timestamp())))
    jobs.patch("capped", {"spec": {"suspend": False}})
    st = jobs.wait_phase("capped", "Running", "Failed", timeout=60, attempt=2)
    assert st["phase"] == "Running", st.get("message")
    start = reconcile.parse(st["startTime"])
    assert start > first
    resumed = jobs.resumed_step("capped", 2)
    st = jobs.wait_phase("capped", "Failed", timeout=60)
    cond = next(cd for cd in st["conditions"] if cd["type"] == "Failed")
    assert cond["reason"] == "DeadlineExceeded" and f"activeDeadlineSeconds ({deadline} s)" in cond["message"]
    assert st["failures"] == 0 and st["attempt"] == 2
    # Within a few seconds of the deadline (status times are in whole seconds).
    assert deadline <= (reconcile.parse(st["completionTime"]) - start).total_seconds() <= deadline + 4
    jobs.wait_events("capped", "Failed")
    wait_for(lambda: not jobs.pods("capped", live=False), timeout=30, what="the pods to be removed")
    # Stopped with SIGTERM, the trainer checkpointed where it stood (intervalSteps 1000: no other save).
    saved = [int(p.name.split("-")[1]) for p in jobs.claim_folder("capped-ckpt").glob("step-*") if (p / "COMMITTED").exists()]
    assert max(saved) > resumed
    # ... and status.lastCheckpoint says so (rank 0's final report, its pod gone before a pass listed it).
    jobs.wait("capped", lambda s: (s.get("lastCheckpoint") or {}).get("step") == max(saved), timeout=10,
              what="the deadline's checkpoint in status.lastCheckpoint")


def test_a_running_job_has_a_pass_due_when_its_deadline_comes():
    # Nothing else may happen then (no pod event; a resync is minutes on a real cluster).
    job, _, pods, nodes, now = observed_gang("due")  # started 30 s ago
    job["spec"]["activeDeadlineSeconds"] = 100
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                               config_data=render.trainer_config(spec), now=now))
    assert plan.status["phase"] == "Running" and 69 <= plan.requeue_after <= 70


def _decide(job, pods, nodes, now, **spec):
    job["spec"].update(spec)
    s = api.PretrainJobSpec.model_validate(job["spec"])
    return reconcile.decide(reconcile.Observed(job=job, spec=s, pods=pods, nodes=nodes, service_exists=True,
                                               config_data=render.trainer_config(s), now=now))


def _finished(pod: dict) -> None:
    pod["status"] = {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "False"}],
                     "containerStatuses": [{"name": "trainer", "ready": False, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}


def test_a_rank_that_finished_first_is_no_slow_start_of_a_long_running_gang():
    # Rank 1 exited 0 while rank 0 still writes its last checkpoint, 30 s after the attempt began
    # with a 10 s start timeout: still Running (it was restarted as a StartTimeout at its very end).
    job, _, (n0, n1), nodes, now = observed_gang("ending")
    _finished(n1)
    plan = _decide(job, [n0, n1], nodes, now, scheduling={"startTimeoutSeconds": 10})
    assert plan.status["phase"] == "Running" and plan.status["attempt"] == 1 and not plan.delete_pods
    # The same with a sidecar that keeps the pod Running (a native one: an init container with
    # restartPolicy Always; a mesh's proxy) after its trainer exited 0.
    n1["status"]["phase"] = "Running"
    n1["status"]["initContainerStatuses"] = [{"name": "proxy", "state": {"running": {}}}]
    plan = _decide(job, [n0, n1], nodes, now, scheduling={"startTimeoutSeconds": 10})
    assert plan.status["phase"] == "Running" and plan.status["attempt"] == 1 and not plan.delete_pods
    # ... and a second container, still running beside the exited trainer.
    n1["status"]["containerStatuses"].append({"name": "proxy", "ready": True, "state": {"running": {}}})
    plan = _decide(job, [n0, n1], nodes, now, scheduling={"startTimeoutSeconds": 10})
    assert plan.status["phase"] == "Running" and plan.status["attempt"] == 1 and not plan.delete_pods


def test_a_finished_rank_whose_pod_was_then_deleted_is_no_preemption():
    # Rank 1 exited 0 while rank 0 writes its last checkpoint; its node, emptied, was removed by an
    # autoscaler, and PodGC deleted the pod (no DisruptionTarget: it had ended). The watch saw it
    # Succeeded: that is how it ended. It was a PodDeleted preemption, and rank 0's save SIGTERMed.
    job, spec, (n0, n1), nodes, now = observed_gang("gcd")
    _finished(n1)
    del nodes["spot-1"]
    s = api.PretrainJobSpec.model_validate(job["spec"])
    plan = reconcile.decide(reconcile.Observed(job=job, spec=s, pods=[n0], nodes=nodes, service_exists=True,
                                               config_data=render.trainer_config(s), now=now, last_seen={"gcd-a1-n1": n1}))
    assert plan.status["phase"] == "Running" and plan.status["preemptions"] == 0 and not plan.delete_pods
    _finished(n0)
    plan = reconcile.decide(reconcile.Observed(job=job, spec=s, pods=[n0], nodes=nodes, service_exists=True,
                                               config_data=render.trainer_config(s), now=now, last_seen={"gcd-a1-n1": n1}))
    assert plan.status["phase"] == "Succeeded" and plan.status["preemptions"] == 0
    # Unseen (the watch missed its end): a pod deleted by someone else, as before.
    plan = reconcile.decide(reconcile.Observed(job=job, spec=s, pods=[n0], nodes=nodes, service_exists=True,
                                               config_data=render.trainer_config(s), now=now))
    assert plan.status["restart"]["reason"] == "PodDeleted"
    # The same past the active deadline: done in time, not DeadlineExceeded.
    job["status"]["startTime"] = reconcile.iso(now - reconcile.dt.timedelta(hours=2))
    s = s.model_copy(update={"activeDeadlineSeconds": 3600})
    plan = reconcile.decide(reconcile.Observed(job=job, spec=s, pods=[n0], nodes=nodes, service_exists=True,
                                               config_data=render.trainer_config(s), now=now, last_seen={"gcd-a1-n1": n1}))
    assert plan.status["phase"] == "Succeeded", plan.status["message"]


def test_a_rank_is_what_its_trainer_container_did_not_its_sidecars():
    # A mesh's proxy (a regular container) beside the trainer: the rank is done when the trainer
    # exited 0, whatever the proxy does after (still running, killed); a log shipper that exited 0
    # while the trainer trains finishes nothing.
    job, spec, (n0, n1), nodes, now = observed_gang("meshed")
    proxy = {"name": "istio-proxy", "ready": True, "state": {"running": {}}}
    done = {"name": "trainer", "ready": False, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
    n1["status"]["containerStatuses"] = [done, proxy]
    del nodes["spot-1"]  # its node then removed: no preemption, rank 0's last save goes on
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["phase"] == "Running" and plan.status["preemptions"] == 0 and not plan.delete_pods
    # The proxy killed since (137): the pod Failed, the rank still done.
    n1["status"] = {"phase": "Failed", "containerStatuses": [done, {**proxy, "state": {"terminated": {"exitCode": 137}}}]}
    job["spec"]["failurePolicy"]["failureSettleSeconds"] = 0
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["phase"] == "Running" and plan.status["failures"] == 0 and not plan.delete_pods
    _finished(n0)
    n0["status"]["containerStatuses"].append({**proxy, "state": {"running": {}}})
    n0["status"]["phase"] = "Running"
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["phase"] == "Succeeded"
    # Its proxy holds rank 0's pod (and its accelerators): removed once the job is done.
    job["status"] = plan.status
    assert _decide(job, [n0, n1], nodes, now).delete_pods == ["meshed-a1-n0"]
    # A log shipper ended first, the trainer trains on, hours into the attempt: running, not
    # finished, and no slow start (the attempt's start timeout had long passed).
    job, spec, (n0, n1), nodes, now = observed_gang("shipped")
    job["status"]["attemptStartTime"] = reconcile.iso(now - reconcile.dt.timedelta(hours=3))
    n1["status"]["containerStatuses"] = [{"name": "log-shipper", "state": {"terminated": {"exitCode": 0}}}] + \
        n1["status"]["containerStatuses"]
    assert not classify.finished(n1)
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["phase"] == "Running" and plan.status.get("completionTime") is None and plan.status["attempt"] == 1
    assert plan.status["readyNodes"] == "2/2"
    # Any other pod not up in a gang that was all up: no start timeout either (its end is classified).
    n1["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": "Unknown"}}}]
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["phase"] == "Running" and plan.status["attempt"] == 1


def test_a_finished_gang_is_succeeded_even_if_a_node_went_or_its_deadline_passed_before_it_was_seen():
    job, _, (n0, n1), nodes, now = observed_gang("done")
    _finished(n0), _finished(n1)
    n1["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"})
    del nodes["spot-1"]  # emptied by an autoscaler after the pod finished
    plan = _decide(job, [n0, n1], nodes, now, activeDeadlineSeconds=20)  # started 30 s ago
    assert plan.status["phase"] == "Succeeded" and plan.status["preemptions"] == 0 and plan.status["attempt"] == 1


def test_a_pod_that_cannot_start_says_why_in_status_and_one_event():
    job, _, (n0, n1), nodes, now = observed_gang("waits")
    job["status"]["phase"] = "Starting"
    n1["status"] = {"phase": "Pending", "containerStatuses": [{"name": "trainer", "ready": False, "state": {"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "wandb" not found'}}}]}
    plan = _decide(job, [n0, n1], nodes, now)
    said = 'attempt 1: 1/2 node(s) running; pod waits-a1-n1: container trainer is waiting (CreateContainerConfigError: secret "wandb" not found)'
    assert plan.status["message"] == said and ("Warning", "PodsNotStarting", said) in plan.events
    job["status"] = plan.status  # the next pass: the same, said already
    assert not [e for e in _decide(job, [n0, n1], nodes, now).events if e[1] == "PodsNotStarting"]
    n1["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["message"].endswith("pod waits-a1-n1 is unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    assert [e[1] for e in plan.events] == ["PodsNotStarting"]  # another cause: said
    # The same cause in other words (the scheduler's figures as an autoscaler adds nodes, fewer
    # pods running): status.message follows, no new Event (a large gang's were hundreds).
    job["status"] = plan.status
    n1["status"]["conditions"][0]["message"] = "0/4 nodes are available: 1 node(s) had untolerated taint, 3 Insufficient nvidia.com/gpu."
    n0["status"] = {"phase": "Pending"}
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["message"] == ("attempt 1: 0/2 node(s) running; pod waits-a1-n1 is unschedulable: 0/4 nodes are available: "
                                      "1 node(s) had untolerated taint, 3 Insufficient nvidia.com/gpu.")
    assert not [e for e in plan.events if e[1] == "PodsNotStarting"]


def test_a_pod_on_its_way_in_the_attempts_first_seconds_is_not_said_not_to_start():
    # A claim binding makes the scheduler say "unbound immediate PersistentVolumeClaims" for a
    # second: make demo's every run began with that Warning. Said once the attempt is 10 s old.
    job, _, (n0, n1), nodes, now = observed_gang("fresh")
    job["status"].update(phase="Starting", attemptStartTime=reconcile.iso(now - reconcile.dt.timedelta(seconds=4)))
    n1["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                        "message": "0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims."}]}
    plan = _decide(job, [n0, n1], nodes, now)
    assert not plan.events and "unschedulable" not in plan.status.get("message", "")
    assert 5.0 <= plan.requeue_after <= 6.1  # back when the grace ends, should nothing else come
    plan = _decide(job, [n0, n1], nodes, now + reconcile.dt.timedelta(seconds=7))
    assert [e[1] for e in plan.events] == ["PodsNotStarting"] and "unbound immediate PersistentVolumeClaims" in plan.status["message"]


def test_attempts_that_keep_ending_at_once_make_the_next_gang_wait_doubling():
    assert [reconcile.restart_backoff(k) for k in range(8)] == [0, 0, 0, 10, 20, 40, 80, 160]
    assert reconcile.restart_backoff(20) == 300
    job, _, (n0, n1), nodes, now = observed_gang("loop")  # attempt 1 began 30 s ago
    job["status"]["quickRestarts"] = 2
    n1["status"] = {"phase": "Failed", "reason": "UnexpectedAdmissionError", "message": "device plugin refused"}
    plan = _decide(job, [n0, n1], nodes, now)  # a retryable refusal: the third quick restart
    assert plan.status["attempt"] == 2 and plan.status["quickRestarts"] == 3
    # Attempt 1's pods gone: attempt 2's gang waits 10 s from the decision (in whole seconds), then is created.
    job["status"] = plan.status
    plan = _decide(job, [], nodes, now + reconcile.dt.timedelta(seconds=4))
    assert not plan.create and 5.0 <= plan.requeue_after <= 6.1 and "waiting 10 s before creating the gang" in plan.status["message"]
    plan = _decide(job, [], nodes, now + reconcile.dt.timedelta(seconds=10.5))
    assert sorted(p["metadata"]["name"] for p in plan.create if p["kind"] == "Pod") == ["loop-a2-n0", "loop-a2-n1"]


def test_an_attempt_that_ran_a_while_resets_the_quick_restarts():
    job, _, (n0, n1), nodes, now = observed_gang("steady")
    job["status"]["quickRestarts"] = 5
    job["status"]["attemptStartTime"] = reconcile.iso(now - reconcile.dt.timedelta(hours=2))
    n1["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"})
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["attempt"] == 2 and plan.status["quickRestarts"] == 0 and plan.status["preemptions"] == 1


def test_a_failed_job_is_looked_at_again_while_its_pods_go_and_then_left_to_its_events():
    job, _, pods, nodes, now = observed_gang("over")
    job["status"].update(phase="Failed", completionTime=reconcile.iso(now))
    assert _decide(job, pods, nodes, now).requeue_after == 30.0
    assert _decide(job, [], nodes, now).requeue_after is None  # controller.next_pass: the finished resync


def test_an_old_pod_that_does_not_go_is_said_once_since_the_next_gang_waits_for_it():
    job, _, (n0, n1), nodes, now = observed_gang("sticky")
    job["status"].update(attempt=2, phase="Restarting", gangCreated=False,
                         restart={"fromAttempt": 1, "kind": "Preemption", "reason": "PodDeleted", "requestedAt": reconcile.iso(now)})
    n1["metadata"].update(deletionTimestamp=reconcile.iso(now - reconcile.dt.timedelta(minutes=5)), finalizers=["example.com/audit"])
    n0["metadata"]["deletionTimestamp"] = reconcile.iso(now)  # just deleted: on its way
    plan = _decide(job, [n0, n1], nodes, now)
    assert not plan.create and plan.status["message"].startswith("attempt 2 waits: pod sticky-a1-n1 of attempt 1 was to be gone by ")
    assert plan.status["message"].endswith("(finalizers: example.com/audit)")
    assert [e[1] for e in plan.events] == ["OldPodsStuck"]
    job["status"] = plan.status
    assert not _decide(job, [n0, n1], nodes, now + reconcile.dt.timedelta(seconds=30)).events  # said once


def test_a_refusal_whose_words_change_is_one_event():
    # A quota's message carries its usage, which changes between retries: one Event, status follows.
    job, _, _, nodes, now = observed_gang("quota")
    job["status"].update(phase="Starting", gangCreated=False, readyNodes="0/2")
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    events = []
    for used in (3, 4):
        o = reconcile.Observed(job=job, spec=spec, pods=[], nodes=nodes, service_exists=True, config_data=render.trainer_config(spec),
                               now=now, create_error=(403, f"exceeded quota: pods, requested: 1, used: {used}, limited: 4"))
        plan = reconcile.decide(o)
        events += [e for e in plan.events if e[1] == "GangCreateFailed"]
        assert plan.status["message"].endswith(f"used: {used}, limited: 4")
        job["status"] = plan.status
    assert len(events) == 1


def test_a_job_created_suspended_starts_its_first_attempt_when_admitted_and_that_is_no_restart():
    # Kueue creates jobs suspended and admits them by setting suspend: false. Nothing ran: the first
    # attempt is no "Resume" (it was one, counted in the restart metrics with the queue's wait as
    # a recovery time).
    job, _, _, nodes, now = observed_gang("queued")
    job["status"] = {}
    plan = _decide(job, [], nodes, now, suspend=True)
    assert plan.status["phase"] == "Suspended" and plan.status["attempt"] == 0 and not plan.create
    assert [e[2] for e in plan.events] == ["created suspended: no pods until spec.suspend is false"]
    job["status"] = plan.status
    plan = _decide(job, [], nodes, now + reconcile.dt.timedelta(minutes=5), suspend=False)
    assert plan.status["phase"] == "Starting" and plan.status["attempt"] == 1 and not plan.status.get("restart")
    assert sorted(p["metadata"]["name"] for p in plan.create if p["kind"] == "Pod") == ["queued-a1-n0", "queued-a1-n1"]
    assert [e[1] for e in plan.events] == ["Starting"]
    conds = {cd["type"]: cd["status"] for cd in plan.status["conditions"]}
    assert conds["Suspended"] == "False"


def test_suspend_asks_for_its_own_checkpoint_even_after_a_notices():
    # A notice's request, served hours ago: the suspend's is a new id, which the trainer serves
    # (it serves each id once; the notice's left in place asked for nothing new).
    job, _, (n0, n1), nodes, now = observed_gang("paused")
    n0["metadata"]["annotations"] = {c.ANN_CHECKPOINT_REQUEST: "notice-1-2026-12-03T01:00:00Z"}
    plan = _decide(job, [n0, n1], nodes, now, suspend=True)
    assert plan.annotate_pods == {"paused-a1-n0": {c.ANN_CHECKPOINT_REQUEST: "suspend-1"},
                                  "paused-a1-n1": {c.ANN_CHECKPOINT_REQUEST: "suspend-1"}}
    assert plan.status["phase"] == "Suspended" and sorted(plan.delete_pods) == ["paused-a1-n0", "paused-a1-n1"]


@pytest.mark.parametrize("max_failures,phase", [(3, "Suspended"), (0, "Failed")])
def test_a_failure_settling_when_the_job_is_suspended_still_counts(max_failures, phase):
    # A rank failed; within failurePolicy.failureSettleSeconds the job was suspended (a user, a
    # queue): removing the pods erased the failure, and the resume spent nothing for it.
    job, _, (n0, n1), nodes, now = observed_gang("settling")
    job["spec"]["failurePolicy"] = {"failureSettleSeconds": 30, "maxFailures": max_failures}
    n0["status"] = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}
    plan = _decide(job, [n0, n1], nodes, now)
    assert plan.status["failureSeenAt"] and plan.status["failures"] == 0 and plan.status["phase"] == "Running"
    job["status"] = plan.status
    plan = _decide(job, [n0, n1], nodes, now + reconcile.dt.timedelta(seconds=2), suspend=True)
    st = plan.status
    assert st["phase"] == phase and st["failures"] == 1 and not st.get("failureSeenAt"), st
    if phase == "Suspended":  # said, as a restart's failure is: not only a counter gone up
        assert ("Warning", "Failure", "attempt 1 ended (ExitCode: pod settling-a1-n0 exited with code 1 (Error)) as the job was suspended: "
                "failure 1 of maxFailures 3") in plan.events, plan.events
    if phase == "Failed":
        cond = next(cd for cd in st["conditions"] if cd["type"] == "Failed")
        assert cond["reason"] == "MaxFailuresExceeded" and "settling-a1-n0 exited with code 1" in cond["message"], cond
