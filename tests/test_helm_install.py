"""The Helm chart installed on the local cluster: the operator runs in a pod on a process node as the
chart's ServiceAccount (in-cluster config, a projected token), in namespaces that enforce the
`restricted` Pod Security level; the operator's lifecycle, preemption, suspend and TTL scenarios pass
against it; `kubectl auth can-i` shows it can do what it needs and nothing else; `helm upgrade`
switches it to cluster-wide; `helm uninstall` leaves only the CRD.

    .venv/bin/pytest tests/test_helm_install.py

One release serves the whole module (an install is the operator pod's start, a few seconds), and
the tests run in file order: the last two upgrade it and uninstall it. Operator processes other
test modules started are paused meanwhile (two leaders on two Leases would both act).
Limits: process nodes do not pull images; the pod runs the chart's command (`python -m
pretrain_operator`) with this machine's virtualenv, so the image itself is checked only by
tests/test_images.py.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from pretrain_localcluster import binaries
from tests import test_operator_failures as failures, test_operator_lifecycle as lifecycle, \
    test_operator_preemption as preemption
from tests.helmutil import CHART, helm
from tests.helpers import wait_for
from tests.jobs import Jobs, job_manifest
from tests.kubeutil import pod_security_labels
from tests.operator_fixture import OperatorProcess


# The operator's timings as in the other operator tests (tests/operator_fixture.py).
FAST = [{"name": "PRETRAIN_OPERATOR_LEASE_DURATION_S", "value": "4"}, {"name": "PRETRAIN_OPERATOR_LEASE_RENEW_S", "value": "1"},
        {"name": "PRETRAIN_OPERATOR_RESYNC_S", "value": "3"}, {"name": "PRETRAIN_OPERATOR_PROGRESS_INTERVAL_S", "value": "1"}]


@dataclass
class Release:
    name: str
    ns: str          # the release's namespace (the operator pod, its Lease)
    jobs_ns: str     # the namespace it watches
    other_ns: str    # a namespace it must not touch
    kubeconfig: Path
    values_dir: Path
    notes: str = ""

    @property
    def sa(self) -> str:
        return f"system:serviceaccount:{self.ns}:{self.name}-pretrain-operator"

    @property
    def deployment(self) -> str:
        return f"{self.name}-pretrain-operator"

    def helm(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return helm(*args, kubeconfig=self.kubeconfig, **kw)

    def values(self, watch: list[str]) -> str:
        p = self.values_dir / f"values-{len(watch)}.yaml"
        p.write_text(yaml.safe_dump({"operator": {"watchNamespaces": watch, "workers": 4, "env": FAST},
                                     "readinessProbe": {"initialDelaySeconds": 0, "periodSeconds": 1}}))
        return str(p)


def _namespace(core: client.CoreV1Api, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"pretrain-test": "1", **pod_security_labels()})))
    # Pods are refused until the serviceaccount controller has made `default`.
    wait_for(lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
             what=f"the default ServiceAccount in {name}")
    return name


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binaries.locate(["kubectl"])["kubectl"]), "--kubeconfig", str(kubeconfig), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def release(cluster, crd, core, tmp_path_factory):
    # `crd`: the current CRD applied first, as docs/install.md says to before an install or upgrade
    # (helm leaves an existing CRD alone, and a reused cluster may hold an older one).
    paused = list(OperatorProcess.live)
    for op in paused:
        op.stop()
    try:
        r = Release("po", _namespace(core, "helm-ops"), _namespace(core, "helm-jobs"), _namespace(core, "helm-other"),
                    cluster.cfg.kubeconfig, tmp_path_factory.mktemp("helm"))
        r.notes = r.helm("install", r.name, str(CHART), "-n", r.ns, "-f", r.values([r.jobs_ns]),
                         "--wait", "--timeout", "120s").stdout
    except BaseException:
        for op in paused:  # the other modules' operators must not stay stopped
            op.start()
        raise
    yield r
    try:  # kept for a failed run: pytest's basetemp/helm*/operator.log
        (r.values_dir / "operator.log").write_text(operator_log(core, r))
    except (AssertionError, client.ApiException):
        pass  # uninstalled already
    r.helm("uninstall", r.name, "-n", r.ns, "--wait", check=False)
    for ns in (r.ns, r.jobs_ns, r.other_ns):
        try:
            core.delete_namespace(ns)
        except client.ApiException:
            pass
    for op in paused:
        op.start()


@pytest.fixture
def namespace(release) -> str:
    """The scenarios run in the namespace the installed operator watches (restricted)."""
    return release.jobs_ns


@pytest.fixture
def jobs(api, release) -> Jobs:
    return Jobs(api, release.jobs_ns)


def operator_pod(core, r: Release) -> client.V1Pod:
    pods = [p for p in core.list_namespaced_pod(r.ns, label_selector="app.kubernetes.io/name=pretrain-operator").items
            if not p.metadata.deletion_timestamp]
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def operator_log(core, r: Release) -> str:
    return core.read_namespaced_pod_log(operator_pod(core, r).metadata.name, r.ns)


def test_the_rendered_chart_passes_a_server_side_dry_run_in_both_modes(release):
    for watch in ([], [release.jobs_ns]):
        out = helm("template", "dry", str(CHART), "-n", release.other_ns, "-f", release.values(watch)).stdout
        r = kubectl(release.kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=out)
        assert r.returncode == 0, r.stderr
        assert "deployment.apps/dry-pretrain-operator created (server dry run)" in r.stdout


def test_the_operator_runs_in_a_pod_as_the_charts_service_account_with_in_cluster_config(core, release):
    pod = operator_pod(core, release)
    assert pod.status.phase == "Running" and all(c.ready for c in pod.status.container_statuses)
    assert pod.spec.service_account_name == f"{release.name}-pretrain-operator"
    # The ServiceAccount admission plugin projected a bound token; the agent mounted it.
    projected = [v for v in pod.spec.volumes if v.projected]
    assert any(s.service_account_token for v in projected for s in v.projected.sources)
    log = operator_log(core, release)
    assert f"as {release.sa} (in-cluster config)" in log, log
    assert "became the leader" in log
    lease = client.CoordinationV1Api(core.api_client).read_namespaced_lease(release.deployment, release.ns)  # the release's full name
    assert lease.spec.holder_identity.startswith(pod.metadata.name)
    # It was admitted where `restricted` is enforced.
    assert core.read_namespace(release.ns).metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert "uninstall" in release.notes and "CRD" in release.notes


# The operator's own scenarios, against the installed operator in its restricted namespace. Between
# them every write the RBAC grants happens: pods created, deleted and annotated (the checkpoint
# request on suspend), the Service and ConfigMap created, the ConfigMap updated (training steps
# changed while suspended), the status patched, Events created, a job deleted (its TTL).
test_installed_operator_runs_a_job_to_succeeded = \
    lifecycle.test_a_job_runs_its_gang_to_succeeded_with_progress_and_checkpoint_in_status
test_installed_operator_resumes_an_evicted_gang_from_its_checkpoint = \
    preemption.test_eviction_with_disruption_target_is_a_preemption_and_resumes_from_the_checkpoint
test_installed_operator_suspends_and_resumes_a_job = \
    failures.test_suspend_checkpoints_and_removes_the_pods_and_resume_continues_from_it
test_installed_operator_deletes_a_finished_job_after_its_ttl = lifecycle.test_ttl_after_finished_deletes_the_job


def test_trainer_pods_run_with_no_api_token(jobs, core, release):
    jobs.create(job_manifest("notoken", steps=300))
    jobs.wait_phase("notoken", "Running", timeout=60)
    pods = jobs.pods("notoken")
    assert len(pods) == 2
    for p in pods:
        assert p.spec.automount_service_account_token is False
        assert not [s for v in p.spec.volumes if v.projected for s in v.projected.sources if s.service_account_token]
        assert not any(m.mount_path.startswith("/var/run/secrets/kubernetes.io") for m in p.spec.containers[0].volume_mounts)
    jobs.delete("notoken")


def test_the_operator_met_no_forbidden_request(core, release):
    log = operator_log(core, release)
    for bad in ("Forbidden", " 403 ", "Not enough permissions", "Traceback"):
        assert bad not in log, log[-3000:]


# (verb, resource[/subresource][#name], namespace or None for cluster scope, allowed) for the
# operator's ServiceAccount.
def _can_i_table(r: Release, clusterwide: bool) -> list[tuple[str, str, str | None, bool]]:
    job = r.jobs_ns
    return [
        # What the operator does (controller.py, leader.py, kopf's watches).
        ("watch", "pretrainjobs.pretrain.dev", job, True), ("delete", "pretrainjobs.pretrain.dev", job, True),
        ("patch", "pretrainjobs.pretrain.dev/status", job, True), ("update", "pretrainjobs.pretrain.dev/finalizers", job, True),
        ("create", "pods", job, True), ("patch", "pods", job, True), ("delete", "pods", job, True), ("watch", "pods", job, True),
        ("create", "services", job, True), ("update", "configmaps", job, True), ("create", "events", job, True),
        ("watch", "nodes", None, True), ("get", "nodes", None, True), ("get", "namespaces", None, True),
        ("delete", "namespaces", None, False), ("update", "namespaces", None, False),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, True),
        ("get", "customresourcedefinitions.apiextensions.k8s.io", None, False),
        ("update", f"leases.coordination.k8s.io#{r.deployment}", r.ns, True),
        # What it must not.
        ("get", "secrets", job, False), ("list", "secrets", r.ns, False), ("list", "secrets", None, False),
        ("update", "nodes", None, False), ("patch", "nodes", None, False), ("delete", "nodes", None, False),
        ("create", "pods/exec", job, False), ("create", "pods/eviction", job, False),
        ("update", "pretrainjobs.pretrain.dev", job, False), ("create", "pretrainjobs.pretrain.dev", job, False),
        ("create", "leases.coordination.k8s.io", r.ns, False), ("update", "leases.coordination.k8s.io#other", r.ns, False),
        ("delete", f"leases.coordination.k8s.io#{r.deployment}", r.ns, False),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, False), ("impersonate", "serviceaccounts", r.ns, False),
        ("create", "persistentvolumeclaims", job, False), ("create", "deployments.apps", r.ns, False),
        # Namespaced mode: nothing outside the watched namespaces; cluster-wide: pods anywhere.
        ("create", "pods", r.other_ns, clusterwide), ("list", "pods", r.other_ns, clusterwide),
        ("delete", "pods", r.other_ns, clusterwide), ("watch", "pretrainjobs.pretrain.dev", r.other_ns, clusterwide),
        ("create", "pods", r.ns, clusterwide),
    ]


def _check_can_i(r: Release, clusterwide: bool) -> None:
    wrong = []
    for verb, res, ns, want in _can_i_table(r, clusterwide):
        sub = []
        if "/" in res:
            res, s = res.split("/", 1)
            sub = [f"--subresource={s}"]
        res = res.replace("#", "/")  # kubectl's TYPE/NAME
        where = ["-n", ns] if ns else []
        out = kubectl(r.kubeconfig, "auth", "can-i", verb, res, *sub, *where, f"--as={r.sa}")
        got = out.stdout.strip() == "yes"
        if got != want:
            wrong.append(f"{verb} {res} {' '.join(sub)} in {ns or 'the cluster'}: {out.stdout.strip()} {out.stderr.strip()}")
    assert not wrong, "\n".join(wrong)


def test_the_service_account_can_do_what_the_operator_needs_and_nothing_else_in_namespaced_mode(release):
    _check_can_i(release, clusterwide=False)


def test_helm_upgrade_to_cluster_wide_swaps_roles_for_a_cluster_role_and_restarts_the_operator(core, release):
    rbac = client.RbacAuthorizationV1Api(core.api_client)
    before = operator_pod(core, release).metadata.name
    assert rbac.list_namespaced_role(release.jobs_ns).items
    release.helm("upgrade", release.name, str(CHART), "-n", release.ns, "-f", release.values([]), "--wait", "--timeout", "120s")
    assert not rbac.list_namespaced_role(release.jobs_ns).items
    wait_for(lambda: operator_pod(core, release).metadata.name != before and "became the leader" in operator_log(core, release),
             timeout=60, what="the upgraded operator to lead")
    assert "watching PretrainJobs in every namespace" in release.helm("get", "notes", release.name, "-n", release.ns).stdout
    _check_can_i(release, clusterwide=True)


def test_helm_uninstall_leaves_nothing_but_the_crd(core, release):
    release.helm("uninstall", release.name, "-n", release.ns, "--wait", "--timeout", "60s")
    wait_for(lambda: not core.list_namespaced_pod(release.ns).items, timeout=60, what="the operator pod to go")
    ns = release.ns
    rbac = client.RbacAuthorizationV1Api(core.api_client)
    left = {
        "serviceaccounts": [s.metadata.name for s in core.list_namespaced_service_account(ns).items if s.metadata.name != "default"],
        "configmaps": [c.metadata.name for c in core.list_namespaced_config_map(ns).items if c.metadata.name != "kube-root-ca.crt"],
        "services": [s.metadata.name for s in core.list_namespaced_service(ns).items],
        "leases": [x.metadata.name for x in client.CoordinationV1Api(core.api_client).list_namespaced_lease(ns).items],
        "deployments": [d.metadata.name for d in client.AppsV1Api(core.api_client).list_namespaced_deployment(ns).items],
        "roles": [x.metadata.name for n in (ns, release.jobs_ns) for x in rbac.list_namespaced_role(n).items],
        "rolebindings": [x.metadata.name for n in (ns, release.jobs_ns) for x in rbac.list_namespaced_role_binding(n).items],
        "clusterroles": [x.metadata.name for x in rbac.list_cluster_role().items if x.metadata.name.startswith(f"{ns}:")],
        "clusterrolebindings": [x.metadata.name for x in rbac.list_cluster_role_binding().items if x.metadata.name.startswith(f"{ns}:")],
    }
    assert not any(left.values()), left
    ext = client.ApiextensionsV1Api(core.api_client)
    assert ext.read_custom_resource_definition("pretrainjobs.pretrain.dev").metadata.name  # kept, as NOTES say
