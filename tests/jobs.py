"""PretrainJob helpers for the operator's tests."""

from __future__ import annotations

import copy
from pathlib import Path

from kubernetes import client

from pretrain_operator import api
from tests.helpers import wait_for
from tests.operator_fixture import STANDIN


def job_manifest(name: str, *, nodes: int = 2, steps: int = 30, interval: int = 5, step_s: float = 0.2,
                 fail: str = "", pool: str | None = None, **spec) -> dict:
    body = {
        "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name},
        "spec": {
            "nodes": nodes, "parallelism": {"data": nodes}, "data": {"globalBatchSize": 8 * nodes},
            "training": {"steps": steps}, "checkpoint": {"intervalSteps": interval},
            "failurePolicy": {"failureSettleSeconds": 1}, "optimizer": {"warmupSteps": 0},
            "template": {"command": ["python", STANDIN], "terminationGracePeriodSeconds": 5,
                         "env": [{"name": "STANDIN_STEP_SECONDS", "value": str(step_s)}] +
                                ([{"name": "STANDIN_FAIL", "value": fail}] if fail else [])},
        },
    }
    if pool:
        body["spec"]["scheduling"] = {"nodeSelector": {"pretrain.dev/test-pool": pool}}
    for k, v in spec.items():
        if isinstance(v, dict) and isinstance(body["spec"].get(k), dict):
            body["spec"][k] = {**body["spec"][k], **v}
        else:
            body["spec"][k] = copy.deepcopy(v)
    return body


def observed_gang(name: str, *, steps: int = 400, now=None):
    """For reconcile.decide without a cluster: a Running job of attempt 1 and its 2-pod gang,
    running and ready on nodes spot-0 and spot-1. Returns (job, spec, pods, nodes, now)."""
    import datetime as dt

    from pretrain_operator import reconcile, render
    now = now or dt.datetime.now(dt.timezone.utc)
    t = reconcile.iso(now - dt.timedelta(seconds=30))
    job = job_manifest(name, steps=steps)
    job["metadata"].update(namespace="ns", uid="u1", generation=1)
    job["status"] = {"phase": "Running", "attempt": 1, "gangCreated": True, "failures": 0, "preemptions": 0,
                     "startTime": t, "attemptStartTime": t, "readyNodes": "2/2", "observedGeneration": 1}
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    pods = render.gang(job, spec, 1)
    for i, p in enumerate(pods):
        p["spec"]["nodeName"] = f"spot-{i}"
        p["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "trainer", "ready": True, "state": {"running": {"startedAt": t}}}]}
    ready = {f"spot-{i}": {"metadata": {"name": f"spot-{i}"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
             for i in range(len(pods))}
    return job, spec, pods, ready, now


class Jobs:
    def __init__(self, api_client: client.ApiClient, namespace: str):
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ns = namespace

    def create(self, body: dict, claim: bool = True) -> dict:
        """Create the job; with `claim`, first a PVC for its checkpoints (emptyDirs die with the pods)."""
        if claim and not (body["spec"].get("checkpoint") or {}).get("claimName"):
            name = body["metadata"]["name"] + "-ckpt"
            self.core.create_namespaced_persistent_volume_claim(self.ns, {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
            body = copy.deepcopy(body)
            body["spec"].setdefault("checkpoint", {})["claimName"] = name
        return self.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, body)

    def get(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def patch(self, name: str, body: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, name, body)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, name)

    def wait(self, name: str, pred, timeout: float = 90, what: str = "") -> dict:
        last = {}

        def check():
            st = last["st"] = self.status(name)
            return st if st and pred(st) else None
        try:
            return wait_for(check, timeout=timeout, what=what or f"job {name}")
        except AssertionError as e:
            st = last.get("st") or {}
            brief = {k: st.get(k) for k in ("phase", "attempt", "failures", "preemptions", "restart", "message")}
            pods = [(p.metadata.name, p.status.phase, p.spec.node_name) for p in self.pods(name, live=False)]
            raise AssertionError(f"{e}; status: {brief}; pods: {pods}") from None

    def wait_phase(self, name: str, *phases: str, timeout: float = 90, **at_least) -> dict:
        def ok(st):
            return st.get("phase") in phases and all(st.get(k, 0) >= v for k, v in at_least.items())
        return self.wait(name, ok, timeout, f"job {name} to be {'/'.join(phases)} with {at_least or ''}")

    def pods(self, name: str, attempt: int | None = None, live: bool = True) -> list:
        sel = f"pretrain.dev/job={name}" + (f",pretrain.dev/attempt={attempt}" if attempt is not None else "")
        pods = self.core.list_namespaced_pod(self.ns, label_selector=sel).items
        return [p for p in pods if not (live and p.metadata.deletion_timestamp)]

    def claim_folder(self, claim: str, timeout: float = 30) -> Path:
        """The host folder behind a bound claim (the local cluster's provisioner uses hostPath PVs)."""
        pv = wait_for(lambda: self.core.read_namespaced_persistent_volume_claim(claim, self.ns).spec.volume_name,
                      timeout=timeout, what=f"claim {claim} bound")
        return Path(self.core.read_persistent_volume(pv).spec.host_path.path)

    def logs(self, pod: str) -> str:
        return self.core.read_namespaced_pod_log(pod, self.ns)

    def events(self, name: str) -> list:
        return [e for e in self.core.list_namespaced_event(self.ns).items if e.involved_object.name == name]

    def wait_events(self, name: str, *reasons: str, timeout: float = 20) -> list[str]:
        """The job's event reasons once all of `reasons` are among them. The operator emits Events
        after it writes status, so a test that has just seen a phase must wait for its Event."""
        def seen():
            got = [e.reason for e in self.events(name)]
            return got if set(reasons) <= set(got) else None
        return wait_for(seen, timeout=timeout, what=f"events {reasons} of job {name}")

    def resumed_step(self, name: str, attempt: int) -> int:
        """The step the attempt's rank 0 resumed from (the stand-in trainer logs it at start)."""
        pod = f"{name}-a{attempt}-n0"

        def line():
            if not any(p.metadata.name == pod for p in self.pods(name, live=False)):
                return None
            try:
                return next((ln for ln in self.logs(pod).splitlines() if "resuming at step" in ln), None)
            except client.ApiException:
                return None
        return int(wait_for(line, what=f"{pod} to start").split("resuming at step")[1].split()[0])
