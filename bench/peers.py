"""pretrain-operator against its peers on the same local control plane, in the same run: Kubeflow
Training Operator v1.8.1 (PyTorchJob) and JobSet v0.12.0, each alone on the cluster in turn.

    .venv/bin/python bench/peers.py [--jobs 100] [--skip jobset]

Measures, with pods left Pending (their nodeSelector matches no node): `create` to all 32 pods of
one 32-node job (median of 3); 100 jobs x 4 pods created at once to all 400 pods; the controller's RSS after.
The peers are built once from the Go module proxy into ~/.cache/pretrain-operator/peers/ (about
3 minutes); a peer that cannot be built or started is reported as such and skipped. Neither peer's
admission webhook is registered: the Training Operator's validation is not needed for valid jobs,
and JobSets are sent with the defaults its mutating webhook would add.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from kubernetes import client, config

from pretrain_localcluster import binaries
from pretrain_localcluster.config import REPO_ROOT, ClusterConfig
from pretrain_localcluster.controlplane import LocalCluster
from pretrain_operator import api

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PodWatch, delete_namespaces, free_port, new_namespace, rss_mib, start_operator  # noqa: E402

PEERS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pretrain-operator" / "peers"
TO_VERSION, JS_VERSION = "v1.8.1", "v0.12.0"
CERTS = Path("/tmp/k8s-webhook-server/serving-certs")
PENDING = {"pretrain.dev/bench": "pending"}
POOL = 16


def gomodcache() -> Path:
    return Path(subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip())


def build_peers() -> dict[str, Path | None]:
    to = PEERS / f"training-operator-{TO_VERSION}" / "training-operator.v1"
    js = PEERS / f"jobset-{JS_VERSION}" / "jobset"
    if not to.exists():
        subprocess.run(["go", "install", f"github.com/kubeflow/training-operator/cmd/training-operator.v1@{TO_VERSION}"],
                       env=dict(os.environ, GOBIN=str(to.parent)), capture_output=True)
    if not js.exists():
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(f"go mod init x && GOFLAGS=-mod=mod go get sigs.k8s.io/jobset@{JS_VERSION} && "
                           f"CGO_ENABLED=0 go build -o {js} sigs.k8s.io/jobset", shell=True, cwd=d, capture_output=True)
    return {"training-operator": to if to.exists() else None, "jobset": js if js.exists() else None}


class Bench:
    def __init__(self, lc: LocalCluster):
        self.lc = lc
        self.kubectl = str(binaries.locate(["kubectl"])["kubectl"])
        apic = config.new_client_from_config(config_file=str(lc.cfg.kubeconfig))
        apic.configuration.connection_pool_maxsize = 32
        self.core, self.custom = client.CoreV1Api(apic), client.CustomObjectsApi(apic)

    def k(self, *args, input=None, check=True):
        return subprocess.run([self.kubectl, "--kubeconfig", str(self.lc.cfg.kubeconfig), *args], input=input,
                              capture_output=True, text=True, check=check)

    def ns(self) -> str:
        return new_namespace(self.core, f"peer-{uuid.uuid4().hex[:6]}")

    def timed(self, ns: str, create, n_pods: int, timeout: float = 120) -> float:
        pw = PodWatch(self.core, ns)
        t0 = time.monotonic()
        create()
        return pw.wait(n_pods, t0, timeout)

    def run_case(self, make_body, group, version, plural, pods_per_job, jobs) -> float:
        ns = self.ns()
        bodies = [make_body(f"j{i}") for i in range(jobs)]

        def create():
            with ThreadPoolExecutor(POOL) as ex:
                list(ex.map(lambda b: self.custom.create_namespaced_custom_object(group, version, ns, plural, b), bodies))
        try:
            return self.timed(ns, create, pods_per_job * jobs)
        finally:
            delete_namespaces(self.core, [ns])


def ptj(nodes: int):
    return lambda name: {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name},
                         "spec": {"nodes": nodes, "parallelism": {"data": nodes}, "data": {"globalBatchSize": nodes},
                                  "scheduling": {"nodeSelector": PENDING, "startTimeoutSeconds": 86400},
                                  "template": {"command": ["sleep", "3600"]}}}


def pytorchjob(nodes: int):
    def tmpl():
        return {"spec": {"nodeSelector": PENDING, "containers": [{"name": "pytorch", "image": "local", "command": ["sleep", "3600"]}]}}
    return lambda name: {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
                         "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": tmpl()},
                                                          **({"Worker": {"replicas": nodes - 1, "template": tmpl()}} if nodes > 1 else {})}}}


def jobset(nodes: int):
    # With the defaults its mutating webhook would set (pkg/webhooks/jobset_webhook.go, Default):
    # no webhook is registered here, and the controller expects them.
    return lambda name: {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": name},
                         "spec": {"successPolicy": {"operator": "All"}, "startupPolicy": {"startupPolicyOrder": "AnyOrder"},
                                  "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
                                  "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": {
                             "parallelism": nodes, "completions": nodes, "backoffLimit": 0, "completionMode": "Indexed",
                             "template": {"spec": {"nodeSelector": PENDING, "restartPolicy": "Never",
                                                   "containers": [{"name": "c", "image": "local", "command": ["sleep", "3600"]}]}}}}}]}}


def start_ours(b: Bench) -> subprocess.Popen:
    b.k("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    return start_operator(b.lc)


def start_training_operator(b: Bench, exe: Path) -> subprocess.Popen:
    crd = gomodcache() / f"github.com/kubeflow/training-operator@{TO_VERSION}/manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
    b.k("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    b.k("create", "namespace", "kubeflow", check=False)
    b.k("-n", "kubeflow", "create", "secret", "generic", "training-operator-webhook-cert", check=False)
    b.k("apply", "-f", "-", input="apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\n"
                                  "metadata: {name: validator.training-operator.kubeflow.org}\nwebhooks: []\n")
    argv = [str(exe), "--kubeconfig", str(b.lc.cfg.kubeconfig), "--enable-scheme", "pytorchjob",
            "--metrics-bind-address", f"127.0.0.1:{free_port()}", "--health-probe-bind-address", f"127.0.0.1:{free_port()}",
            "--webhook-server-port", str(free_port())]
    # First start writes its webhook certificate into the Secret; the webhook server reads it from disk.
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        data = yaml.safe_load(b.k("-n", "kubeflow", "get", "secret", "training-operator-webhook-cert", "-o", "yaml").stdout).get("data") or {}
        if "tls.crt" in data:
            break
        time.sleep(0.5)
    p.terminate()
    p.wait(20)
    CERTS.mkdir(parents=True, exist_ok=True)
    for k in ("tls.crt", "tls.key"):
        (CERTS / k).write_bytes(base64.b64decode(data[k]))
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    return p


def start_jobset(b: Bench, exe: Path) -> subprocess.Popen:
    crd = gomodcache() / f"sigs.k8s.io/jobset@{JS_VERSION}/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml"
    b.k("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    if not (CERTS / "tls.crt").exists():
        CERTS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=jobset",
                        "-keyout", str(CERTS / "tls.key"), "-out", str(CERTS / "tls.crt")], capture_output=True, check=True)
    cfg = Path(tempfile.mkdtemp()) / "config.yaml"
    cfg.write_text(yaml.safe_dump({"apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
                                   "internalCertManagement": {"enable": False}, "leaderElection": {"leaderElect": False},
                                   "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
                                   "health": {"healthProbeBindAddress": f"127.0.0.1:{free_port()}"},
                                   "webhook": {"port": free_port()}}))
    log = PEERS / "jobset.log"  # kept: what it said, when it creates nothing
    p = subprocess.Popen([str(exe), "--config", str(cfg), "--kubeconfig", str(b.lc.cfg.kubeconfig)],
                         stdout=log.open("w"), stderr=subprocess.STDOUT)
    time.sleep(8)
    return p


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--skip", action="append", default=[], choices=["training-operator", "jobset"])
    a = ap.parse_args(argv or [])
    peers = build_peers()
    for k in a.skip:
        peers[k] = None
    lc = LocalCluster(ClusterConfig.load())
    started_here = not (lc.state() and lc.is_running())
    lc.up(log=lambda *_: None)
    b = Bench(lc)
    rows = []
    contenders = [("pretrain-operator", lambda: start_ours(b), ptj, (api.GROUP, api.VERSION, api.PLURAL))]
    if peers["training-operator"]:
        contenders.append((f"Training Operator {TO_VERSION}", lambda: start_training_operator(b, peers["training-operator"]),
                           pytorchjob, ("kubeflow.org", "v1", "pytorchjobs")))
    if peers["jobset"]:
        contenders.append((f"JobSet {JS_VERSION}", lambda: start_jobset(b, peers["jobset"]), jobset,
                           ("jobset.x-k8s.io", "v1alpha2", "jobsets")))
    try:
        for name, start, body, gvp in contenders:
            proc = start()
            try:
                if proc.poll() is not None:
                    rows.append((name, float("nan"), float("nan"), float("nan")))
                    continue
                one = statistics.median(b.run_case(body(32), *gvp, 32, 1) for _ in range(3))
                many = b.run_case(body(4), *gvp, 4, a.jobs) if one == one else float("nan")  # nan: it does not work here
                rows.append((name, one, many, rss_mib(proc.pid)))
            finally:
                proc.terminate()
                proc.wait(30)
        print(f"{'controller':<28}{'one 32-node job':>17}{f'{a.jobs} jobs x 4 pods':>20}{'RSS after':>12}")
        ours = rows[0]
        for name, one, many, mem in rows:
            rel = "" if name == ours[0] else f"  (ours: {ours[1] / one:4.2f}x and {ours[2] / many:4.2f}x its time)"
            print(f"{name:<28}{one:>16.2f}s{many:>19.2f}s{mem:>10.0f} MiB{rel}")
        for k, v in peers.items():
            if v is None:
                print(f"{k}: skipped (--skip, or it could not be built here)")
        if any(x != x for row in rows for x in row[1:3]):
            print("nan: no pods within 120 s (the controller did not reconcile on this cluster)")
    finally:
        if started_here:
            lc.down(log=lambda *_: None)


if __name__ == "__main__":
    main(sys.argv[1:])
