"""`hack/local-cluster up|down|status`: the local cluster's command line.

    hack/local-cluster up [--nodes N] [--spot M]   # start (idempotent), print how to use it
    hack/local-cluster status [--json]
    hack/local-cluster down                          # stop what `up` started, remove the state
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ClusterConfig
from .controlplane import ClusterError, LocalCluster
from .binaries import BinaryError
from .network import NetworkError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="local-cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", help="state folder (default .local-cluster/, or $LOCAL_CLUSTER_DIR)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start the cluster (a running one is left alone)")
    sub.add_parser("down", help="stop it and remove its state")
    st = sub.add_parser("status", help="what runs, where, and whether it is healthy")
    st.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    cluster = LocalCluster(ClusterConfig.load(args.state_dir))
    try:
        if args.cmd == "up":
            cluster.up()
        elif args.cmd == "down":
            cluster.down()
        elif args.cmd == "status":
            s = cluster.status()
            if args.json:
                print(json.dumps(s, indent=2))
            else:
                _print_status(s)
            return 0 if s["running"] else 3
    except (ClusterError, BinaryError, NetworkError) as e:
        print(f"local-cluster {args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


def _print_status(s: dict) -> None:
    if not s.get("server"):
        print(f"no local cluster in {s['state_dir']} (start one with `make cluster-up`)")
        return
    print(f"local cluster {'running' if s['running'] else 'NOT healthy'}: {s['server']}")
    print(f"  kubeconfig: {s['kubeconfig']}")
    for name, c in s["components"].items():
        print(f"  {name:<24} pid {c['pid'] or '-':<8} {'healthy' if c['healthy'] else 'DOWN'}")
    net = s.get("pod_network") or {}
    if net.get("bridge"):
        print(f"  pod network: {net['cluster_cidr']} on bridge {net['bridge']} (gateway {net['gateway']})")


if __name__ == "__main__":
    sys.exit(main())
