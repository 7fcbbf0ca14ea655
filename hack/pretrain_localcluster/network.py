"""The pod network's host side: one Linux bridge per cluster holding the gateway address.

Pods (process nodes) attach veth pairs to it. There is no NAT and no forwarding: the bridge
carries traffic among this cluster's pods and between them and the host's gateway address, where
the API server and CoreDNS listen. Needs root (CAP_NET_ADMIN); without it the cluster runs on
loopback only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def can_manage() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "ip"], capture_output=True).returncode == 0


def bridge_name(state_dir: str) -> str:
    """Deterministic per state folder, at most 15 characters (the kernel's limit)."""
    return "ptc" + hashlib.sha1(state_dir.encode()).hexdigest()[:8]


def routed_networks() -> list[ipaddress.IPv4Network]:
    out = []
    for r in json.loads(ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = r.get("dst", "")
        if dst and dst != "default" and "/" in dst:
            try:
                out.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                pass
    return out


def choose_cidr(candidates: list[str]) -> str:
    taken = routed_networks()
    for c in candidates:
        net = ipaddress.ip_network(c)
        if not any(net.overlaps(t) for t in taken):
            return c
    raise NetworkError(f"every candidate pod CIDR is already routed on this machine: {candidates}")


def gateway_of(cidr: str) -> str:
    return str(next(ipaddress.ip_network(cidr).hosts()))


def create_bridge(name: str, cidr: str) -> str:
    """(Re)create the bridge with the gateway address; returns the gateway."""
    delete_bridge(name)
    gw = gateway_of(cidr)
    prefix = ipaddress.ip_network(cidr).prefixlen
    ip("link", "add", name, "type", "bridge")
    ip("addr", "add", f"{gw}/{prefix}", "dev", name)
    ip("link", "set", name, "up")
    return gw


def delete_bridge(name: str) -> None:
    if ip("link", "show", name, check=False).returncode == 0:
        ip("link", "del", name)
