"""Local control plane: warm start-to-ready time and idle memory.

    .venv/bin/python bench/control_plane.py [--runs 3]

Starts throwaway clusters in temporary state folders (the session's cluster, if any, is left
alone). Baseline, measured in the same run: etcd plus kube-apiserver alone, started with the same
flags (the floor any Kubernetes needs). The full control plane adds the controller-manager,
scheduler, CoreDNS and the pod network. Cold build times are not re-measured here (10 minutes);
bench/cold_build.sh does that with an empty Go cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pretrain_localcluster import binaries
from pretrain_localcluster.config import ClusterConfig
from pretrain_localcluster.controlplane import COMPONENTS, LocalCluster, _ssl_context

from common import rss_mib


def baseline_once(tmp: Path) -> float:
    """etcd + kube-apiserver only, to /readyz."""
    lc = LocalCluster(ClusterConfig.load(tmp / "base"))
    cfg = lc.cfg
    cfg.network.enabled = False
    lc.state_dir.mkdir(parents=True)
    from pretrain_localcluster.controlplane import pick_ports, _free_port
    ports, _ = pick_ports(cfg, "127.0.0.1", None)
    st = {"ports": ports, "server": f"https://127.0.0.1:{ports['apiserver']}", "coredns_ready_port": _free_port("127.0.0.1")}
    lc._write_state(st)
    lc._make_pki(st)
    argv = lc._argv(binaries.locate(), st)
    t0 = time.monotonic()
    lc.procs.start("etcd", argv["etcd"])
    lc.procs.start("kube-apiserver", argv["kube-apiserver"])
    lc._wait("kube-apiserver", f"{st['server']}/readyz", _ssl_context(lc.pki))
    dt = time.monotonic() - t0
    lc.down(log=lambda *_: None)
    return dt


def full_once(tmp: Path, idle_s: float) -> tuple[float, dict[str, float]]:
    lc = LocalCluster(ClusterConfig.load(tmp / "full"))
    t0 = time.monotonic()
    lc.up(log=lambda *_: None)
    dt = time.monotonic() - t0
    mem = {}
    if idle_s:
        time.sleep(idle_s)
        mem = {n: rss_mib(p) for n, p in lc.procs.pids().items() if n in COMPONENTS}
    lc.down(log=lambda *_: None)
    return dt, mem


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=15.0, help="seconds idle before reading RSS")
    args = ap.parse_args(argv or [])
    binaries.ensure()
    base, full, mem = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as d:
        for i in range(args.runs):
            base.append(baseline_once(Path(d) / f"b{i}"))
            t, m = full_once(Path(d) / f"f{i}", args.idle if i == 0 else 0)
            full.append(t)
            mem = mem or m
    b, f = statistics.median(base), statistics.median(full)
    print(f"start-to-ready, median of {args.runs}:")
    print(f"  baseline etcd+apiserver      {b:6.2f} s")
    print(f"  full local control plane     {f:6.2f} s   ratio {f / b:4.2f}x baseline  (goal <= 10 s)")
    print(f"idle RSS after {args.idle:.0f} s:")
    for n in COMPONENTS:
        print(f"  {n:<26} {mem.get(n, 0):7.1f} MiB")
    print(f"  {'total':<26} {sum(mem.values()):7.1f} MiB")


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
