"""Prometheus beside the local cluster, finding the operator and the trainer pods through
Kubernetes service discovery, as the chart's ServiceMonitor and PodMonitor do on a real cluster.

    hack/local-cluster prometheus [--operator-port 8000]   # start it (or find it running); prints its URL
    make demo                                             # starts it too

It is one more process of the cluster (`logs/prometheus.log`, stopped by `hack/local-cluster down`),
its data in `<state>/prometheus/`, listening on the host's loopback. Scrape jobs:
- `pretrain-operator`: EndpointSlices of Services labelled `app.kubernetes.io/name=pretrain-operator`,
  port `metrics` (the chart's metrics Service; labels honoured, as the chart's ServiceMonitor says).
  An operator running on this machine (`make run-operator`) is registered by `register_host_operator`:
  a Service without a selector in `pretrain-system` and an EndpointSlice to the bridge's gateway
  address, as if it ran in a pod.
- `pretrain-trainers`: pods labelled `pretrain.dev/job` with a container port named `metrics` (the
  PodMonitor), labelled with `namespace`, `pod`, `pretrain_job` and `attempt`.
Rules: the chart's PrometheusRule (`charts/pretrain-operator/files/alerts.yaml`), rendered by
`helm template` for a release `pretrain-operator` in `pretrain-system`, as it would be installed.
Limits: a 2 s scrape interval (the demo is short); no Alertmanager (firing alerts show on
/alerts and through the API).
"""

from __future__ import annotations

import json
import shlex
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from . import binaries
from .config import HACK_DIR
from .controlplane import LocalCluster, _free_port
from .procs import alive

CHART = HACK_DIR.parent / "charts" / "pretrain-operator"
RELEASE = "pretrain-operator"
OPERATOR_NS = "pretrain-system"
OPERATOR_SERVICE = f"{RELEASE}-metrics"  # the chart's metrics Service for that release
SCRAPE_INTERVAL = "2s"


def render_rules(out: Path, values: list[str] | None = None) -> Path:
    """The chart's PrometheusRule groups as a Prometheus rule file (`helm template`)."""
    import subprocess

    helm = binaries.ensure(["helm"])["helm"]
    argv = [str(helm), "template", RELEASE, str(CHART), "--namespace", OPERATOR_NS,
            "--api-versions", "monitoring.coreos.com/v1", "--show-only", "templates/monitoring.yaml"]
    for v in values or []:
        argv += ["--set", v]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"helm template: {r.stderr.strip()}")
    rule = next(d for d in yaml.safe_load_all(r.stdout) if d and d.get("kind") == "PrometheusRule")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return out


def config(kubeconfig: Path, rules: Path) -> dict:
    sd = lambda role: [{"role": role, "kubeconfig_file": str(kubeconfig)}]  # noqa: E731
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "pretrain-operator", "honor_labels": True, "kubernetes_sd_configs": sd("endpointslice"),
             "relabel_configs": [
                 {"source_labels": ["__meta_kubernetes_service_label_app_kubernetes_io_name"], "regex": "pretrain-operator",
                  "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_endpointslice_port_name"], "regex": "metrics", "action": "keep"},
                 # As the Prometheus Operator labels a ServiceMonitor's targets.
                 {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                 {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                 {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
             ]},
            {"job_name": "pretrain-trainers", "kubernetes_sd_configs": sd("pod"),
             "relabel_configs": [
                 {"source_labels": ["__meta_kubernetes_pod_label_pretrain_dev_job"], "regex": ".+", "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics", "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Running", "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                 {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},  # as the PodMonitor's
                 {"source_labels": ["__meta_kubernetes_pod_label_pretrain_dev_job"], "target_label": "pretrain_job"},
                 {"source_labels": ["__meta_kubernetes_pod_label_pretrain_dev_attempt"], "target_label": "attempt"},
                 {"source_labels": ["__meta_kubernetes_pod_label_pretrain_dev_node_rank"], "target_label": "node_rank"},
                 # As the Prometheus Operator labels a PodMonitor's targets (<namespace>/<name>): the
                 # chart's alerts select the release's own.
                 {"target_label": "job", "replacement": "pretrain-system/pretrain-operator-trainers"},
             ]},
        ],
    }


