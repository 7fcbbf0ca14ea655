"""Spot drills take capacity away as clouds do: a preemption with a termination notice (pods
evicted with a DisruptionTarget condition, the Node deleted), a node failure without notice (the
Node goes NotReady), a node whose kubelet died (NotReady, its pods' processes running on),
`kubectl drain`, capacity added back; and a restarted node agent adopts the pods it left running.
Each drill runs on a node it adds, so the other tests keep their capacity."""

from __future__ import annotations

import os
import sys
import time

import pytest
from kubernetes import client

from pretrain_localcluster import nodes
from tests.helpers import wait_for
from tests.kubeutil import create_pod, kubectl, logs, phase, pod_manifest, wait_phase


WAIT_TERM = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: (print('SIGTERM', flush=True), sys.exit(143)))\n"
             "print('up', flush=True)\nwhile True: time.sleep(0.1)\n")


@pytest.fixture
def fresh_node(cluster):
    """A node of its own for a destructive drill; removed afterwards whatever happened to it."""
    name = nodes.add_node(cluster.state_dir, spot=True)
    yield name
    nodes.remove_node(cluster.state_dir, name)


def _node_ready(core, name: str) -> str | None:
    try:
        n = core.read_node(name)
    except client.ApiException:
        return None
    return next((c.status for c in n.status.conditions or [] if c.type == "Ready"), None)


def test_a_preempted_nodes_pods_carry_disruption_target_and_the_node_is_gone(cluster, core, namespace, fresh_node):
    create_pod(core, namespace, pod_manifest("victim", ["python", "-c", WAIT_TERM], node=fresh_node))
    wait_phase(core, namespace, "victim", "Running")
    seen = {}

    def disrupted():
        try:
            p = core.read_namespaced_pod("victim", namespace)
        except client.ApiException:
            return "victim" in seen
        for c in p.status.conditions or []:
            if c.type == "DisruptionTarget" and c.status == "True":
                seen["victim"] = c.reason
        return False

    import threading
    t = threading.Thread(target=lambda: nodes.preempt(cluster.state_dir, fresh_node, notice_s=1.0, log=lambda *_: None))
    t.start()
    # During the notice the node carries the termination taint.
    wait_for(lambda: any(x.key == "aws-node-termination-handler/spot-itn" for x in (core.read_node(fresh_node).spec.taints or [])),
             timeout=10, interval=0.05, what="the notice taint")
    wait_for(disrupted, timeout=30, interval=0.05, what="the pod's DisruptionTarget condition and deletion")
    t.join(timeout=30)
    assert seen["victim"] == "EvictionByEvictionAPI"
    wait_for(lambda: _node_ready(core, fresh_node) is None, timeout=10, what="the Node to be deleted")


def test_a_failed_node_goes_not_ready(cluster, core, namespace, fresh_node):
    create_pod(core, namespace, pod_manifest("doomed", ["python", "-c", WAIT_TERM], node=fresh_node))
    pod = wait_phase(core, namespace, "doomed", "Running")
    nodes.fail_node(cluster.state_dir, fresh_node)
    # Killed without notice: nothing is left in the pod's network namespace.
    wait_for(lambda: not os.path.exists(f"/var/run/netns/ptp-{pod.metadata.uid.replace('-', '')[:12]}"),
             timeout=10, what="the pod's processes and namespace to be gone")
    wait_for(lambda: _node_ready(core, fresh_node) == "Unknown", timeout=30, what="the node to go NotReady")
    # The node-lifecycle controller marks the pod not ready and taints the node.
    wait_for(lambda: any(t.key == "node.kubernetes.io/unreachable" for t in core.read_node(fresh_node).spec.taints or []),
             timeout=20, what="the unreachable taint")


TICK = "import time\nwhile True: print('tick', flush=True); time.sleep(0.1)\n"


