"""The TorchX scheduler `pretrainjob`: `torchx run -s pretrainjob ...` submits a PretrainJob.

    pip install -e '.[torchx]'
    torchx run -s pretrainjob -cfg namespace=team-a,checkpoint_claim=ckpt \\
        pretrain_trainer.components:pretrain --nodes 2 --nproc_per_node 8 --preset llama3-1b --steps 1000
    torchx status pretrainjob://torchx/team-a:pretrain-1a2b3c
    torchx log -t pretrainjob://torchx/team-a:pretrain-1a2b3c/trainer/0
    torchx cancel pretrainjob://torchx/team-a:pretrain-1a2b3c

Registered under the `torchx.schedulers` entry point (pyproject.toml); docs/torchx.md is the
user's guide. Reads the kubeconfig ($KUBECONFIG, else ~/.kube/config) or the in-cluster config.

How an AppDef becomes a PretrainJob (`app_to_job`, pure; the spec is built with the typed API
models of `pretrain_operator.api`, and by default the API server dry-runs the create, so the CRD's schema and
CEL rules judge it exactly as they judge `kubectl apply`):
- exactly one role; its `num_replicas` pods are the gang's `nodes`; a `min_replicas` below it (TorchX's
  elastic `-j MIN:MAX`) is `elastic.minNodes`: the gang may run on fewer when capacity is short;
- the role's `metadata["pretrainjob"]` is a partial PretrainJobSpec (camelCase, as in the CRD):
  nprocPerNode, parallelism, model, data, ... (the `pretrain` component fills it); parallelism
  defaults to pure data parallelism over nodes x nprocPerNode;
- `entrypoint` + `args`: the trainer's own command leaves `template.command` empty (the operator's
  default); anything else becomes `template.command`, run in every pod with torchrun's PET_*
  variables (docs/trainer-contract.md);
- `env` -> `template.env`; `image` (or the `image` run option) -> `image`;
- `resource`: cpu and memMB become requests (memory also the limit), gpu and `devices` requests
  and limits, string `capabilities` the node selector;
- one volume mount (`type=volume,src=CLAIM,dst=PATH`) -> the checkpoint claim and path;
- `max_retries` (when > 0, unless the `max_failures` run option is set) -> failurePolicy.maxFailures;
- the macros `${app_id}` (the TorchX app id, `<namespace>:<job name>`) and `${img_root}` (empty)
  are substituted.
Refused, with a message naming the feature: the trainer on several nodes without a checkpoint
claim (its checkpoint folders are shared by every pod), several roles, `min_replicas` above `num_replicas`,
a retry policy other than APPLICATION (a PretrainJob
restarts the whole gang), `port_map`, bind and device mounts, more than one volume mount, a role
workspace, `${replica_id}` and `${rank0_env}` (one pod template serves every rank: read
PET_NODE_RANK and PET_RDZV_ENDPOINT instead), environment names of the operator's contract, role
metadata for other schedulers, and app-level metadata.

App ids are `<namespace>:<job name>`; the job's name is the app's name (a DNS-1035 label, cut to
33 characters) plus a random 6-character suffix. Limits: `log_iter` reads the combined stream only
(Kubernetes keeps one), and `until` needs the API server's timestamps (requested when set).
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml
from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream, StructuredOpts, filter_regex
from torchx.specs import (NULL_RESOURCE, AppDef, AppDryRunInfo, AppState, BindMount, CfgVal, DeviceMount,
                          ReplicaState, ReplicaStatus, RetryPolicy, Role, RoleStatus, runopts)
from torchx.specs.finder import ComponentValidationException

from pretrain_operator import api, contract as c, render
from pretrain_operator.kubeapi import api_message

BACKEND = "pretrainjob"
METADATA_KEY = "pretrainjob"
LABEL_APP_NAME = "torchx.pytorch.org/app-name"
LABEL_ROLE_NAME = "torchx.pytorch.org/role-name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# Taints that well-known clouds put on spot capacity (the `spot` run option tolerates them).
SPOT_TAINTS = ["cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority",
               "eks.amazonaws.com/capacityType", "karpenter.sh/capacity-type"]

PHASE_STATE = {
    "Pending": AppState.PENDING, "Suspended": AppState.PENDING,
    "Starting": AppState.RUNNING, "Running": AppState.RUNNING, "Restarting": AppState.RUNNING,
    "Succeeded": AppState.SUCCEEDED, "Failed": AppState.FAILED,
}
POD_STATE = {"Pending": ReplicaState.PENDING, "Running": ReplicaState.RUNNING,
             "Succeeded": ReplicaState.SUCCEEDED, "Failed": ReplicaState.FAILED}


@dataclass
class Opts(StructuredOpts):
    """Run options of the `pretrainjob` scheduler (`torchx runopts pretrainjob`)."""

    namespace: str = "default"
    """Kubernetes namespace of the PretrainJob."""

    image: str | None = None
    """Trainer image; overrides the role's image."""

    checkpoint_claim: str | None = None
    """PersistentVolumeClaim for the checkpoints (mounted at checkpoint.path); without it, an emptyDir that dies with the pods."""

    queue: str | None = None
    """Kueue LocalQueue (sets the kueue.x-k8s.io/queue-name label)."""

    spot: bool = False
    """Tolerate the taints clouds put on spot nodes (GKE, AKS, EKS, Karpenter capacity-type keys)."""

    tolerations: list[str] | None = None
    """More tolerations, each KEY (Exists) or KEY:EFFECT or KEY:VALUE:EFFECT; separate them with ';'."""

    max_failures: int | None = None
    """Failed attempts before the job fails for good (default: the role's max_retries when > 0, else the API's default, 3)."""

    priority_class: str | None = None
    """PriorityClass of the pods."""

    validate_spec: bool = True
    """Dry-run the create on the API server, so the CRD's schema and CEL rules check the job before it is submitted."""