class Prometheus:
    def __init__(self, lc: LocalCluster):
        self.lc = lc
        self.dir = lc.state_dir / "prometheus"
        self.info = self.dir / "prometheus.json"

    @property
    def url(self) -> str:
        return json.loads(self.info.read_text())["url"]

    def running(self) -> bool:
        return self.lc.procs.running().get("prometheus", False) and self.info.exists()

    def up(self, timeout: float = 60) -> str:
        """Start Prometheus (a running one is left alone) and wait until it answers; its URL."""
        if self.running():
            return self.url
        exe = binaries.ensure(["prometheus"])["prometheus"]
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "prometheus.yml"
        rules = render_rules(self.dir / "rules.yml")
        cfg.write_text(yaml.safe_dump(config(self.lc.cfg.kubeconfig, rules)))
        port = _free_port("127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        pid = self.lc.procs.start("prometheus", [str(exe), f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
                                           f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
                                           "--storage.tsdb.retention.time=7d", "--log.level=warn"])
        self.info.write_text(json.dumps({"url": url}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            # alive(), not running(): right after the fork the child's environment (which holds
            # the ownership marker) may not be the new program's yet.
            if not alive(pid):
                raise RuntimeError(f"prometheus exited; see {self.lc.procs.log_dir / 'prometheus.log'}")
            time.sleep(0.3)
        raise RuntimeError(f"prometheus not ready in {timeout} s; see {self.lc.procs.log_dir / 'prometheus.log'}")

    def down(self) -> None:
        self.lc.procs.stop("prometheus")
        self.info.unlink(missing_ok=True)

    def query_command(self, promql: str) -> str:
        """A shell command answering `promql` now. The Go-built Prometheus has no web UI (its pages
        come from an npm build that `go install` does not run: /graph answers 500), so users
        query it with promtool, built beside it, or its HTTP API."""
        promtool = binaries.ensure(["prometheus"])["prometheus"].parent / "promtool"
        return f"{shlex.quote(str(promtool))} query instant {self.url} {shlex.quote(promql)}"

    # ---- the HTTP API ----------------------------------------------------------------------------
    def _get(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Instant query: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return self._get("/api/v1/query", query=promql)["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 2.0) -> list[dict]:
        return self._get("/api/v1/query_range", query=promql, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets", state="active")["activeTargets"]

    def metric_names(self) -> set[str]:
        return set(self._get("/api/v1/label/__name__/values"))

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts")["alerts"]


def register_host_operator(lc: LocalCluster, port: int) -> str:
    """An operator process on this machine becomes a scrape target like one in a pod: a Service
    `pretrain-operator-metrics` (no selector) in pretrain-system and an EndpointSlice pointing at the
    bridge's gateway address and `port`. Returns the address Prometheus will scrape."""
    from .nodes import admin_kube

    st = json.loads((lc.state_dir / "cluster.json").read_text())
    host = st.get("gateway", "127.0.0.1")
    k = admin_kube(lc.state_dir)
    labels = {"app.kubernetes.io/name": "pretrain-operator", "app.kubernetes.io/instance": RELEASE,
              "app.kubernetes.io/component": "metrics"}  # the chart's metrics Service's
    k.create_or_exists("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}})
    svc = f"/api/v1/namespaces/{OPERATOR_NS}/services"
    eps = f"/apis/discovery.k8s.io/v1/namespaces/{OPERATOR_NS}/endpointslices"
    # Replaced, not patched: the operator's port may differ from the last run's.
    k.delete(f"{svc}/{OPERATOR_SERVICE}")
    k.delete(f"{eps}/{OPERATOR_SERVICE}-host")
    k.create(svc, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": OPERATOR_SERVICE, "namespace": OPERATOR_NS, "labels": labels},
        "spec": {"clusterIP": "None", "ports": [{"name": "metrics", "port": port, "targetPort": port}]}})
    k.create(eps, {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{OPERATOR_SERVICE}-host", "namespace": OPERATOR_NS,
                     "labels": {**labels, "kubernetes.io/service-name": OPERATOR_SERVICE,
                                "endpointslice.kubernetes.io/managed-by": "local-cluster.pretrain.dev"}},
        "addressType": "IPv4", "ports": [{"name": "metrics", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [host], "conditions": {"ready": True}}]})
    return f"{host}:{port}"


def loss_curve(prom: Prometheus, namespace: str, job: str, start: float, end: float, step_s: float = 2.0,
               loss: str = "pretrain_loss", step: str = "pretrain_step") -> dict[str, list]:
    """attempt -> [(step, loss), ...] from range queries of the trainers' step and loss, joined on
    their sample times (both come from the same scrape of the same pod). With
    loss="pretrain_validation_loss", step="pretrain_validation_step": the held-out losses
    (spec.validation), each at the step it validated."""
    sel = f'namespace="{namespace}", pretrain_job="{job}", node_rank="0"'
    steps = {r["metric"].get("attempt", "?"): dict(r["values"])
             for r in prom.query_range(f"max by (attempt) ({step}{{{sel}}})", start, end, step_s)}
    out: dict[str, list] = {}
    for r in prom.query_range(f"max by (attempt) ({loss}{{{sel}}})", start, end, step_s):
        att = r["metric"].get("attempt", "?")
        pts = {int(float(steps[att][t])): float(v) for t, v in r["values"] if t in steps.get(att, {})}
        out[att] = sorted((s, lo) for s, lo in pts.items() if s > 0)
    return out


def plot_loss(curves: dict[str, list], out: Path, title: str, preempt_step: int | None = None,
              held_out: dict[str, list] | None = None) -> Path:
    """A PNG of loss against step, one colour per attempt, the held-out losses (`loss_curve` of
    the validation metrics) as black crosses, the preemption marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for att in sorted(curves, key=lambda a: int(a) if a.isdigit() else 0):
        pts = curves[att]
        if pts:
            ax.plot([s for s, _ in pts], [lo for _, lo in pts], marker=".", linewidth=1.2, label=f"attempt {att}")
    val = sorted({p for pts in (held_out or {}).values() for p in pts})
    if val:
        ax.plot([s for s, _ in val], [lo for _, lo in val], "kx", markersize=7, label="held-out loss (validation)")
    if preempt_step is not None:
        ax.axvline(preempt_step, color="red", linestyle="--", linewidth=1, label=f"spot reclaim (step {preempt_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