def test_a_node_whose_kubelet_died_goes_not_ready_and_its_pods_processes_run_on_until_it_is_removed(cluster, core, namespace,
                                                                                                  fresh_node):
    create_pod(core, namespace, pod_manifest("unwatched", ["python", "-c", TICK], node=fresh_node))
    pod = wait_phase(core, namespace, "unwatched", "Running")
    logs = cluster.state_dir / "pods" / pod.metadata.uid / "logs"

    def ticks() -> int:
        return sum(p.read_text().count("tick") for p in logs.glob("*/*") if p.is_file())

    nodes.kubelet_down(cluster.state_dir, fresh_node)
    wait_for(lambda: _node_ready(core, fresh_node) == "Unknown", timeout=30, what="the node to go NotReady")
    # Even force-deleted (what the operator does to pods of a lost node), its process runs on.
    core.delete_namespaced_pod("unwatched", namespace, grace_period_seconds=0)
    wait_for(lambda: phase(core, namespace, "unwatched") is None, timeout=10, what="the pod object to be gone")
    before = ticks()
    wait_for(lambda: ticks() >= before + 10, timeout=10, what="the process to go on printing")
    nodes.remove_node(cluster.state_dir, fresh_node)  # the node goes for good: now it is killed
    wait_for(lambda: not os.path.exists(f"/var/run/netns/ptp-{pod.metadata.uid.replace('-', '')[:12]}"),
             timeout=10, what="the pod's processes and namespace to be gone")


def test_kubectl_drain_evicts_the_pods_of_a_node(cluster, core, namespace, fresh_node):
    create_pod(core, namespace, pod_manifest("drained", ["python", "-c", WAIT_TERM], node=fresh_node))
    wait_phase(core, namespace, "drained", "Running")
    r = kubectl(cluster, "drain", fresh_node, "--ignore-daemonsets", "--force", "--timeout=60s", timeout=90)
    assert r.returncode == 0, r.stderr
    assert "evicted" in r.stdout
    assert core.read_node(fresh_node).spec.unschedulable is True
    assert phase(core, namespace, "drained") is None


def test_add_node_brings_spot_capacity_back(cluster, core):
    name = nodes.add_node(cluster.state_dir, spot=True)
    try:
        n = core.read_node(name)
        assert n.metadata.labels["karpenter.sh/capacity-type"] == "spot"
        assert n.metadata.labels["cloud.google.com/gke-spot"] == "true"
        assert n.spec.pod_cidr
        assert _node_ready(core, name) == "True"
    finally:
        nodes.remove_node(cluster.state_dir, name)


def test_a_restarted_node_agent_adopts_the_pods_it_left_running(cluster, core, namespace):
    create_pod(core, namespace, pod_manifest("survivor", ["python", "-c", WAIT_TERM]))
    before = wait_phase(core, namespace, "survivor", "Running")
    wait_for(lambda: "up" in logs(core, namespace, "survivor"), what="the pod to start")
    cluster.procs.stop("node-agent")
    (cluster.state_dir / "agent.ready").unlink(missing_ok=True)
    cluster.procs.start("node-agent", [sys.executable, "-m", "pretrain_localcluster.agent", str(cluster.state_dir)])
    wait_for(lambda: (cluster.state_dir / "agent.ready").exists(), what="the agent to restart")
    time.sleep(1.5)
    after = core.read_namespaced_pod("survivor", namespace)
    assert after.status.phase == "Running"
    assert after.status.container_statuses[0].restart_count == 0
    assert after.status.container_statuses[0].container_id == before.status.container_statuses[0].container_id
    # Adopted, not orphaned: deleting the pod still delivers SIGTERM through the new agent. The
    # process ends only on SIGTERM, so the pod is gone well before its 60 s grace period's SIGKILL,
    # and its processes and network namespace with it.
    core.delete_namespaced_pod("survivor", namespace, grace_period_seconds=60)
    wait_for(lambda: phase(core, namespace, "survivor") is None, timeout=20, what="the pod to end on SIGTERM")
    # The agent deletes the pod object, then tears its sandbox down.
    wait_for(lambda: not os.path.exists(f"/var/run/netns/ptp-{after.metadata.uid.replace('-', '')[:12]}"),
             timeout=10, what="the pod's network namespace to be gone")


def test_a_live_node_marked_not_ready_is_ready_again_within_a_status_check(core, fresh_node):
    # What the node lifecycle controller writes when a heartbeat comes late (a stalled machine). The
    # agent, like a kubelet, posts a status that differs from the node's at its next check (10 s),
    # not only at its once-a-minute report: a node must not stay NotReady for a minute after a stall.
    time.sleep(2 * 2.0)  # past the agent's first beat of the new node, which posts its status
    core.patch_node_status(fresh_node, {"status": {"conditions": [
        {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown", "message": "Kubelet stopped posting node status."}]}})
    assert _node_ready(core, fresh_node) == "Unknown"
    wait_for(lambda: _node_ready(core, fresh_node) == "True", timeout=20, interval=0.2, what="the node to be Ready again")
