"""Process nodes and spot drills: which nodes exist (`<state>/nodes.json`), starting the node
agent, and taking capacity away the way clouds do.

    hack/local-cluster up --nodes 4 --spot 2
    hack/local-cluster preempt spot-0 --notice 5 [--notice-taint aws|gke|karpenter]
    hack/local-cluster fail-node ondemand-1      # no notice: heartbeats stop, processes die
    hack/local-cluster kubelet-down ondemand-1   # the kubelet dies, the pods' processes run on
    hack/local-cluster add-node [--spot]

The same functions are the pytest helpers (`tests/` import them)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .kube import Kube, KubeError
from .procs import owned

# Termination-notice taints, as the real handlers put them on a node about to be reclaimed.
NOTICE_TAINTS = {
    "aws": {"key": "aws-node-termination-handler/spot-itn", "value": "spot-itn", "effect": "NoSchedule"},
    "gke": {"key": "cloud.google.com/impending-node-termination", "value": "true", "effect": "NoSchedule"},
    "karpenter": {"key": "karpenter.sh/disrupted", "value": "", "effect": "NoSchedule"},
}


class DrillError(RuntimeError):
    pass


def parse_taint(s: str) -> dict:
    """`key=value:Effect` or `key:Effect`."""
    kv, _, effect = s.rpartition(":")
    if not kv or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise DrillError(f"bad taint {s!r}: want key=value:NoSchedule|PreferNoSchedule|NoExecute")
    key, _, value = kv.partition("=")
    return {"key": key, "value": value, "effect": effect}


def initial_nodes(count: int, spot: int, cpu: str, memory: str, gpus: int, spot_taints: list[str]) -> list[dict]:
    if spot > count:
        raise DrillError(f"--spot {spot} is more than --nodes {count}")
    out = []
    for i in range(count - spot):
        out.append({"name": f"ondemand-{i}", "spot": False, "cpu": cpu, "memory": memory, "gpus": gpus, "status": "active"})
    for i in range(spot):
        out.append({"name": f"spot-{i}", "spot": True, "cpu": cpu, "memory": memory, "gpus": gpus, "status": "active",
                    "taints": [parse_taint(t) for t in spot_taints]})
    return out


@contextmanager
def _locked_nodes(state_dir: Path):
    """Read-modify-write of nodes.json under a lock; written atomically; the agent is told (SIGHUP)."""
    path = state_dir / "nodes.json"
    with open(state_dir / "nodes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        nodes = json.loads(path.read_text()) if path.exists() else []
        yield nodes
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(nodes, indent=2))
        os.replace(tmp, path)
    pid_file = state_dir / "pids" / "node-agent.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if pid and owned(pid, str(state_dir)):  # SIGHUP ends any process without a handler: only ours
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pass


def admin_kube(state_dir: Path) -> Kube:
    st = json.loads((state_dir / "cluster.json").read_text())
    pki = state_dir / "pki"
    return Kube(st["server"], str(pki / "ca.crt"), str(pki / "admin.crt"), str(pki / "admin.key"))


def node_ready(obj: dict) -> bool:
    """A Node object's Ready condition is True."""
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def wait_nodes_ready(kube: Kube, names: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for n in list(pending):
            obj = kube.get_or_none(f"/api/v1/nodes/{n}")
            if obj and obj["spec"].get("podCIDR") and node_ready(obj):
                pending.discard(n)
        time.sleep(0.1)
    if pending:
        raise DrillError(f"nodes not Ready after {timeout:.0f} s: {sorted(pending)}")


def start_agent(cluster, state: dict, log=print) -> None:
    """Write nodes.json from the config and start the node agent; wait until the nodes are Ready."""
    n = cluster.cfg.nodes
    nodes = initial_nodes(n.count, n.spot, n.cpu, n.memory, n.gpus, n.spot_taints)
    (cluster.state_dir / "nodes.json").write_text(json.dumps(nodes, indent=2))
    cluster.procs.start("node-agent", [sys.executable, "-m", "pretrain_localcluster.agent", str(cluster.state_dir)])
    deadline = time.monotonic() + 30
    while not (cluster.state_dir / "agent.ready").exists():
        if not cluster.procs.running().get("node-agent"):
            raise DrillError(f"the node agent exited during start-up:\n{cluster.log_tail('node-agent')}")
        if time.monotonic() > deadline:
            raise DrillError(f"the node agent did not start in 30 s:\n{cluster.log_tail('node-agent')}")
        time.sleep(0.05)
    # Generous: on a loaded 2-core machine the first node status and podCIDR can take a while.
    wait_nodes_ready(admin_kube(cluster.state_dir), [x["name"] for x in nodes], timeout=120)
    log(f"{len(nodes)} process node(s) Ready: " + ", ".join(
        f"{x['name']} ({'spot' if x['spot'] else 'on-demand'})" for x in nodes))


def add_node(state_dir: Path, spot: bool = False, taints: list[str] | None = None, wait: bool = True,
             labels: dict[str, str] | None = None) -> str:
    with _locked_nodes(state_dir) as nodes:
        prefix = "spot" if spot else "ondemand"
        used = {n["name"] for n in nodes}
        i = 0
        while f"{prefix}-{i}" in used:
            i += 1
        template = next((n for n in nodes if n.get("spot") == spot), nodes[0] if nodes else {})
        name = f"{prefix}-{i}"
        nodes.append({"name": name, "spot": spot, "cpu": template.get("cpu", "8"), "memory": template.get("memory", "16Gi"),
                      "gpus": template.get("gpus", 0), "status": "active",
                      "taints": [parse_taint(t) for t in taints or []], "labels": labels or {}})
    if wait:
        wait_nodes_ready(admin_kube(state_dir), [name])
    return name


def top_up(state_dir: Path, count: int, spot: int, spot_taints: list[str] | None = None, log=print) -> list[str]:
    """Add nodes until `count` are active, `spot` of them spot (with `spot_taints`, as at start):
    a reclaim takes a node away for good, as a cloud does, and a cluster autoscaler would bring a
    new one. Returns the nodes added."""
    path = state_dir / "nodes.json"
    active = [n for n in (json.loads(path.read_text()) if path.exists() else []) if n.get("status") == "active"]
    have_spot = sum(1 for n in active if n.get("spot"))
    added = [add_node(state_dir, spot=True, taints=spot_taints) for _ in range(spot - have_spot)]
    added += [add_node(state_dir) for _ in range((count - spot) - (len(active) - have_spot))]
    if added:
        log(f"{len(added)} node(s) added, back to {count} ({spot} spot): {', '.join(added)}")
    return added


def _set_status(state_dir: Path, node: str, status: str) -> None:
    with _locked_nodes(state_dir) as nodes:
        entry = next((n for n in nodes if n["name"] == node), None)
        if entry is None:
            raise DrillError(f"no process node named {node} (have: {', '.join(n['name'] for n in nodes)})")
        entry["status"] = status


def fail_node(state_dir: Path, node: str) -> None:
    """No notice: heartbeats stop and every process of the node's pods dies. The node-lifecycle
    controller marks the Node NotReady after --node-monitor-grace-period (8 s here)."""
    _set_status(state_dir, node, "failed")


def kubelet_down(state_dir: Path, node: str) -> None:
    """The node's kubelet dies, its containers do not: heartbeats and pod status stop, the pods'
    processes run on, and nothing on the node reacts to the API any more (a pod deleted there, even
    with grace period 0, keeps running). NotReady after 8 s, as `fail_node`. `remove_node` ends it."""
    _set_status(state_dir, node, "kubelet-down")


def remove_node(state_dir: Path, node: str) -> None:
    """Take a node away for good (the end of a reclaim, a test's own node at teardown): its agent stops beating and kills
    what still runs there, then the Node object goes (if a drill has not deleted it already).
    Deleting only the Node object leaves the agent renewing a lease for it, two requests every 2 s."""
    _set_status(state_dir, node, "terminated")
    time.sleep(0.3)  # let the agent kill what is left before the Node object goes
    admin_kube(state_dir).delete(f"/api/v1/nodes/{node}")


def pods_on(kube: Kube, node: str) -> list[dict]:
    return kube.get("/api/v1/pods", fieldSelector=f"spec.nodeName={node}")["items"]


def preempt(state_dir: Path, node: str, notice_s: float = 5.0, taint: str = "aws", drain_timeout_s: float = 5.0,
            log=print) -> list[str]:
    """A spot reclaim: notice taint, wait the notice, evict the pods (DisruptionTarget), kill what
    is left, delete the Node. Returns the names of the pods that were on the node."""
    kube = admin_kube(state_dir)
    obj = kube.get_or_none(f"/api/v1/nodes/{node}")
    if obj is None:
        raise DrillError(f"no Node {node}")
    taints = [t for t in obj["spec"].get("taints") or [] if t["key"] != NOTICE_TAINTS[taint]["key"]]
    kube.patch(f"/api/v1/nodes/{node}", {"spec": {"taints": taints + [NOTICE_TAINTS[taint]]}}, strategic=False)
    log(f"{node}: termination notice ({NOTICE_TAINTS[taint]['key']}), reclaimed in {notice_s:g} s")
    time.sleep(notice_s)
    pods = pods_on(kube, node)
    for p in pods:
        ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
        try:
            kube.create(f"/api/v1/namespaces/{ns}/pods/{name}/eviction", {
                "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}})
        except KubeError as e:
            # 429: a PodDisruptionBudget refuses; the cloud does not wait for it.
            if e.status not in (404, 429):
                raise
    deadline = time.monotonic() + drain_timeout_s
    while pods_on(kube, node) and time.monotonic() < deadline:
        time.sleep(0.1)
    remove_node(state_dir, node)
    log(f"{node}: reclaimed; evicted {len(pods)} pod(s), Node deleted")
    return [p["metadata"]["name"] for p in pods]
