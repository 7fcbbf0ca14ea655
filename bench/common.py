"""What the benches share: the session's local cluster (started if needed), the CRD applied, API
clients, our operator as a process, a process's memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

from pretrain_localcluster import binaries
from pretrain_localcluster.config import REPO_ROOT, ClusterConfig
from pretrain_localcluster.controlplane import LocalCluster


def rss_mib(pid: int) -> float:
    """A process's resident memory now, in MiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cluster_with_crd() -> tuple[LocalCluster, bool, client.CoreV1Api, client.CustomObjectsApi]:
    """The local cluster (and whether this call started it), with the CRD, and clients."""
    lc = LocalCluster(ClusterConfig.load())
    started_here = not (lc.state() and lc.is_running())
    lc.up(log=lambda *_: None)
    if lc.procs.running().get("operator"):  # `make demo`'s: it would hold the Lease the benchmark's operator needs
        print("stopping the operator `make demo` left running: the benchmarks run their own", file=sys.stderr)
        lc.procs.stop("operator")
    kubectl = str(binaries.locate(["kubectl"])["kubectl"])
    subprocess.run([kubectl, "--kubeconfig", str(lc.cfg.kubeconfig), "apply", "--server-side", "--force-conflicts",
                    "-f", str(REPO_ROOT / "crds")], check=True, capture_output=True)
    apic = config.new_client_from_config(config_file=str(lc.cfg.kubeconfig))
    apic.configuration.connection_pool_maxsize = 32
    return lc, started_here, client.CoreV1Api(apic), client.CustomObjectsApi(apic)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_operator(lc: LocalCluster, timeout: float = 60) -> subprocess.Popen:
    """`python -m pretrain_operator` against the cluster, once it leads: its metrics endpoint shows
    `pretrain_operator_leader 1.0` (a previous holder's Lease may have to expire first, 4 s here).
    An operator that exits, or does not lead within `timeout` s, is an error with its log's tail."""
    port = free_port()
    env = dict(os.environ, KUBECONFIG=str(lc.cfg.kubeconfig), PRETRAIN_OPERATOR_METRICS_PORT=str(port),
               PRETRAIN_OPERATOR_HEALTH_PORT="0", PRETRAIN_OPERATOR_LEASE_DURATION_S="4")
    log = tempfile.TemporaryFile(mode="w+")  # read only if it fails to start
    op = subprocess.Popen([sys.executable, "-m", "pretrain_operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    op.metrics_url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if op.poll() is not None:
            break
        if is_leader(op):
            return op
        time.sleep(0.2)
    if op.poll() is None:
        op.terminate()
        op.wait(20)
    log.seek(0)
    raise RuntimeError(f"the benchmark's operator did not become leader in {timeout:.0f} s (exit {op.returncode}): "
                       f"{log.read()[-2000:]}")


def is_leader(op: subprocess.Popen) -> bool:
    """Whether the operator's metrics say it holds the leader Lease (pretrain_operator_leader 1.0)."""
    try:
        text = urllib.request.urlopen(op.metrics_url, timeout=2).read().decode()
    except OSError:  # not serving yet
        return False
    return any(s.name == "pretrain_operator_leader" and s.value == 1.0
               for f in text_string_to_metric_families(text) for s in f.samples)


def api_requests(op: subprocess.Popen) -> dict[str, float]:
    """The operator's API requests so far, by HTTP method (its pretrain_operator_api_requests_total)."""
    text = urllib.request.urlopen(op.metrics_url, timeout=5).read().decode()
    return {s.labels["method"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "pretrain_operator_api_requests_total"}


class PodWatch:
    """Counts the pods that appear in a namespace, from one watch stream: the time the n-th pod
    appeared, without polling the API server with LISTs (which, every 20-50 ms, cost the API server
    more CPU than the controller under test and slowed it down)."""

    def __init__(self, core: client.CoreV1Api, ns: str):
        rv = core.list_namespaced_pod(ns, limit=1).metadata.resource_version
        self.seen: dict[str, float] = {}
        self.cv = threading.Condition()
        self.w = watch.Watch(return_type=object)  # plain dicts: no model per event in this process
        threading.Thread(target=self._run, args=(core, ns, rv), daemon=True).start()

    def _run(self, core, ns, rv) -> None:
        try:
            for ev in self.w.stream(core.list_namespaced_pod, ns, resource_version=rv, timeout_seconds=900):
                with self.cv:
                    self.seen.setdefault(ev["raw_object"]["metadata"]["name"], time.monotonic())
                    self.cv.notify_all()
        except Exception:  # noqa: BLE001  (the namespace went, or the stream was stopped: counting is over)
            pass

    def wait(self, n: int, t0: float, timeout: float = 600) -> float:
        """Seconds from t0 to the n-th pod's appearance; NaN after `timeout` without it."""
        with self.cv:
            if not self.cv.wait_for(lambda: len(self.seen) >= n, timeout):
                self.w.stop()
                return float("nan")
        self.w.stop()
        return sorted(self.seen.values())[n - 1] - t0


def new_namespace(core: client.CoreV1Api, name: str, timeout: float = 30) -> str:
    """Create a namespace and wait for its `default` ServiceAccount (pods are refused until the
    serviceaccount controller has made it)."""
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_service_account("default", name)
            return name
        except client.ApiException:
            time.sleep(0.1)
    raise TimeoutError(f"namespace {name}: no default ServiceAccount after {timeout} s")


def delete_namespaces(core: client.CoreV1Api, names: list[str], timeout: float = 300) -> None:
    """Delete the bench's namespaces and wait until they are gone: the namespace controller takes a
    minute over 400 pods, and the next measurement must not share the cores with it."""
    for ns in names:
        try:
            core.delete_namespace(ns)
        except client.ApiException:
            pass
    wait_namespaces_gone(core, names, timeout)


def wait_namespaces_gone(core: client.CoreV1Api, names: list[str], timeout: float = 300) -> None:
    """Wait until none of `names` is left (at most `timeout` s; then it says so and goes on)."""
    deadline = time.monotonic() + timeout
    while any(ns in {n.metadata.name for n in core.list_namespace().items} for ns in names):
        if time.monotonic() > deadline:
            print(f"namespaces still terminating after {timeout:.0f} s: {', '.join(names)}", file=sys.stderr)
            return
        time.sleep(1)
