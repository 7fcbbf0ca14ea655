"""Desired children of a PretrainJob, as pure functions of the job (no I/O).

Names are deterministic, which makes every create idempotent (a retried create gets 409):
Service `<job>` (headless, the pods' subdomain), ConfigMap `<job>-config`, and one pod per node
rank and attempt, `<job>-a<attempt>-n<rank>`, whose hostname `<job>-n<rank>` is stable across
attempts so rank 0's DNS name (the rendezvous endpoint) never changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath

import yaml

from . import api, contract as c


CONFIG_VOLUME, PODINFO_VOLUME, CHECKPOINT_VOLUME, SHM_VOLUME = api.RESERVED_VOLUMES


# The trainer's container securityContext, and the default of the job's init containers: the
# restricted Pod Security level's (a namespace enforcing it admits the pods).
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-a{attempt}-n{rank}"


def hostname(job: str, rank: int) -> str:
    return f"{job}-n{rank}"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def owner_ref(job: dict) -> dict:
    return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "name": job["metadata"]["name"],
            "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def labels(job: dict, attempt: int | None = None, rank: int | None = None) -> dict[str, str]:
    out = {c.LABEL_JOB: job["metadata"]["name"], c.LABEL_JOB_UID: job["metadata"]["uid"],
           "app.kubernetes.io/managed-by": "pretrain-operator"}
    if attempt is not None:
        out[c.LABEL_ATTEMPT] = str(attempt)
    if rank is not None:
        out[c.LABEL_NODE_RANK] = str(rank)
    return out


def service(job: dict) -> dict:
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": job["metadata"]["namespace"], "labels": labels(job),
                     "ownerReferences": [owner_ref(job)]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {c.LABEL_JOB_UID: job["metadata"]["uid"]},
                 "ports": [{"name": "rdzv", "port": c.RDZV_PORT}, {"name": "metrics", "port": c.METRICS_PORT}]},
    }


def trainer_config(spec: api.PretrainJobSpec) -> str:
    """The trainer's configuration: the spec itself, as YAML (read back with PretrainJobSpec), but
    for `elastic`, the operator's alone (an attempt's config holds its own node count and layout;
    a trainer image older than the field would refuse it)."""
    return yaml.safe_dump(spec.model_dump(by_alias=True, exclude_none=True, exclude={"elastic"}), sort_keys=True)


def config_map(job: dict, spec: api.PretrainJobSpec) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": config_map_name(job["metadata"]["name"]), "namespace": job["metadata"]["namespace"],
                     "labels": labels(job), "ownerReferences": [owner_ref(job)]},
        "data": {c.CONFIG_FILE: trainer_config(spec)},
    }


def default_command() -> list[str]:
    # torchrun (reading the PET_* variables) through the trainer's launcher, which keeps the
    # workers' contract exit codes (plain torchrun turns any worker failure into exit 1).
    return ["python", "-m", "pretrain_trainer", "launch", "train", "--config", c.CONFIG_PATH]


def rdzv_timeout(spec: api.PretrainJobSpec) -> int:
    return max(600, spec.scheduling.startTimeoutSeconds + 60)


def pod(job: dict, spec: api.PretrainJobSpec, attempt: int, rank: int) -> dict:
    name = job["metadata"]["name"]
    ns = job["metadata"]["namespace"]
    uid = job["metadata"]["uid"]
    env = [
        {"name": "PET_NNODES", "value": str(spec.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.nprocPerNode)},
        {"name": "PET_NODE_RANK", "value": str(rank)},
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ENDPOINT", "value": f"{hostname(name, 0)}.{name}:{c.RDZV_PORT}"},
        {"name": "PET_RDZV_ID", "value": f"{uid}-a{attempt}"},
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        # On the pod's SIGTERM torchrun's agent waits this long for the ranks' save (its default,
        # 30 s, killed saves that the grace period left time for); the kubelet's SIGKILL ends it anyway.
        {"name": "PET_SHUTDOWN_TIMEOUT", "value": str(spec.template.terminationGracePeriodSeconds)},
        {"name": c.ENV_CONFIG, "value": c.CONFIG_PATH},
        {"name": c.ENV_ATTEMPT, "value": str(attempt)},
        {"name": c.ENV_JOB_NAME, "value": name},
        {"name": c.ENV_JOB_UID, "value": uid},
        {"name": c.ENV_CHECKPOINT_DIR, "value": spec.checkpoint.path},
        {"name": c.ENV_METRICS_PORT, "value": str(c.METRICS_PORT)},
        {"name": c.ENV_PODINFO, "value": c.PODINFO_DIR},
        {"name": c.ENV_TERMINATION_MESSAGE, "value": c.TERMINATION_MESSAGE_PATH},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ] + ([] if any(e.name == "PET_RDZV_CONF" for e in spec.template.env) else [
        # A node waits for rank 0 (the rendezvous store's host) and for every node as long as the
        # operator waits for the gang, and a minute more, at least torch's 600 s: the operator's
        # start timeout decides a slow start, not torch (a node whose rank 0 was still pending or
        # pulling its image exited 1 after 60 s and a retry, a failure spent). read_timeout for
        # plain torchrun (a custom command); the trainer's launcher waits for the store itself.
        # template.env may set its own (other rendezvous options; a job from before this).
        {"name": "PET_RDZV_CONF", "value": f"join_timeout={rdzv_timeout(spec)},read_timeout={rdzv_timeout(spec)}"},
    ]) + [e.model_dump(exclude_none=True, exclude={"value"} if e.valueFrom else set()) for e in spec.template.env]
    ckpt_volume = ({"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": spec.checkpoint.claimName}}
                   if spec.checkpoint.claimName else {"name": CHECKPOINT_VOLUME, "emptyDir": {}})
    volumes = [
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(name)}},
        {"name": PODINFO_VOLUME, "downwardAPI": {"items": [
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        ckpt_volume,
    ] + list(spec.template.volumes)
    mounts = [
        {"name": CONFIG_VOLUME, "mountPath": c.CONFIG_DIR, "readOnly": True},
        {"name": PODINFO_VOLUME, "mountPath": c.PODINFO_DIR, "readOnly": True},
        {"name": CHECKPOINT_VOLUME, "mountPath": spec.checkpoint.path},
    ] + list(spec.template.volumeMounts)
    if not any(posixpath.normpath(m.get("mountPath", "")) == c.SHM_DIR for m in spec.template.volumeMounts):
        shm = {"medium": "Memory", **({"sizeLimit": spec.template.shmSize} if spec.template.shmSize else {})}
        volumes.append({"name": SHM_VOLUME, "emptyDir": shm})
        mounts.append({"name": SHM_VOLUME, "mountPath": c.SHM_DIR})
    resources = {k: v for k, v in (("requests", spec.resources.requests), ("limits", spec.resources.limits)) if v}
    # An extended resource (nvidia.com/gpu, vpc.amazonaws.com/efa) cannot be overcommitted: the pod
    # API refuses a request without its limit. Requested alone, its limit is the request.
    extended = {k: v for k, v in spec.resources.requests.items() if is_extended(k) and k not in spec.resources.limits}
    if extended:
        resources["limits"] = {**spec.resources.limits, **extended}
    sched = spec.scheduling
    # The user's first: the CRD refuses the operator's own keys there, and ours win regardless.
    pod_labels = {**spec.template.labels, **labels(job, attempt, rank)}
    annotations = dict(spec.template.annotations)
    if sched.queueName:
        # Kueue's plain-pod groups: the attempt's pods are one workload, admitted all together or
        # not at all (without a group, Kueue admits each pod on its own: no gang). A new attempt
        # is a new group; the job's uid keeps the name unique and within a label's 63 characters.
        pod_labels["kueue.x-k8s.io/queue-name"] = sched.queueName
        pod_labels["kueue.x-k8s.io/pod-group-name"] = f"{job['metadata']['uid']}-a{attempt}"
        annotations["kueue.x-k8s.io/pod-group-total-count"] = str(spec.nodes)
    pod_spec: dict = {
        "hostname": hostname(name, rank),
        "subdomain": name,
        "restartPolicy": "Never",
        # No API token unless the job names a ServiceAccount of its own; then that account's
        # automountServiceAccountToken decides (a cloud's workload identity may need it).
        **({"serviceAccountName": spec.template.serviceAccountName} if spec.template.serviceAccountName
           else {"automountServiceAccountToken": False}),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.template.terminationGracePeriodSeconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": c.TRAINER_CONTAINER,
            "image": spec.image,
            "command": list(spec.template.command) or default_command(),
            "env": env,
            **({"envFrom": [e.model_dump(exclude_defaults=True) for e in spec.template.envFrom]} if spec.template.envFrom else {}),
            "ports": [{"name": "rdzv", "containerPort": c.RDZV_PORT}, {"name": "metrics", "containerPort": c.METRICS_PORT}],
            "volumeMounts": mounts,
            "resources": resources,
            # Rank 0's final report; a crash without one leaves its log's last lines there instead.
            "terminationMessagePath": c.TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        }],
        "volumes": volumes,
    }
    if spec.template.initContainers:
        pod_spec["initContainers"] = [init_container(i) for i in spec.template.initContainers]
    if spec.template.imagePullSecrets:
        pod_spec["imagePullSecrets"] = [r.model_dump() for r in spec.template.imagePullSecrets]
    if sched.nodeSelector:
        pod_spec["nodeSelector"] = dict(sched.nodeSelector)
    if sched.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in sched.tolerations]
    if sched.affinity:
        pod_spec["affinity"] = sched.affinity
    if sched.priorityClassName:
        pod_spec["priorityClassName"] = sched.priorityClassName
    if sched.schedulerName:
        pod_spec["schedulerName"] = sched.schedulerName
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name(name, attempt, rank), "namespace": ns, "labels": pod_labels,
                     "annotations": annotations, "ownerReferences": [owner_ref(job)]},
        "spec": pod_spec,
    }


def is_extended(resource: str) -> bool:
    """An extended resource: a name with a domain other than kubernetes.io's (not cpu, memory,
    ephemeral-storage, hugepages-*)."""
    domain = resource.split("/", 1)[0] if "/" in resource else ""
    return bool(domain) and domain != "kubernetes.io" and not domain.endswith(".kubernetes.io")


def init_container(i: api.InitContainer) -> dict:
    """The job's init container with the trainer's securityContext under the keys it leaves out
    (not runAsNonRoot when it asks for root: the kubelet would refuse to start it, and the gang
    would wait out its start timeout)."""
    own = i.model_extra.get("securityContext") or {}
    sec = {**copy.deepcopy(CONTAINER_SECURITY), **own}
    if own.get("runAsUser") == 0 and "runAsNonRoot" not in own:
        del sec["runAsNonRoot"]
    return {**i.model_dump(), "securityContext": sec}


def probe_name(job: str, attempt: int, index: int) -> str:
    return f"{job}-a{attempt}-p{index}"


def probe_digest(probe: dict) -> str:
    """What a probe was made from (its annotation ANN_PROBE_SPEC): a probe of an older spec (a request
    or node selector changed since) is made again."""
    return (probe["metadata"].get("annotations") or {}).get(c.ANN_PROBE_SPEC, "")


def probe(job: dict, spec: api.PretrainJobSpec, attempt: int, index: int, image: str) -> dict:
    """A capacity probe of a shrunk attempt (elastic.py): a pod that asks the scheduler for room for
    one more of the gang's pods, and holds it while it runs a pause container that does nothing.
    It has the trainer pod's resources (its init containers' too: each is mirrored by a pause one,
    which never ends, so the probe never leaves Init; its room is counted all the same), node
    selector, tolerations, affinity, priority, scheduler, labels and persistent volume claims
    (zonal claims bind where they can be attached); no command, environment, hostname, API token or
    Kueue labels (its room is not the queue's to grant: regrows of jobs in a queue do not probe)."""
    rank = pod(job, spec, attempt, 0)
    ps, trainer = rank["spec"], rank["spec"]["containers"][0]
    keep = ("serviceAccountName", "enableServiceLinks", "securityContext", "imagePullSecrets",
            "nodeSelector", "tolerations", "affinity", "priorityClassName", "schedulerName")

    def pause(name: str, of: dict) -> dict:
        return {"name": name, "image": image, "resources": of.get("resources") or {},
                **({"restartPolicy": of["restartPolicy"]} if of.get("restartPolicy") else {}),
                "securityContext": copy.deepcopy(CONTAINER_SECURITY)}
    body = {**{k: ps[k] for k in keep if k in ps}, "automountServiceAccountToken": False, "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            **({"initContainers": [pause(i["name"], i) for i in ps["initContainers"]]} if ps.get("initContainers") else {}),
            "containers": [pause("probe", trainer)],
            "volumes": [v for v in ps["volumes"] if "persistentVolumeClaim" in v]}
    pod_labels = {**spec.template.labels, **labels(job), c.LABEL_PROBE: str(attempt)}
    annotations = dict(spec.template.annotations)
    digest = hashlib.sha256(json.dumps([pod_labels, annotations, body], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": probe_name(job["metadata"]["name"], attempt, index), "namespace": rank["metadata"]["namespace"],
                     "labels": pod_labels, "annotations": {**annotations, c.ANN_PROBE_SPEC: digest},
                     "ownerReferences": [owner_ref(job)]},
        "spec": body,
    }


def gang(job: dict, spec: api.PretrainJobSpec, attempt: int) -> list[dict]:
    return [pod(job, spec, attempt, r) for r in range(spec.nodes)]
