"""Pod helpers for tests against the local cluster (official Python client, dict manifests)."""

from __future__ import annotations

import subprocess

from kubernetes import client

from pretrain_localcluster import binaries
from tests.helpers import wait_for


def pod_manifest(name: str, command: list[str], *, restart: str = "Never", node: str | None = None,
                 container: dict | None = None, **spec) -> dict:
    c = {"name": "main", "image": "local", "command": command}
    c.update(container or {})
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 5, "containers": [c], **spec}}
    if node:
        body["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
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