@dataclass
class PretrainJobRequest:
    """What `schedule` creates: one PretrainJob manifest in a namespace."""

    namespace: str
    resource: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return yaml.safe_dump(self.resource, sort_keys=False)


class AppDefError(ComponentValidationException, ValueError):
    """An AppDef the PretrainJob cannot honour, or a spec the API refuses. `torchx run` reports this
    exception type as one error line (exit 1) instead of a traceback."""


# ---- AppDef -> PretrainJob (pure) ------------------------------------------------------------------

def job_name(app_name: str, suffix: str | None = None) -> str:
    """A DNS-1035 label of at most 40 characters: the app's name, cut, and a random suffix."""
    base = re.sub(r"[^a-z0-9-]+", "-", app_name.lower()).strip("-")
    base = re.sub(r"^[^a-z]+", "", base)[:33].rstrip("-") or "app"
    return f"{base}-{suffix or uuid.uuid4().hex[:6]}"


def _toleration(text: str) -> dict:
    """KEY (Exists, any effect), KEY:EFFECT (Exists) or KEY:VALUE:EFFECT (Equal; EFFECT may be empty).
    Colons, not kubectl's `=`: `-cfg` splits on `=`, and taint keys and values never hold a colon."""
    parts = text.strip().split(":")
    effects = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
    if not parts[0] or len(parts) > 3 or parts[-1] not in effects and len(parts) > 1:
        raise AppDefError(f"run option tolerations: {text!r} is not KEY, KEY:EFFECT or KEY:VALUE:EFFECT "
                          f"(EFFECT one of {', '.join(e for e in effects if e)})")
    if len(parts) == 3:
        return {"key": parts[0], "operator": "Equal", "value": parts[1], "effect": parts[2]}
    return {"key": parts[0], "operator": "Exists", "effect": parts[1] if len(parts) == 2 else ""}


