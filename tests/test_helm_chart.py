"""The Helm chart as rendered, without a cluster: `helm lint --strict` is clean with helm 4 and 3 and
both render the same objects; the Deployment's defaults; RBAC in both modes asks for no more than
the operator uses; monitoring objects only where their API is served; the schema rejects unknown
keys and bad types; the dashboard and the alerts query only metrics that are exported; the chart's
CRD, versions and docs stay in sync with their sources.

    .venv/bin/pytest tests/test_helm_chart.py

helm 4 and helm 3 are built from their Go modules by hack/build-binaries on first use (cached).
What the chart does on a cluster is tests/test_helm_install.py's.
"""

from __future__ import annotations

import importlib.util
import json
import tomllib

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from pretrain_localcluster.config import REPO_ROOT
from pretrain_operator import api, metrics as operator_metrics
from pretrain_operator.settings import OperatorSettings
from pretrain_trainer.metrics import Metrics as TrainerMetrics
from tests.helmutil import CHART, helm, of_kind, template
from tests.helpers import promql_metric_names

MONITORING = ("--api-versions", "monitoring.coreos.com/v1")
NAMESPACED = ("--set", "operator.watchNamespaces={team-a,team-b}")


def _one(docs: list[dict], kind: str) -> dict:
    (d,) = of_kind(docs, kind)
    return d


@pytest.mark.parametrize("major", [4, 3])
def test_helm_lint_strict_is_clean(major):
    # (lint has no --api-versions: the monitoring objects are checked rendered, below)
    for args in ((), NAMESPACED):
        r = helm("lint", "--strict", str(CHART), *args, major=major)
        assert "0 chart(s) failed" in r.stdout and "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


def test_helm_3_and_helm_4_render_the_same_objects():
    kube = ("--kube-version", "1.33.0")  # helm 3 assumes 1.20 otherwise, below the chart's kubeVersion
    for args in ((), NAMESPACED + MONITORING):
        assert template(*args, *kube, major=3) == template(*args, *kube, major=4)


