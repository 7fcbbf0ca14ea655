"""Pod network namespaces: one per pod, a veth pair into the cluster bridge, the pod's IP from
its node's podCIDR, and only an on-link route to the cluster CIDR (no default route: nothing
leaves the bridge).

Names derive from the pod UID, so a restarted agent finds what it made: namespace
`ptp-<uid12>`, host-side veth `vp<uid12>`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

from .network import NetworkError, ip
from .procs import owned

NETNS_DIR = Path("/var/run/netns")


def netns_name(uid: str) -> str:
    return "ptp-" + uid.replace("-", "")[:12]


def veth_name(uid: str) -> str:
    return "vp" + uid.replace("-", "")[:12]


def netns_path(uid: str) -> Path:
    return NETNS_DIR / netns_name(uid)


def create(uid: str, pod_ip: str, cluster_cidr: str, bridge: str) -> str:
    """(Re)create the pod's namespace and link; returns the namespace path."""
    delete(uid)
    ns, host = netns_name(uid), veth_name(uid)
    prefix = ipaddress.ip_network(cluster_cidr).prefixlen
    ip("netns", "add", ns)
    ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", host, "master", bridge)
    ip("link", "set", host, "up")
    ip("-n", ns, "addr", "add", f"{pod_ip}/{prefix}", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "link", "set", "lo", "up")
    return str(netns_path(uid))


def delete(uid: str) -> None:
    host, ns = veth_name(uid), netns_name(uid)
    if ip("link", "show", host, check=False).returncode == 0:
        ip("link", "del", host, check=False)
    if (NETNS_DIR / ns).exists():
        r = ip("netns", "del", ns, check=False)
        if r.returncode != 0 and (NETNS_DIR / ns).exists():
            raise NetworkError(f"could not delete network namespace {ns}: {r.stderr.strip()}")


def pids_in(uid: str) -> list[int]:
    """Processes still inside the pod's network namespace (`ip netns pids`)."""
    r = subprocess.run(["ip", "netns", "pids", netns_name(uid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def sweep(state: dict) -> None:
    """Remove every pod namespace and veth of the cluster whose state folder is given (`down`,
    or a killed agent): their processes are killed first."""
    state_dir = state.get("state_dir")
    if not state_dir or os.geteuid() != 0:
        return
    pods_dir = Path(state_dir) / "pods"
    for pod_dir in pods_dir.glob("*") if pods_dir.is_dir() else []:
        uid_file = pod_dir / "uid"
        if not uid_file.exists():
            continue
        uid = uid_file.read_text().strip()
        recorded = []
        for run in pod_dir.glob("containers/*/*"):
            for f, key in (("shim.pid", None), ("container.json", "pid")):
                try:
                    txt = (run / f).read_text()
                    recorded.append(int(txt) if key is None else int(json.loads(txt)[key]))
                except (OSError, ValueError, KeyError):
                    pass
        for pid in recorded:
            if not owned(pid, state_dir):
                continue  # gone, or a recycled pid that is not ours
            try:
                os.killpg(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for pid in pids_in(uid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        delete(uid)