def _refuse_unsupported(app: AppDef) -> Role:
    if len(app.roles) != 1:
        raise AppDefError(f"a PretrainJob runs one role (a gang of identical pods); app {app.name!r} has "
                          f"{len(app.roles)}: {', '.join(r.name for r in app.roles) or 'none'}")
    if app.metadata:
        raise AppDefError(f"app metadata is not supported by the pretrainjob scheduler: {sorted(app.metadata)}")
    role = app.roles[0]
    if role.min_replicas is not None and not 1 <= role.min_replicas <= role.num_replicas:
        raise AppDefError(f"role {role.name!r}: min_replicas={role.min_replicas} must be from 1 to num_replicas="
                          f"{role.num_replicas} (the fewest nodes an elastic gang may run on)")
    if role.retry_policy != RetryPolicy.APPLICATION:
        raise AppDefError(f"role {role.name!r}: retry_policy {role.retry_policy.value} is not supported: a PretrainJob "
                          "restarts the whole gang from its latest checkpoint (APPLICATION)")
    if role.port_map:
        raise AppDefError(f"role {role.name!r}: port_map {dict(role.port_map)} is not supported: the pods expose "
                          f"only the rendezvous ({c.RDZV_PORT}) and metrics ({c.METRICS_PORT}) ports")
    if role.workspace:
        raise AppDefError(f"role {role.name!r}: workspaces are not supported by the pretrainjob scheduler: "
                          "build and push an image, then pass it as the role's image or the image run option")
    others = sorted(k for k in role.metadata if k != METADATA_KEY)
    if others:
        raise AppDefError(f"role {role.name!r}: metadata {others} is not for the pretrainjob scheduler "
                          f"(it reads only metadata[{METADATA_KEY!r}], a partial PretrainJobSpec)")
    for m in role.mounts:
        if isinstance(m, (BindMount, DeviceMount)):
            kind = "bind" if isinstance(m, BindMount) else "device"
            raise AppDefError(f"role {role.name!r}: {kind} mount {m.src_path} is not supported: a PretrainJob "
                              "mounts one volume, its checkpoint claim (type=volume,src=CLAIM,dst=PATH)")
    if len(role.mounts) > 1:
        raise AppDefError(f"role {role.name!r}: {len(role.mounts)} volume mounts; a PretrainJob mounts one, "
                          "its checkpoint claim (type=volume,src=CLAIM,dst=PATH)")
    if role.mounts and role.mounts[0].read_only:
        raise AppDefError(f"role {role.name!r}: the checkpoint volume {role.mounts[0].src} must be writable")
    for text in [role.entrypoint, *role.args, *role.env.values()]:
        for macro in ("${replica_id}", "${rank0_env}"):
            if macro in text:
                raise AppDefError(f"role {role.name!r}: the macro {macro} is not supported: one pod template serves "
                                  "every rank; read PET_NODE_RANK (node rank) or PET_RDZV_ENDPOINT (rank 0's "
                                  "host:port) in the container instead")
    reserved = sorted(k for k in role.env if k.startswith(("PET_", "PRETRAIN_")))
    if reserved:
        raise AppDefError(f"role {role.name!r}: environment {reserved} belongs to the operator's contract "
                          "(docs/trainer-contract.md); use other names")
    return role


