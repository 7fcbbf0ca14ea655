"""Pod helpers for tests against the local cluster (official Python client, dict manifests)."""

from __future__ import annotations

import copy
import subprocess

from kubernetes import client

from pretrain_localcluster import binaries
from tests.helpers import wait_for


def pod_security_labels(level: str = "restricted") -> dict:
    """The namespace labels that make the API server enforce a Pod Security level."""
    return {"pod-security.kubernetes.io/enforce": level, "pod-security.kubernetes.io/enforce-version": "latest"}


# Pod Security `restricted`, which the tests' namespaces enforce (conftest.namespace): what every
# pod and pod template of the tests carries unless it sets its own.
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                  "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def restricted(pod_spec: dict) -> dict:
    """The pod spec, with restricted-level security contexts where it sets none."""
    pod_spec.setdefault("securityContext", copy.deepcopy(RESTRICTED_POD))
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        c.setdefault("securityContext", copy.deepcopy(RESTRICTED_CONTAINER))
    return pod_spec


def pod_manifest(name: str, command: list[str], *, restart: str = "Never", node: str | None = None,
                 container: dict | None = None, init: list[dict] | None = None, **spec) -> dict:
    c = {"name": "main", "image": "local", "command": command}
    c.update(container or {})
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 5, "containers": [c], **spec}}
    if init:
        body["spec"]["initContainers"] = init
    if node:
        body["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    restricted(body["spec"])
    return body


def create_pod(core: client.CoreV1Api, ns: str, body: dict):
    return core.create_namespaced_pod(ns, body)


def phase(core, ns: str, name: str) -> str | None:
    try:
        return core.read_namespaced_pod(name, ns).status.phase
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_phase(core, ns: str, name: str, *phases: str, timeout: float = 60):
    wait_for(lambda: phase(core, ns, name) in phases, timeout=timeout, what=f"pod {name} to be {'/'.join(phases)}")
    return core.read_namespaced_pod(name, ns)


def wait_gone(core, ns: str, name: str, timeout: float = 60) -> None:
    wait_for(lambda: phase(core, ns, name) is None and not _exists(core, ns, name), timeout=timeout,
             what=f"pod {name} to be deleted")


def _exists(core, ns, name) -> bool:
    try:
        core.read_namespaced_pod(name, ns)
        return True
    except client.ApiException as e:
        return e.status != 404


def logs(core, ns: str, name: str, **kw) -> str:
    return core.read_namespaced_pod_log(name, ns, **kw)


def kubectl(cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = binaries.locate(["kubectl"])["kubectl"]
    return subprocess.run([str(exe), "--kubeconfig", str(cluster.cfg.kubeconfig), *args],
                          capture_output=True, text=True, timeout=timeout)
