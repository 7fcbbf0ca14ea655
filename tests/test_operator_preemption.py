"""Every preemption signal restarts the whole gang as a new attempt from the latest checkpoint,
with preemptions + 1 and failures unchanged: a DisruptionTarget from an eviction, a deleted node,
a NotReady node, a termination-notice taint (which first asks the trainer for a checkpoint), and
a pod deleted by someone other than the operator."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from pretrain_localcluster import nodes
from pretrain_operator import api, classify, contract as c, reconcile, render
from tests.helpers import wait_for
from tests.jobs import Jobs, job_manifest, observed_gang



@pytest.fixture
def jobs(api, namespace, operator) -> Jobs:
    return Jobs(api, namespace)


def _running_then_checkpoint(jobs: Jobs, name: str) -> tuple[dict, str]:
    jobs.wait_phase(name, "Running", timeout=60)
    st = jobs.wait(name, lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) >= 5, what="a first checkpoint")
    rank0 = next(p for p in jobs.pods(name, attempt=1) if p.metadata.labels["pretrain.dev/node-rank"] == "0")
    return st, rank0.spec.node_name


def _assert_preempted_once(jobs: Jobs, name: str, reason_in: tuple[str, ...]) -> dict:
    st = jobs.wait_phase(name, "Running", timeout=90, attempt=2)
    assert st["preemptions"] == 1 and st["failures"] == 0
    assert st["restart"]["kind"] == "Preemption" and st["restart"]["reason"] in reason_in, st["restart"]
    assert {p.metadata.labels["pretrain.dev/attempt"] for p in jobs.pods(name)} == {"2"}
    return st


def test_eviction_with_disruption_target_is_a_preemption_and_resumes_from_the_checkpoint(jobs, pool):
    from kubernetes import client
    label, _ = pool
    jobs.create(job_manifest("evicted", steps=400, pool=label))
    st, _ = _running_then_checkpoint(jobs, "evicted")
    # An eviction alone (a drain, a descheduler): no notice taint and the node stays, so only the
    # pod's DisruptionTarget condition, which the Eviction API sets, can make it a preemption.
    victim = jobs.pods("evicted", attempt=1)[1].metadata.name
    jobs.core.create_namespaced_pod_eviction(victim, jobs.ns, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=victim, namespace=jobs.ns)))
    _assert_preempted_once(jobs, "evicted", ("EvictionByEvictionAPI",))
    assert jobs.resumed_step("evicted", 2) >= st["lastCheckpoint"]["step"] > 0
    jobs.wait_events("evicted", "Preemption")


def test_a_deleted_node_is_a_preemption(core, jobs, pool):
    label, _ = pool
    jobs.create(job_manifest("nodeless", steps=400, pool=label))
    _, node = _running_then_checkpoint(jobs, "nodeless")
    core.delete_node(node)  # the node vanishes (a cloud reclaim with no notice and no eviction)
    _assert_preempted_once(jobs, "nodeless", ("NodeDeleted", "DeletionByPodGC"))


def test_a_not_ready_node_is_a_preemption(cluster, jobs, pool):
    label, _ = pool
    jobs.create(job_manifest("unready", steps=400, pool=label, failurePolicy={"failureSettleSeconds": 15}))
    _, node = _running_then_checkpoint(jobs, "unready")
    # Killed without notice: the other rank crashes when its peer vanishes; the node goes NotReady
    # within the settle window, so the whole attempt counts as a preemption, not a failure.
    nodes.fail_node(cluster.state_dir, node)
    _assert_preempted_once(jobs, "unready", ("NodeNotReady", "PodDeleted", "DeletionByTaintManager"))
    # Its pod there could never finish a graceful deletion: force-deleted, and the Event says why.
    jobs.wait_events("unready", "PodForceDeleted")
    msg = next(e.message for e in jobs.events("unready") if e.reason == "PodForceDeleted")
    assert msg.startswith(f"node {node} is ") and "force-deleted (grace period 0)" in msg and "checkpoint fence" in msg


def test_a_termination_notice_asks_for_a_checkpoint_then_the_reclaim_is_a_preemption(cluster, jobs, pool):
    label, _ = pool
    jobs.create(job_manifest("noticed", steps=400, interval=1000, pool=label, step_s=0.1))
    jobs.wait_phase("noticed", "Running", timeout=60)
    rank0 = next(p for p in jobs.pods("noticed", attempt=1) if p.metadata.labels["pretrain.dev/node-rank"] == "0")
    t = threading.Thread(target=nodes.preempt, args=(cluster.state_dir, rank0.spec.node_name),
                         kwargs={"notice_s": 10.0, "taint": "gke", "log": lambda *_: None})
    t.start()
    # During the notice, before any SIGTERM: the operator asks, the trainer checkpoints (no
    # interval checkpoint exists; the SIGTERM's save would say "SIGTERM at step", not this).
    wait_for(lambda: "checkpoint requested: saved step" in jobs.logs(rank0.metadata.name), timeout=20,
             what="the trainer to checkpoint on the notice's request")
    st = jobs.wait("noticed", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) > 0, timeout=20,
                   what="a checkpoint taken on the notice")
    t.join(60)
    jobs.wait_events("noticed", "TerminationNotice")
    _assert_preempted_once(jobs, "noticed", ("TerminationNotice", "EvictionByEvictionAPI", "CheckpointedOnNotice", "NodeDeleted"))
    assert jobs.resumed_step("noticed", 2) >= st["lastCheckpoint"]["step"]


def test_a_pod_deleted_by_someone_else_is_a_preemption(core, jobs, namespace, operator):
    jobs.create(job_manifest("poked", steps=400))
    jobs.wait_phase("poked", "Running", timeout=60)
    before = operator.total("pretrain_operator_gang_restarts_total")
    core.delete_namespaced_pod("poked-a1-n1", namespace)
    _assert_preempted_once(jobs, "poked", ("PodDeleted", "CheckpointedOnNotice"))
    assert operator.total("pretrain_operator_gang_restarts_total") >= before + 1  # the alerts' series


def test_an_evicted_pod_gone_before_the_reconcile_lists_it_keeps_its_eviction_reason():
    """The race the watch closes (no cluster: reconcile.decide on observed state): the evicted pod
    is already deleted when the pods are listed; its last watched state names the eviction."""
    job, spec, (n0, n1), ready, now = observed_gang("gone")
    n0["metadata"]["deletionTimestamp"] = reconcile.iso(now - dt.timedelta(seconds=30))
    n0["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                                       "message": "Eviction API: evicting"})
    del ready["spot-0"]

    def restart(disrupted):
        return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n1], nodes=ready, service_exists=True,
                                                   config_data=None, now=now, last_seen=disrupted)).status["restart"]
    assert restart({})["reason"] == "PodDeleted"  # what the reconcile knew without the watch's memory
    r = restart({n0["metadata"]["name"]: n0})
    assert r["kind"] == "Preemption" and r["reason"] == "EvictionByEvictionAPI"


def test_a_rank_evicted_and_gone_before_a_pass_saw_the_whole_gang_is_a_preemption_not_made_again():
    """gangCreated is written by the pass after the creates: an operator killed in between (or
    creates refused for a while) and a rank evicted and removed meanwhile. Made again under the same
    attempt, it hid the eviction; its peer, crashed as it vanished, was counted a failure."""
    job, spec, (n0, n1), ready, now = observed_gang("halfway")
    job["status"]["gangCreated"] = False
    n0["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                       "message": "preempted by a higher priority pod"})
    n1["status"] = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}

    def decide(last_seen):
        return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n1], nodes=ready, service_exists=True,
                                                   config_data=None, now=now, last_seen=last_seen))
    plan = decide({n0["metadata"]["name"]: n0})
    assert not [o for o in plan.create if o["kind"] == "Pod"] and plan.status["restart"]["kind"] == "Preemption", plan
    assert plan.status["preemptions"] == 1 and plan.status["failures"] == 0 and plan.status["attempt"] == 2
    # A deleted job's pod of that name (another uid) is not this gang's: the missing rank is made.
    n0["metadata"]["labels"] = {**n0["metadata"]["labels"], c.LABEL_JOB_UID: "a-deleted-job"}
    plan = decide({n0["metadata"]["name"]: n0})
    assert [o["metadata"]["name"] for o in plan.create if o["kind"] == "Pod"] == ["halfway-a1-n0"] and plan.status["attempt"] == 1


@pytest.mark.parametrize("reason,message,kind", [
    ("UnexpectedAdmissionError", "Allocate failed due to no healthy devices present; cannot allocate unhealthy devices nvidia.com/gpu", "Retryable"),
    ("OutOfnvidia.com/gpu", "Node didn't have enough resource: nvidia.com/gpu, requested: 8, used: 8, capacity: 8", "Retryable"),
    ("Evicted", "The node was low on resource: ephemeral-storage.", "Preemption"),
])
def test_a_pod_its_node_refused_or_evicted_before_it_ran_spends_no_failure(reason, message, kind):
    """No cluster (reconcile.decide on the status a kubelet writes): phase Failed, no container
    state. It once counted as `exited with code 1 (Error)` and spent the failure budget."""
    job, spec, (n0, n1), ready, now = observed_gang("refused")
    n1["status"] = {"phase": "Failed", "reason": reason, "message": message}
    st = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n0, n1], nodes=ready, service_exists=True,
                                             config_data=None, now=now)).status
    assert st["restart"]["kind"] == kind and st["restart"]["reason"] == reason and message in st["restart"]["message"], st["restart"]
    assert st["failures"] == 0 and st["attempt"] == 2


def test_a_running_trainer_evicted_without_a_disruption_target_is_a_preemption():
    """No cluster: a kubelet that adds no DisruptionTarget condition (before 1.26, or its feature
    gate off) evicts a running trainer for node pressure, which ends killed (137): it counted as
    `exited with code 137 (Error)` and spent the failure budget."""
    job, spec, (n0, n1), ready, now = observed_gang("pressed")
    message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 80Mi."
    n1["status"] = {"phase": "Failed", "reason": "Evicted", "message": message, "containerStatuses": [
        {"name": c.TRAINER_CONTAINER, "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}
    st = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n0, n1], nodes=ready, service_exists=True,
                                             config_data=None, now=now)).status
    assert st["restart"]["kind"] == "Preemption" and st["restart"]["reason"] == "Evicted" and message in st["restart"]["message"]
    assert st["failures"] == 0 and st["preemptions"] == 1 and st["attempt"] == 2


def test_a_force_deleted_pod_kept_by_a_finalizer_is_announced_once():
    """No cluster (reconcile.decide): a pod of a lost node that a finalizer keeps after its force
    deletion (deletionGracePeriodSeconds 0) is deleted again at each pass, without an Event each
    time: the PodForceDeleted Event once repeated every second."""
    job, spec, (n0, n1), ready, now = observed_gang("kept")
    job["status"].update(attempt=2, gangCreated=False)  # a restart: attempt 1's pods are old
    del ready["spot-1"]  # n1's node is gone
    first = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n1], nodes=ready, service_exists=True,
                                                config_data=None, now=now))
    assert first.force_delete_pods == [n1["metadata"]["name"]] and [e[1] for e in first.events] == ["PodForceDeleted"]
    n1["metadata"].update(deletionTimestamp=reconcile.iso(now), deletionGracePeriodSeconds=0, finalizers=["example.com/keep"])
    again = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n1], nodes=ready, service_exists=True,
                                                config_data=None, now=now))
    assert again.force_delete_pods == [n1["metadata"]["name"]] and not again.events


def test_a_pod_on_a_node_that_says_it_is_not_ready_is_deleted_gracefully_and_forced_only_past_its_grace():
    """No cluster (reconcile.decide): a node not ready with its kubelet alive (shutting down, a
    blip) ends its pods itself, and the trainer saves on SIGTERM: forced at once, the save was lost.
    Forced once the grace period is over (a kubelet that cannot end it would block the next gang);
    a node gone dark (Ready Unknown) is forced at once."""
    job, spec, (n0, n1), nodes, now = observed_gang("shutdown")
    job["status"].update(attempt=2, gangCreated=False)  # a restart: attempt 1's pods are old
    nodes["spot-1"]["status"]["conditions"][0].update(status="False", reason="KubeletNotReady", message="node is shutting down")

    def remove(pods, at):
        return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                                   config_data=None, now=at))
    first = remove([n0, n1], now)
    assert sorted(first.delete_pods) == ["shutdown-a1-n0", "shutdown-a1-n1"] and not first.force_delete_pods
    assert not [e for e in first.events if e[1] == "PodForceDeleted"]
    n1["metadata"]["deletionTimestamp"] = reconcile.iso(now + dt.timedelta(seconds=30))  # the grace period's end
    waiting = remove([n1], now + dt.timedelta(seconds=29))
    assert not waiting.delete_pods and not waiting.force_delete_pods
    late = remove([n1], now + dt.timedelta(seconds=31))
    assert late.force_delete_pods == ["shutdown-a1-n1"]
    [msg] = [e[2] for e in late.events if e[1] == "PodForceDeleted"]
    assert "its kubelet did not end the pod within its grace period" in msg and "checkpoint fence" in msg
    nodes["spot-1"]["status"]["conditions"][0]["status"] = "Unknown"  # gone dark: no kubelet to wait for
    del n1["metadata"]["deletionTimestamp"]
    assert remove([n1], now).force_delete_pods == ["shutdown-a1-n1"]


@pytest.mark.parametrize("taint,outcome", [("cloud.google.com/impending-node-termination", ("Preemption", 1, 0)),
                                           ("aws-node-termination-handler/rebalance-recommendation", ("Failure", 0, 1))])
def test_a_crash_on_a_noticed_node_is_a_preemption_unless_the_notice_is_only_advisory(taint, outcome):
    # A rebalance recommendation (or a scale-down candidate) may stay on a node for hours: a trainer
    # crashing there again and again must spend its failure budget, not restart forever.
    job, spec, (n0, n1), nodes, now = observed_gang("crashy")
    job["spec"]["failurePolicy"]["failureSettleSeconds"] = 0
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    nodes["spot-1"]["spec"] = {"taints": [{"key": taint, "effect": "NoSchedule"}]}
    n1["status"] = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}
    plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n0, n1], nodes=nodes, service_exists=True,
                                               config_data=render.trainer_config(spec), now=now))
    kind, preemptions, failures = outcome
    assert plan.status["restart"]["kind"] == kind and plan.status["preemptions"] == preemptions and plan.status["failures"] == failures
    # Either notice asked for a checkpoint first (while the gang still ran).
    plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=[n0, observed_gang("crashy")[2][1]], nodes=nodes,
                                               service_exists=True, config_data=render.trainer_config(spec), now=now))
    assert plan.annotate_pods and plan.status["checkpointRequestedAt"].startswith("1@")


def test_a_noticed_node_that_goes_dark_is_a_preemption_at_once_even_when_a_peer_crashes():
    # The node controller's unreachable taint comes after the notice's: the notice was found first,
    # the dead node's pod (Running still: its kubelet is gone) was left to end on its own, and a
    # peer's crash meanwhile spent the failure budget on a spot reclaim.
    job, spec, (n0, n1), nodes, now = observed_gang("dark")
    job["spec"]["failurePolicy"]["failureSettleSeconds"] = 0
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    nodes["spot-1"]["spec"] = {"taints": [{"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"},
                                          {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]}
    nodes["spot-1"]["status"] = {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}

    def decide(*pods) -> dict:
        return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=list(pods), nodes=nodes, service_exists=True,
                                                   config_data=render.trainer_config(spec), now=now)).status
    # Shutting down gracefully first: its kubelet alive says not ready, its pods save on the notice.
    shutting = {"spec": {"taints": [nodes["spot-1"]["spec"]["taints"][0], {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]},
                "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}}
    dark = {k: nodes["spot-1"][k] for k in ("spec", "status")}
    nodes["spot-1"].update(shutting)
    st = decide(n0, n1)
    assert st["phase"] == "Running" and not st.get("restart") and st.get("checkpointRequestedAt"), st
    nodes["spot-1"].update(dark)
    st = decide(n0, n1)  # both Running
    assert st["restart"]["kind"] == "Preemption" and st["restart"]["reason"] == "NodeNotReady", st["restart"]
    assert "node spot-1 is unreachable" in st["restart"]["message"]
    n0["status"] = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}
    st = decide(n0, n1)  # its peer lost its rendezvous and crashed
    assert st["restart"]["kind"] == "Preemption" and st["preemptions"] == 1 and st["failures"] == 0, st["restart"]


def test_a_termination_notice_after_an_advisory_one_asks_for_a_checkpoint_again():
    # A rebalance recommendation asked for a checkpoint; hours later the real notice comes (on that
    # node or another): the request of hours ago does not save the steps since, so a new one. It
    # was once per attempt: the real notice got no request, no Event.
    job, spec, pods, ready, now = observed_gang("warned")

    def decide(at: dt.datetime) -> reconcile.Plan:
        plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=ready, service_exists=True,
                                                   config_data=render.trainer_config(spec), now=at))
        job["status"] = plan.status
        for name, ann in plan.annotate_pods.items():  # as the controller's patch would
            next(p for p in pods if p["metadata"]["name"] == name)["metadata"].setdefault("annotations", {}).update(ann)
        return plan
    ready["spot-0"]["spec"] = {"taints": [{"key": "aws-node-termination-handler/rebalance-recommendation", "effect": "NoSchedule"}]}
    plan = decide(now)
    assert plan.status["checkpointRequestedAt"] == f"1@{reconcile.iso(now)}/advisory" and len(plan.annotate_pods) == 2
    first = pods[0]["metadata"]["annotations"][c.ANN_CHECKPOINT_REQUEST]
    assert first == f"notice-1-{reconcile.iso(now)}" and [e[1] for e in plan.events] == ["TerminationNotice"]
    later = now + dt.timedelta(hours=6)
    plan = decide(later)  # still advisory only: nothing new
    assert not plan.annotate_pods and not plan.events
    ready["spot-1"]["spec"] = {"taints": [{"key": "aws-node-termination-handler/spot-itn", "effect": "NoSchedule"}]}
    plan = decide(later)
    assert plan.status["checkpointRequestedAt"] == f"1@{reconcile.iso(later)}" and len(plan.annotate_pods) == 2
    assert pods[1]["metadata"]["annotations"][c.ANN_CHECKPOINT_REQUEST] == f"notice-1-{reconcile.iso(later)}" != first
    assert [e[1] for e in plan.events] == ["TerminationNotice"] and "spot-itn" in plan.events[0][2]
    # Once asked on a termination notice, no more requests in this attempt (an advisory one now asks nothing).
    plan = decide(later + dt.timedelta(seconds=30))
    assert not plan.annotate_pods and not plan.events
    # A node with both taints, the advisory one first: the termination notice is the one said.
    both = [{"key": "aws-node-termination-handler/rebalance-recommendation", "effect": "NoSchedule"},
            {"key": "aws-node-termination-handler/spot-itn", "effect": "NoSchedule"}]
    assert classify.node_problem({"spec": {"taints": both}}, "n", spec.preemption.noticeTaints)[0] == "TerminationNotice"