def _resources(role: Role) -> tuple[dict, dict[str, str]]:
    """TorchX resource -> (PretrainJob resources, node selector)."""
    res = role.resource
    if res == NULL_RESOURCE:
        return {}, {}
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu > 0:
        requests["cpu"] = str(res.cpu)
    if res.memMB > 0:
        requests["memory"] = limits["memory"] = f"{res.memMB}Mi"
    if res.gpu > 0:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpu)
    for name, n in res.devices.items():
        requests[name] = limits[name] = str(n)
    selector = {}
    for k, v in res.capabilities.items():
        if not isinstance(v, str):
            raise AppDefError(f"role {role.name!r}: resource capability {k}={v!r} is not a node label value "
                              "(the pretrainjob scheduler turns capabilities into the node selector)")
        selector[k] = v
    return {"requests": requests, "limits": limits}, selector


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def app_to_job(app: AppDef, cfg: Opts, name: str) -> dict:
    """The PretrainJob manifest for `app` under `cfg`, named `name`. Raises AppDefError."""
    role = _refuse_unsupported(app)
    subst = {"${app_id}": f"{cfg.namespace}:{name}", "${img_root}": ""}

    def expand(s: str) -> str:
        for k, v in subst.items():
            s = s.replace(k, v)
        return s

    partial = copy.deepcopy(role.metadata.get(METADATA_KEY) or {})
    if not isinstance(partial, dict):
        raise AppDefError(f"role {role.name!r}: metadata[{METADATA_KEY!r}] must be a mapping (a partial PretrainJobSpec)")
    if "nodes" in partial and partial["nodes"] != role.num_replicas:
        raise AppDefError(f"role {role.name!r}: metadata nodes={partial['nodes']} disagrees with num_replicas="
                          f"{role.num_replicas}; set num_replicas only")
    spec: dict[str, Any] = _merge(partial, {"nodes": role.num_replicas, "image": cfg.image or role.image})
    if role.min_replicas is not None and role.min_replicas < role.num_replicas:
        spec["elastic"] = {**(spec.get("elastic") or {}), "minNodes": role.min_replicas}
    par = spec.setdefault("parallelism", {})
    if "data" not in par:  # pure data parallelism over what tensor x pipeline leave
        try:
            par["data"] = role.num_replicas * int(spec.get("nprocPerNode", 1)) \
                // (int(par.get("tensor", 1)) * int(par.get("pipeline", 1))) or 1
        except (TypeError, ValueError, ZeroDivisionError):
            pass  # the typed model below names the bad field
    command = [expand(role.entrypoint), *(expand(a) for a in role.args)]
    template = spec.setdefault("template", {})
    if command != render.default_command():
        template["command"] = command
    if role.env:
        template["env"] = list(template.get("env") or []) + [{"name": k, "value": expand(v)} for k, v in role.env.items()]
    resources, selector = _resources(role)
    if resources:
        spec["resources"] = {k: v for k, v in resources.items() if v}
    sched = spec.setdefault("scheduling", {})
    if selector:
        sched["nodeSelector"] = {**(sched.get("nodeSelector") or {}), **selector}
    tolerations = list(sched.get("tolerations") or [])
    if cfg.spot:
        tolerations += [{"key": k, "operator": "Exists", "effect": "NoSchedule"} for k in SPOT_TAINTS]
    tolerations += [_toleration(t) for t in cfg.tolerations or [] if t.strip()]
    if tolerations:
        sched["tolerations"] = tolerations
    if cfg.queue:
        sched["queueName"] = cfg.queue
    if cfg.priority_class:
        sched["priorityClassName"] = cfg.priority_class
    ckpt = spec.setdefault("checkpoint", {})
    if role.mounts:
        m = role.mounts[0]
        if cfg.checkpoint_claim and cfg.checkpoint_claim != m.src:
            raise AppDefError(f"the volume mount's claim {m.src!r} and the checkpoint_claim run option "
                              f"{cfg.checkpoint_claim!r} disagree; give one")
        ckpt["claimName"], ckpt["path"] = m.src, m.dst_path
    elif cfg.checkpoint_claim:
        ckpt["claimName"] = cfg.checkpoint_claim
    if role.num_replicas > 1 and not ckpt.get("claimName") and "command" not in template:
        raise AppDefError(f"role {role.name!r}: {role.num_replicas} nodes of the trainer need a shared checkpoint "
                          "volume (every pod writes into each checkpoint folder; an emptyDir is one per pod): "
                          "give a PersistentVolumeClaim with --checkpoint_claim or -cfg checkpoint_claim=CLAIM")
    if cfg.max_failures is not None:
        spec.setdefault("failurePolicy", {})["maxFailures"] = cfg.max_failures
    elif role.max_retries > 0:
        spec.setdefault("failurePolicy", {})["maxFailures"] = role.max_retries
    try:
        typed = api.PretrainJobSpec.model_validate(spec)
    except Exception as e:  # pydantic's ValidationError names each field
        raise AppDefError(f"the PretrainJob spec is invalid: {e}") from None
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
        "metadata": {"name": name, "namespace": cfg.namespace,
                     "labels": {LABEL_APP_NAME: _label_value(app.name), LABEL_ROLE_NAME: _label_value(role.name),
                                LABEL_MANAGED_BY: "torchx"}},
        "spec": typed.model_dump(by_alias=True, exclude_none=True),
    }


