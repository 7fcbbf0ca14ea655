"""Every default of the local cluster in one typed tree.

Nothing here starts anything: `ClusterConfig.load()` reads the pinned versions from
hack/versions.env and the environment overrides, and the other modules take what they need
from it. The state of a running cluster (ports actually chosen, pids) lives in
`<state_dir>/cluster.json`, written by `controlplane.up()`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

REPO_ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = REPO_ROOT / "hack"


def read_versions(path: Path = HACK_DIR / "versions.env") -> dict[str, str]:
    """The `KEY=value` pins of hack/versions.env (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


class Ports(BaseModel):
    """Preferred ports; a port already taken is replaced by a free one at start (and recorded)."""

    apiserver: int = 6443
    etcd_client: int = 12379
    etcd_peer: int = 12380
    etcd_metrics: int = 12381
    controller_manager: int = 10257
    scheduler: int = 10259
    coredns: int = 10053
    # CoreDNS also answers on port 53 of the pod network's gateway (resolv.conf has no port).
    coredns_pod: int = 53
    # The node agent's kubelet endpoint (logs), shared by all process nodes, on the gateway.
    kubelet: int = 10250


class NetworkConfig(BaseModel):
    """The pod network: one Linux bridge per cluster, no NAT and no route beyond it."""

    # Pod CIDRs are tried in order; a /16 already routed on this machine (another cluster) is skipped.
    cluster_cidrs: list[str] = Field(
        default_factory=lambda: [f"10.{n}.0.0/16" for n in range(244, 254)]
    )
    node_cidr_mask: int = 24
    service_cidr: str = "10.96.0.0/16"
    cluster_domain: str = "cluster.local"
    # Disable to run the control plane on loopback only (no root needed, but no process nodes).
    enabled: bool = True


class NodesConfig(BaseModel):
    """Process nodes started with the cluster (`up --nodes N --spot M`)."""

    count: int = 4
    spot: int = 2
    cpu: str = "8"
    memory: str = "16Gi"
    gpus: int = 0
    # Taints put on spot nodes at registration, e.g. ["cloud.google.com/gke-spot=true:NoSchedule"].
    spot_taints: list[str] = Field(default_factory=list)


class ClusterConfig(BaseModel):
    state_dir: Path = REPO_ROOT / ".local-cluster"
    nodes: NodesConfig = NodesConfig()
    ports: Ports = Ports()
    network: NetworkConfig = NetworkConfig()
    node_monitor_grace_period: str = "8s"
    # How long `up` waits for every component to report healthy before giving up.
    ready_timeout_s: float = 60.0
    versions: dict[str, str] = Field(default_factory=read_versions)

    @classmethod
    def load(cls, state_dir: str | Path | None = None) -> "ClusterConfig":
        env_dir = os.environ.get("LOCAL_CLUSTER_DIR")
        cfg = cls()
        if state_dir is not None or env_dir:
            cfg.state_dir = Path(state_dir or env_dir).resolve()
        if os.environ.get("LOCAL_CLUSTER_NETWORK", "").lower() in ("0", "false", "off", "no"):
            cfg.network.enabled = False
        return cfg

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"
