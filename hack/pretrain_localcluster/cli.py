"""`hack/local-cluster`: the local cluster's command line.

    hack/local-cluster up [--nodes N] [--spot M]   # start (idempotent), print how to use it
    hack/local-cluster status [--json]
    hack/local-cluster down                          # stop what `up` started, remove the state
    hack/local-cluster preempt NODE [--notice S] [--notice-taint aws|gke|karpenter]
    hack/local-cluster fail-node NODE                # no notice: the node goes NotReady
    hack/local-cluster kubelet-down NODE             # NotReady too, but its pods' processes run on
    hack/local-cluster add-node [--spot] [--taint key=value:Effect]
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ClusterConfig
from .controlplane import ClusterError, LocalCluster
from .binaries import BinaryError
from .network import NetworkError
from . import nodes
from .nodes import NOTICE_TAINTS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="local-cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", help="state folder (default .local-cluster/, or $LOCAL_CLUSTER_DIR)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    upp = sub.add_parser("up", help="start the cluster (a running one is left alone)")
    upp.add_argument("--nodes", type=int, help="process nodes (default 4)")
    upp.add_argument("--spot", type=int, help="how many of them are spot (default 2)")
    upp.add_argument("--gpus", type=int, help="nvidia.com/gpu capacity per node (default 0)")
    upp.add_argument("--spot-taint", action="append", default=[], metavar="KEY=VALUE:EFFECT",
                     help="taint put on spot nodes (repeatable)")
    pre = sub.add_parser("preempt", help="spot reclaim: notice taint, wait, evict, kill, delete the Node")
    pre.add_argument("node")
    pre.add_argument("--notice", type=float, default=5.0, help="seconds between the notice and the reclaim")
    pre.add_argument("--notice-taint", choices=sorted(NOTICE_TAINTS), default="aws")
    fail = sub.add_parser("fail-node", help="the node dies without notice (goes NotReady)")
    fail.add_argument("node")
    kd = sub.add_parser("kubelet-down", help="the node's kubelet dies, its pods' processes run on (NotReady, unwatched)")
    kd.add_argument("node")
    add = sub.add_parser("add-node", help="bring capacity back")
    add.add_argument("--spot", action="store_true")
    add.add_argument("--taint", action="append", default=[], metavar="KEY=VALUE:EFFECT")
    prom = sub.add_parser("prometheus", help="start Prometheus beside the cluster (service discovery of the operator and trainer pods)")
    prom.add_argument("--operator-port", type=int, default=0,
                      help="also scrape an operator running on this machine with metrics on this port (make run-operator: 8000)")
    sub.add_parser("down", help="stop it and remove its state")
    st = sub.add_parser("status", help="what runs, where, and whether it is healthy")
    st.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    cfg = ClusterConfig.load(args.state_dir)
    cluster = LocalCluster(cfg)
    try:
        if args.cmd == "up":
            for field in ("nodes", "spot", "gpus"):
                if getattr(args, field) is not None:
                    setattr(cfg.nodes, "count" if field == "nodes" else field, getattr(args, field))
            cfg.nodes.spot_taints += args.spot_taint
            cluster.up()
        elif args.cmd == "prometheus":
            if not cluster.state():
                print(f"no local cluster in {cfg.state_dir}; start one with `make cluster-up`", file=sys.stderr)
                return 1
            from .monitoring import Prometheus, register_host_operator
            if args.operator_port:
                print(f"operator metrics registered at {register_host_operator(cluster, args.operator_port)}")
            print(f"prometheus: {Prometheus(cluster).up()}")
        elif args.cmd in ("preempt", "fail-node", "kubelet-down", "add-node"):
            if not cluster.state():
                print(f"no local cluster in {cfg.state_dir}; start one with `make cluster-up`", file=sys.stderr)
                return 1
            if args.cmd == "preempt":
                nodes.preempt(cfg.state_dir, args.node, args.notice, args.notice_taint)
            elif args.cmd == "fail-node":
                nodes.fail_node(cfg.state_dir, args.node)
                print(f"{args.node}: failed (heartbeats stopped, processes killed); NotReady within "
                      f"{cfg.node_monitor_grace_period}")
            elif args.cmd == "kubelet-down":
                nodes.kubelet_down(cfg.state_dir, args.node)
                print(f"{args.node}: kubelet down (heartbeats and status stopped, its pods' processes still running); "
                      f"NotReady within {cfg.node_monitor_grace_period}")
            else:
                print(f"added {nodes.add_node(cfg.state_dir, args.spot, args.taint)}")
        elif args.cmd == "down":
            cluster.down()
        elif args.cmd == "status":
            s = cluster.status()
            if args.json:
                print(json.dumps(s, indent=2))
            else:
                _print_status(s)
            return 0 if s["running"] else 3
    except (ClusterError, BinaryError, NetworkError, nodes.DrillError) as e:
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
        health = {True: "healthy", False: "DOWN", None: "running" if c["running"] else "DOWN"}[c["healthy"]]
        print(f"  {name:<24} pid {c['pid'] or '-':<8} {health}")
    net = s.get("pod_network") or {}
    if net.get("bridge"):
        print(f"  pod network: {net['cluster_cidr']} on bridge {net['bridge']} (gateway {net['gateway']})")


if __name__ == "__main__":
    sys.exit(main())