def _label_value(s: str) -> str:
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", re.sub(r"[^A-Za-z0-9_.-]", "-", s))[:63]


def status_message(job: dict) -> str:
    """One line: phase, attempt, failures, preemptions, progress and the last checkpoint."""
    st = job.get("status") or {}
    parts = [f"phase {st.get('phase', 'Pending')}", f"attempt {st.get('attempt', 0)}",
             f"failures {st.get('failures', 0)}", f"preemptions {st.get('preemptions', 0)}"]
    prog = st.get("progress") or {}
    if prog.get("totalSteps"):
        parts.append(f"step {prog.get('step', 0)}/{prog['totalSteps']}")
    ck = st.get("lastCheckpoint") or {}
    parts.append(f"last checkpoint step {ck['step']} at {ck.get('path', '')}" if ck.get("step") else "no checkpoint yet")
    if st.get("message"):
        parts.append(st["message"])
    return "; ".join(parts)


def app_state(job: dict) -> AppState:
    if job["metadata"].get("deletionTimestamp"):
        return AppState.CANCELLED
    st = job.get("status") or {}
    if not st.get("phase"):
        return AppState.SUBMITTED
    return PHASE_STATE.get(st["phase"], AppState.UNKNOWN)


# ---- the scheduler ---------------------------------------------------------------------------------

