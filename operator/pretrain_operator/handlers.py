"""kopf wiring: watch PretrainJobs, their pods and nodes, and feed the controller's work queue.

Only low-level `on.event` handlers: kopf keeps no state on our objects (no annotations, no
finalizers), so a converged job gets no writes, and deleting a job never waits for the operator.
Leader election (a Lease) decides which operator acts.
"""

from __future__ import annotations

import logging

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from . import api, contract as c
from .controller import Controller
from .kubeapi import KubeAPI
from .leader import LeaderElector
from .settings import OperatorSettings

log = logging.getLogger("pretrain_operator")
STATE: dict = {}


def api_client(settings: OperatorSettings) -> client.ApiClient:
    try:
        config.load_incluster_config()
        source = "in-cluster config"
    except config.ConfigException:
        config.load_kube_config()
        source = "kubeconfig"
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = settings.api_qps_pool
    apic = client.ApiClient(cfg)
    log.info("API server %s as %s (%s)", cfg.host, whoami(apic), source)
    return apic


def whoami(apic: client.ApiClient) -> str:
    """The identity the API server sees (a SelfSubjectReview, allowed to every authenticated user):
    the log line that tells which ServiceAccount's RBAC applies."""
    try:
        r = KubeAPI(apic).create("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                 {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        return r["status"]["userInfo"]["username"]
    except Exception as e:  # noqa: BLE001  (informational only)
        return f"<unknown: {e.__class__.__name__}>"


def controller() -> Controller:
    return STATE["controller"]


def configure(settings: kopf.OperatorSettings, s: OperatorSettings) -> None:
    """kopf's settings from ours."""
    # Our own prefixes from day one, in case change-detecting handlers are ever added.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.pretrain.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.pretrain.dev",
                                                                            key="last-handled-configuration")
    settings.persistence.finalizer = "pretrain.dev/kopf-finalizer"
    settings.watching.server_timeout = s.watch_server_timeout_s
    settings.watching.client_timeout = s.watch_client_timeout_s
    # The API server sends the pods of PretrainJobs only: a handler's `labels=` filter is applied
    # by kopf after every pod of the cluster has been listed and streamed to it (tens of thousands
    # on a shared cluster: the operator's memory and CPU would grow with them, not with its jobs).
    settings.watching.label_selectors["", "v1", "pods"] = c.LABEL_JOB
    settings.watching.chunk_size = s.watch_list_chunk  # the first lists in pages, not one response
    settings.queueing.idle_timeout = s.watch_worker_idle_s
    settings.posting.enabled = False  # our Events are written by the controller, after the status


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_):
    s: OperatorSettings = STATE["settings"]
    configure(settings, s)
    apic = api_client(s)
    leader = LeaderElector(apic, s.lease_namespace, s.lease_name, s.lease_duration_s, s.lease_renew_s)
    ctl = Controller(apic, s, leader)
    STATE["controller"] = ctl
    leader.start()
    ctl.start()
    if s.metrics_port:
        start_http_server(s.metrics_port, addr=s.bind_address)
    log.info("pretrain-operator started: %d workers, leader election on %s/%s", s.workers, s.lease_namespace, s.lease_name)


@kopf.on.cleanup()
def cleanup(**_):
    ctl = STATE.get("controller")
    if ctl:
        # Then the Lease, which a standby takes at once; with a pass still writing, it is left to
        # expire instead (the process ends, and its daemon workers with it).
        if ctl.stop(timeout=ctl.settings.lease_duration_s) and ctl.leader:
            ctl.leader.release()


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def job_event(name, namespace, type, uid, **_):  # noqa: A002  (kopf's keyword)
    if type == "DELETED":
        controller().on_job_deleted((namespace, name), uid)
    else:
        controller().on_job((namespace, name), uid)


@kopf.on.event("", "v1", "pods", labels={c.LABEL_JOB: kopf.PRESENT})
def pod_event(body, **_):
    controller().on_pod(dict(body))


@kopf.on.event("", "v1", "nodes")
def node_event(body, type, **_):  # noqa: A002  (kopf's keyword)
    controller().on_node(dict(body), deleted=type == "DELETED")
