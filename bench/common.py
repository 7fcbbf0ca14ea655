"""What the benches share: the session's local cluster (started if needed), the CRD applied, API
clients, our operator as a process, a process's memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from kubernetes import client, config

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


def start_operator(lc: LocalCluster) -> subprocess.Popen:
    """`python -m pretrain_operator` against the cluster, once it leads (a previous holder's Lease may have to expire)."""
    env = dict(os.environ, KUBECONFIG=str(lc.cfg.kubeconfig), PRETRAIN_OPERATOR_METRICS_PORT=str(free_port()),
               PRETRAIN_OPERATOR_HEALTH_PORT="0", PRETRAIN_OPERATOR_LEASE_DURATION_S="4")
    op = subprocess.Popen([sys.executable, "-m", "pretrain_operator"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    return op