class PretrainJobScheduler(Scheduler[Opts]):
    """TorchX scheduler that submits PretrainJobs (see the module's docstring)."""

    def __init__(self, session_name: str, client: Any = None) -> None:
        super().__init__(BACKEND, session_name)
        self._client = client

    # -- Kubernetes clients
    def _api_client(self):
        if self._client is None:
            from kubernetes import client, config
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                try:
                    config.load_kube_config(client_configuration=configuration)
                except config.ConfigException as e:
                    raise RuntimeError(f"pretrainjob scheduler: no Kubernetes credentials ({e}): set KUBECONFIG, "
                                       "or run in a pod; `--dryrun -cfg validate_spec=False` needs none") from None
            self._client = client.ApiClient(configuration)
        return self._client

    def _custom(self):
        from kubernetes import client
        return client.CustomObjectsApi(self._api_client())

    def _core(self):
        from kubernetes import client
        return client.CoreV1Api(self._api_client())

    def _get(self, app_id: str) -> dict | None:
        from kubernetes.client.rest import ApiException
        ns, name = _split(app_id)
        try:
            return self._custom().get_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # -- submit
    def _run_opts(self) -> runopts:
        return Opts.as_runopts()

    def _validate(self, app: AppDef, scheduler: str, cfg: Opts) -> None:
        _refuse_unsupported(app)  # a role without a resource is fine: the pods then request nothing

    def _submit_dryrun(self, app: AppDef, cfg: Opts) -> AppDryRunInfo[PretrainJobRequest, Opts]:
        job = app_to_job(app, cfg, job_name(app.name))
        if cfg.validate_spec:
            from kubernetes.client.rest import ApiException
            try:
                self._custom().create_namespaced_custom_object(api.GROUP, api.VERSION, cfg.namespace, api.PLURAL,
                                                               job, dry_run="All")
            except ApiException as e:
                raise AppDefError(f"the API server refuses the PretrainJob: {api_message(e)}") from None
        return AppDryRunInfo(PretrainJobRequest(cfg.namespace, job), str)

    def schedule(self, dryrun_info: AppDryRunInfo[PretrainJobRequest, Opts]) -> str:
        from kubernetes.client.rest import ApiException
        req = dryrun_info.request
        try:
            created = self._custom().create_namespaced_custom_object(api.GROUP, api.VERSION, req.namespace,
                                                                     api.PLURAL, req.resource)
        except ApiException as e:
            raise AppDefError(f"the API server refuses the PretrainJob: {api_message(e)}") from None
        return f"{req.namespace}:{created['metadata']['name']}"

    # -- observe
    def describe(self, app_id: str) -> DescribeAppResponse | None:
        job = self._get(app_id)
        if job is None:
            return None
        ns, name = _split(app_id)
        spec = job.get("spec") or {}
        st = job.get("status") or {}
        role_name = job["metadata"].get("labels", {}).get(LABEL_ROLE_NAME, "trainer")
        nodes = int(spec.get("nodes", 1))
        attempt = int(st.get("attempt", 0))
        pods = {}
        if attempt:
            for p in self._core().list_namespaced_pod(
                    ns, label_selector=f"{c.LABEL_JOB}={name},{c.LABEL_ATTEMPT}={attempt}").items:
                pods[int(p.metadata.labels.get(c.LABEL_NODE_RANK, -1))] = p
        replicas = []
        for rank in range(nodes):
            p = pods.get(rank)
            replicas.append(ReplicaStatus(
                id=rank, state=POD_STATE.get(p.status.phase, ReplicaState.UNKNOWN) if p else ReplicaState.PENDING,
                role=role_name, hostname=f"{render.hostname(name, rank)}.{name}.{ns}.svc.cluster.local"))
        return DescribeAppResponse(
            app_id=app_id, state=app_state(job), num_restarts=max(attempt - 1, 0), msg=status_message(job),
            roles=[Role(name=role_name, image=spec.get("image", ""), num_replicas=nodes)],
            roles_statuses=[RoleStatus(role_name, replicas)],
            metadata={"phase": st.get("phase", ""), "attempt": str(attempt),
                      "lastCheckpointStep": str((st.get("lastCheckpoint") or {}).get("step", ""))})

    def describe_native(self, app_id: str) -> AppDryRunInfo[PretrainJobRequest, Opts] | None:
        """The PretrainJob as it is on the cluster (spec and status), in the dry run's form."""
        job = self._get(app_id)
        return None if job is None else AppDryRunInfo(PretrainJobRequest(_split(app_id)[0], job), str)

    def list(self, cfg: Mapping[str, CfgVal] | None = None) -> list[ListAppResponse]:
        ns = (cfg or {}).get("namespace") or _context_namespace()
        items = self._custom().list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]
        return [ListAppResponse(app_id=f"{ns}:{j['metadata']['name']}", state=app_state(j),
                                app_handle=f"{BACKEND}://{self.session_name}/{ns}:{j['metadata']['name']}",
                                name=j["metadata"]["name"]) for j in items]

    def _cancel_existing(self, app_id: str) -> None:
        """Delete the job; foreground propagation removes its pods, Service and ConfigMap first."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException
        ns, name = _split(app_id)
        try:
            self._custom().delete_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, name,
                                                           body=client.V1DeleteOptions(propagation_policy="Foreground"))
        except ApiException as e:
            if e.status != 404:
                raise

    def log_iter(self, app_id: str, role_name: str, k: int = 0, regex: str | None = None,
                 since: datetime | None = None, until: datetime | None = None, should_tail: bool = False,
                 streams: Stream | None = None) -> Iterable[str]:
        """Lines of node rank `k`'s pod in the job's current attempt; following (`should_tail`) moves on to
        the next attempt's pod after a restart and ends when the job is finished or gone."""
        if streams not in (None, Stream.COMBINED):
            raise ValueError("the pretrainjob scheduler has one combined log stream per pod (Kubernetes keeps no other)")
        lines = self._log_lines(app_id, role_name, k, since, until, should_tail)
        return filter_regex(regex, lines) if regex else lines

    def _log_lines(self, app_id, role_name, k, since, until, should_tail) -> Iterable[str]:
        from kubernetes.client.rest import ApiException
        ns, name = _split(app_id)
        job = self._get(app_id)
        if job is None:
            raise ValueError(f"no PretrainJob {app_id}")
        want_role = job["metadata"].get("labels", {}).get(LABEL_ROLE_NAME, "trainer")
        if role_name != want_role:
            raise ValueError(f"app {app_id} has one role, {want_role!r}, not {role_name!r}")
        nodes = int(job["spec"].get("nodes", 1))
        if not 0 <= k < nodes:
            raise ValueError(f"app {app_id} has replicas 0..{nodes - 1}, not {k}")
        core = self._core()
        attempt = 0
        while True:
            job = self._get(app_id)
            if job is None:
                return
            current = int((job.get("status") or {}).get("attempt", 0))
            pod = render.pod_name(name, current, k)
            if not (current > attempt and self._pod_started(core, ns, pod)):
                if not should_tail or app_state(job) in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
                    return
                time.sleep(1)
                continue
            attempt = current
            args: dict[str, Any] = {"name": pod, "namespace": ns, "timestamps": until is not None}
            if since is not None:
                args["since_seconds"] = max(1, int((datetime.now(timezone.utc) - _aware(since)).total_seconds()))
            try:
                if should_tail:
                    resp = core.read_namespaced_pod_log(follow=True, _preload_content=False, **args)
                    chunks = (ln.decode("utf-8", "replace") + "\n" for ln in _iter_lines(resp))
                else:
                    chunks = iter(core.read_namespaced_pod_log(**args).splitlines(keepends=True))
                for line in chunks:
                    if until is not None:
                        stamp, _, line = line.partition(" ")
                        if _parse_time(stamp) > _aware(until):
                            return
                    yield line if line.endswith("\n") else line + "\n"
            except ApiException as e:
                if e.status != 404:  # the pod went away mid-read (a restart): go on with the next attempt
                    raise
            if not should_tail:
                return

    @staticmethod
    def _pod_started(core, ns: str, pod: str) -> bool:
        from kubernetes.client.rest import ApiException
        try:
            p = core.read_namespaced_pod(pod, ns)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return p.status.phase in ("Running", "Succeeded", "Failed")


def _iter_lines(resp) -> Iterable[bytes]:
    buf = b""
    try:
        for chunk in resp.stream(4096, decode_content=False):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line
        if buf:
            yield buf
    finally:
        resp.release_conn()


def _split(app_id: str) -> tuple[str, str]:
    ns, sep, name = app_id.partition(":")
    if not sep or not ns or not name:
        raise ValueError(f"app id {app_id!r} is not <namespace>:<name>")
    return ns, name


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.astimezone()


def _parse_time(stamp: str) -> datetime:
    # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    if not m:
        return datetime.max.replace(tzinfo=timezone.utc)
    frac = (m.group(2) or ".0")[:7]
    return datetime.fromisoformat(m.group(1) + frac + ("+00:00" if m.group(3) == "Z" else m.group(3)))



def _context_namespace() -> str:
    try:
        from kubernetes import config
        _, active = config.list_kube_config_contexts()
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:
        return "default"


def create_scheduler(session_name: str, client: Any = None, **kwargs: Any) -> PretrainJobScheduler:
    """The `torchx.schedulers` entry point."""
    return PretrainJobScheduler(session_name, client=client)