def test_the_deployment_is_one_recreate_replica_with_probes_and_restricted_security():
    docs = template()
    dep = _one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    # Pod Security "restricted": non-root, RuntimeDefault seccomp, no escalation, no capabilities.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert all(set(v) <= {"name", "emptyDir", "configMap", "secret", "projected", "downwardAPI"} for v in pod["volumes"])
    # Only the operator pod carries a token; the ServiceAccount mounts none by default.
    assert pod["automountServiceAccountToken"] is True and _one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PRETRAIN_OPERATOR_NAMESPACES"]["value"] == ""  # cluster-wide
    assert env["PRETRAIN_OPERATOR_LEASE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["PRETRAIN_OPERATOR_LEASE_NAME"]["value"] == _one(docs, "Lease")["metadata"]["name"]
    assert c["command"] == ["python", "-m", "pretrain_operator"]
    # Each names a setting: the operator warns of one that does not (a misspelt operator.env).
    assert not OperatorSettings.unknown_env(env)
    assert OperatorSettings.unknown_env({**env, "PRETRAIN_OPERATOR_RESYNC": "5", "HOME": "/"}) == ["PRETRAIN_OPERATOR_RESYNC"]
    # The names the chart sets are refused in operator.env (the pod would carry two).
    refused = json.loads((CHART / "values.schema.json").read_text())["properties"]["operator"]["properties"]["env"]
    assert set(refused["items"]["properties"]["name"]["not"]["enum"]) == set(env)


def test_standby_replicas_roll_keep_one_pod_through_a_drain_and_spread_over_nodes():
    assert not of_kind(template(), "PodDisruptionBudget")  # one pod: a budget would block every drain
    docs = template("--set", "replicaCount=2")
    dep = _one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    # Never without an operator: a new pod (a standby, Ready on its metrics) before an old one goes.
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (spread,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": dep["spec"]["selector"]}
    # The standbys wait on the one Lease the chart grants (rbac: that name only).
    assert _one(docs, "Lease")["metadata"]["name"] in {e.get("value") for e in
                                                       dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_image_tag_is_the_app_version_unless_a_tag_or_digest_is_given():
    app = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]

    def image(*args):
        return _one(template(*args), "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image() == f"ghcr.io/pretrain-operator/operator:{app}"
    assert image("--set", "image.tag=dev") == "ghcr.io/pretrain-operator/operator:dev"
    digest = "sha256:" + "a" * 64
    assert image("--set", "image.tag=dev", "--set", f"image.digest={digest}") == f"ghcr.io/pretrain-operator/operator@{digest}"


def test_scheduling_command_and_bind_address_values_reach_the_operator_pod():
    vals = ("--set", "nodeSelector.pool=system", "--set", "priorityClassName=system-cluster-critical",
            "--set", "tolerations[0].key=dedicated", "--set", "tolerations[0].operator=Exists",
            "--set", "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=zone",
            "--set", "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
            "--set", "operator.command={pretrain-operator}", "--set-json", 'operator.args=["-v"]', "--set", "operator.verbose=true",
            "--set", "operator.bindAddress=::")
    pod = _one(template(*vals), "Deployment")["spec"]["template"]["spec"]
    assert {"name": "PRETRAIN_OPERATOR_BIND_ADDRESS", "value": "::"} in pod["containers"][0]["env"]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["priorityClassName"] == "system-cluster-critical"
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert pod["containers"][0]["command"] == ["pretrain-operator"]
    assert pod["containers"][0]["args"] == ["-v", "--verbose"]


def _rules(docs: list[dict], kind: str) -> list[dict]:
    return [r for d in of_kind(docs, kind) for r in d["rules"]]


def _grants(rules: list[dict], resource: str, verb: str) -> bool:
    return any((resource in r["resources"] or "*" in r["resources"]) and (verb in r["verbs"] or "*" in r["verbs"]) for r in rules)


def test_rbac_has_no_wildcards_no_secrets_and_no_node_writes_in_either_mode():
    for args in ((), NAMESPACED):
        docs = template(*args)
        rules = _rules(docs, "ClusterRole") + _rules(docs, "Role")
        assert not [r for r in rules if "*" in r["verbs"] or "*" in r["resources"] or "*" in r["apiGroups"]]
        assert not [r for r in rules if {"secrets", "pods/exec", "pods/attach", "serviceaccounts/token"} & set(r["resources"])]
        for verb in ("create", "update", "patch", "delete"):
            assert not _grants(rules, "nodes", verb)
        assert not [r for r in rules if {"escalate", "bind", "impersonate"} & set(r["verbs"])]


def test_cluster_wide_mode_binds_one_cluster_role_and_namespaced_mode_a_role_per_namespace():
    docs = template()
    (operator_role,) = [d for d in of_kind(docs, "ClusterRole") if not d["metadata"]["name"].endswith(("-edit", "-view"))]
    assert _grants(operator_role["rules"], "pods", "create") and _grants(operator_role["rules"], "pretrainjobs/status", "patch")
    assert [r["metadata"]["namespace"] for r in of_kind(docs, "Role")] == ["ops"]  # leader election only
    assert not _grants(operator_role["rules"], "namespaces", "list")  # kopf watches namespaces only when namespaced

    docs = template(*NAMESPACED)
    (operator_role,) = [d for d in of_kind(docs, "ClusterRole") if not d["metadata"]["name"].endswith(("-edit", "-view"))]
    assert not _grants(operator_role["rules"], "pods", "list") and not _grants(operator_role["rules"], "pretrainjobs", "list")
    assert _grants(operator_role["rules"], "nodes", "watch") and _grants(operator_role["rules"], "namespaces", "watch")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in of_kind(docs, "Role")}
    for ns in ("team-a", "team-b"):
        assert _grants(roles[(ns, "po-pretrain-operator")]["rules"], "pods", "create")
        (binding,) = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == ns]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "po-pretrain-operator", "namespace": "ops"}]
    env = {e["name"]: e.get("value") for e in _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PRETRAIN_OPERATOR_NAMESPACES"] == "team-a,team-b"
    # The Lease: read and renewed by name, never created or deleted by the operator.
    (leader,) = [r for (ns, name), r in roles.items() if name.endswith("-leader-election")]
    assert leader["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                "resourceNames": ["po-pretrain-operator"], "verbs": ["get", "update"]}]


def test_two_releases_in_one_namespace_hold_two_leases():
    def lease(release, *args):
        docs = template(*args, release=release)
        env = {e["name"]: e.get("value") for e in _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
        (rule,) = [r for role in of_kind(docs, "Role") for r in role["rules"] if r["resources"] == ["leases"]]
        assert _one(docs, "Lease")["metadata"]["name"] == env["PRETRAIN_OPERATOR_LEASE_NAME"] == rule["resourceNames"][0]
        return env["PRETRAIN_OPERATOR_LEASE_NAME"]
    assert lease("pretrain-operator") == "pretrain-operator"  # the name releases of earlier charts held
    assert lease("team-a") == "team-a-pretrain-operator" != lease("team-b")
    assert lease("team-a", "--set", "operator.leaseName=mine") == "mine"


def test_without_a_chart_made_service_account_one_must_be_named():
    # Else the namespace's default ServiceAccount, which every pod there runs as, got the operator's rights.
    r = helm("template", "po", str(CHART), "--set", "serviceAccount.create=false", check=False)
    assert r.returncode != 0 and "serviceAccount.name" in r.stderr
    docs = template("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops-bot")
    assert not of_kind(docs, "ServiceAccount")
    assert _one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "ops-bot"
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-bot"


def test_monitoring_objects_exist_only_where_monitoring_coreos_com_v1_is_served():
    kinds = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
    assert not [d for d in template() if d["kind"] in kinds]
    docs = template(*MONITORING)
    assert sorted(d["kind"] for d in docs if d["kind"] in kinds) == sorted(kinds)
    sm = _one(docs, "ServiceMonitor")
    svc = _one(docs, "Service")
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    pm = _one(docs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"  # the trainer pods' port name (render.py)
    # Node rank 0's pods only, what the dashboard and alerts read (a gang's other pods repeat them).
    keep = {"sourceLabels": ["__meta_kubernetes_pod_label_pretrain_dev_node_rank"], "regex": "0", "action": "keep"}
    assert pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0] == keep
    every = _one(template(*MONITORING, "--set", "metrics.podMonitor.allNodes=true"), "PodMonitor")
    assert keep not in every["spec"]["podMetricsEndpoints"][0]["relabelings"]
    pm = _one(template(*MONITORING, *NAMESPACED), "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    # A cluster that serves some of the API's kinds only (its CRDs installed one by one): the others
    # are not rendered, or the whole install would fail on "no matches for kind".
    some = template(*MONITORING, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
                    "--api-versions", "monitoring.coreos.com/v1/PodMonitor")
    assert sorted(d["kind"] for d in some if d["kind"] in kinds) == ["PodMonitor", "ServiceMonitor"]
    off = template(*MONITORING, "--set", "metrics.serviceMonitor.enabled=false", "--set", "metrics.podMonitor.enabled=false",
                   "--set", "metrics.prometheusRule.enabled=false")
    assert not [d for d in off if d["kind"] in kinds]


BAD_VALUES = [
    (("--set", "replicas=2"), "replicas"),
    (("--set", "replicaCount=0"), "replicaCount"),
    (("--set", "operator.watchNamespace=a"), "watchNamespace"),
    (("--set", "metrics.serviceMonitor.scrapeTimeout=5s"), "scrapeTimeout"),
    (("--set", "operator.workers=many"), "workers"),
    (("--set", "operator.workers=0"), "workers"),
    (("--set", "image.pullPolicy=Sometimes"), "pullPolicy"),
    (("--set", "operator.watchNamespaces={Bad_NS}"), "watchNamespaces"),
    (("--set", "operator.watchNamespaces=team-a"), "watchNamespaces"),
    (("--set", "metrics.serviceMonitor.interval=often"), "interval"),
    (("--set", "image.digest=latest"), "digest"),
    (("--set", "operator.env[0].name=PRETRAIN_OPERATOR_RESYNC_S", "--set", "operator.env[0].value=60"), "/operator/env/0/value"),
    (("--set", "operator.env[0].name=PRETRAIN_OPERATOR_WORKERS", "--set-string", "operator.env[0].value=4"), "/operator/env/0/name"),
    (("--set", "operator.leaseName=Leader_Lease"), "leaseName"),
    (("--set", "dashboard.namespace=Grafana NS"), "namespace"),
    (("--set", "operator.bindAddress=localhost"), "bindAddress"),
    (("--set", "operator.bindAddress=999.1.1.1"), "bindAddress"),
    (("--set", "operator.metricsPort=8080"), "operator.metricsPort and operator.healthPort are both 8080"),
    (("--set", "image.tag=v1@sha256:abc"), "tag"),
    (("--set", "operator.env[0].name=X", "--set", "operator.env[0].bogus=3"), "bogus"),
    # Names and labels the pod API refuses at install (after the CRD went in): the schema says so first.
    (("--set", "nameOverride=Pretrain_Op"), "nameOverride"),
    (("--set", "fullnameOverride=9po"), "fullnameOverride"),
    (("--set", "serviceAccount.name=Ops SA"), "serviceAccount"),
    (("--set", "priorityClassName=High_Priority"), "priorityClassName"),
    (("--set", "podLabels.team=a b"), "podLabels"),
    (("--set-json", 'podLabels={"bad key!": "x"}'), "podLabels"),
    # The Deployment's selector labels: a second one under the same key broke the selector's match.
    (("--set-json", 'podLabels={"app.kubernetes.io/name": "mine"}'), "podLabels"),
    (("--set", "image.repository=ghcr.io/pretrain-operator/operator:v1"), "repository"),
    # A flag the chart sets from its values: it won over the env, and the ports, probes or Lease no longer matched.
    (("--set-json", 'operator.args=["--metrics-port","9000"]'), "args"),
    (("--set-json", 'operator.args=["-v","--lease-namespace=other"]'), "args"),
    (("--set-json", 'operator.args=["-nteam-a"]'), "args"),
]


@pytest.mark.parametrize("major", [4, 3])
def test_the_values_schema_rejects_unknown_keys_and_bad_types_naming_the_key(major):
    for args, key in BAD_VALUES:  # a kube version helm 3 takes (its default, 1.20, is below the chart's)
        r = helm("template", "po", str(CHART), "--kube-version", "1.33.0", *args, major=major, check=False)
        assert r.returncode != 0, f"accepted {args}"
        assert key in r.stderr, (args, r.stderr)


def test_the_charts_crd_is_the_generated_crd():
    assert (CHART / "crds" / "pretrain.dev_pretrainjobs.yaml").read_text() == \
        (REPO_ROOT / "crds" / "pretrain.dev_pretrainjobs.yaml").read_text(), \
        "copy crds/pretrain.dev_pretrainjobs.yaml into charts/pretrain-operator/crds/"


def test_the_app_version_is_the_package_version_and_the_default_trainer_image_tag():
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == version
    assert api.PretrainJobSpec.model_fields["image"].default.endswith(f":{version}")


def exported_metrics() -> set[str]:
    """Every series name the operator's registry and the trainer's contract serve."""
    names = {"up"}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
    for m in vars(operator_metrics).values():
        if isinstance(m, MetricWrapperBase):
            for fam in m.describe():
                names |= {fam.name + s for s in suffixes[fam.type]}
    return names | set(TrainerMetrics().values)


def test_every_metric_the_dashboard_queries_is_exported():
    docs = template()
    cm = _one(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["pretrain-operator.json"])
    assert dash == json.loads((CHART / "files" / "dashboard.json").read_text())
    exported = exported_metrics()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    queried = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = promql_metric_names(t["expr"])
            assert names, (p["title"], t["expr"])
            assert names <= exported, (p["title"], names - exported)
            queried |= names
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert promql_metric_names(v["query"]["query"]) <= exported
    # What the issue asks the dashboard to show: phase, attempts, preemptions, loss, tokens/s, last checkpoint step.
    assert {"pretrain_operator_jobs", "pretrain_operator_gang_restarts_total", "pretrain_loss", "pretrain_tokens_per_second",
            "pretrain_last_checkpoint_step", "pretrain_step"} <= queried
    assert any("attempt" in t["expr"] for p in panels for t in p["targets"])


def test_every_alert_is_well_formed_and_queries_exported_metrics():
    rule = _one(template(*MONITORING), "PrometheusRule")
    exported = exported_metrics()
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {"PretrainOperatorDown", "PretrainJobFailed", "PretrainPreemptionStorm", "PretrainCheckpointStale"} <= {a["alert"] for a in alerts}
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical") and a["annotations"]["summary"] and a["annotations"]["description"]
        assert promql_metric_names(a["expr"]) <= exported, (a["alert"], promql_metric_names(a["expr"]) - exported)
        assert "{{" not in a["expr"] and a["expr"].count("(") == a["expr"].count(")")
    down = next(a for a in alerts if a["alert"] == "PretrainOperatorDown")
    assert 'up{job="po-pretrain-operator-metrics", namespace="ops"}' in down["expr"]  # the metrics Service's name
    stale = next(a for a in alerts if a["alert"] == "PretrainCheckpointStale")
    assert "{{ $labels.pretrain_job }}" in stale["annotations"]["description"]  # Prometheus's template, kept
    assert "> 3600" in stale["expr"]
    unscraped = _one(template(*MONITORING, "--set", "metrics.serviceMonitor.enabled=false"), "PrometheusRule")
    assert "PretrainOperatorDown" not in [r["alert"] for g in unscraped["spec"]["groups"] for r in g["rules"]]
    # A release's alerts read its own monitors' series (two releases, one per team, alerted on each other's).
    by_name = {a["alert"]: a["expr"] for a in alerts}
    assert 'job="ops/po-pretrain-operator-trainers"' in by_name["PretrainTrainingStalled"]
    assert 'job="po-pretrain-operator-metrics"' in by_name["PretrainJobFailed"]
    unmonitored = _one(template(*MONITORING, "--set", "metrics.serviceMonitor.enabled=false", "--set", "metrics.podMonitor.enabled=false"),
                       "PrometheusRule")
    for a in (r for g in unmonitored["spec"]["groups"] for r in g["rules"]):  # scraped by the user's own config: any job
        assert 'job="' not in a["expr"], a
    # A cluster that serves PrometheusRule but neither monitor kind: the chart made no scrape, so no
    # alert waits on one (PretrainOperatorDown would fire for ever, the trainers' never).
    rules_only = _one(template("--api-versions", "monitoring.coreos.com/v1/PrometheusRule"), "PrometheusRule")
    alerts_only = [r for g in rules_only["spec"]["groups"] for r in g["rules"]]
    assert "PretrainOperatorDown" not in [a["alert"] for a in alerts_only]
    assert alerts_only and all('job="' not in a["expr"] for a in alerts_only)
    storm = _one(template(*MONITORING, "--set", "metrics.prometheusRule.preemptionsPerHour=3"), "PrometheusRule")
    assert any(r["expr"].endswith("> 3") for g in storm["spec"]["groups"] for r in g["rules"] if r["alert"] == "PretrainPreemptionStorm")


def test_docs_install_values_reference_is_generated_from_the_schema():
    spec = importlib.util.spec_from_file_location("chartdoc", REPO_ROOT / "hack" / "chartdoc.py")
    chartdoc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chartdoc)
    doc = chartdoc.DOC.read_text()
    assert chartdoc.render(doc) == doc, "run: python hack/chartdoc.py --write"
