"""Process nodes: time from pod creation to its process running, pods started per second with 50
at once, and the node agent's memory.

    .venv/bin/python bench/pods.py [--pods 50] [--single 5]

Runs against the session's local cluster (started if needed, left as found). Baseline, measured
in the same run: the same command started directly as a local process (`subprocess`), the floor
that any way of running it as a pod adds to.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid

from pretrain_localcluster.config import ClusterConfig
from pretrain_localcluster.controlplane import LocalCluster
from pretrain_localcluster.nodes import admin_kube

from common import rss_mib

CMD = ["sh", "-c", "date +%s.%N; exec sleep 3600"]


def direct_once() -> float:
    t0 = time.time()
    p = subprocess.Popen(CMD, stdout=subprocess.PIPE, text=True)
    started = float(p.stdout.readline())
    p.kill()
    p.wait()
    return started - t0


def pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 0, "restartPolicy": "Never",
                     "containers": [{"name": "c", "image": "local", "command": CMD}]}}


def first_line(kube, ns: str, name: str) -> float | None:
    try:
        r = kube.http.request("GET", f"{kube.server}/api/v1/namespaces/{ns}/pods/{name}/log", retries=False)
        if r.status == 200 and r.data.strip():
            return float(r.data.split()[0])
    except Exception:  # noqa: BLE001
        pass
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--single", type=int, default=5)
    args = ap.parse_args(argv or [])
    lc = LocalCluster(ClusterConfig.load())
    started_here = not (lc.state() and lc.is_running())
    lc.up(log=lambda *_: None)
    kube = admin_kube(lc.state_dir)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    while kube.get_or_none(f"/api/v1/namespaces/{ns}/serviceaccounts/default") is None:
        time.sleep(0.1)
    try:
        direct = statistics.median(direct_once() for _ in range(args.single))
        single = []
        for i in range(args.single):
            t0 = time.time()
            kube.create(f"/api/v1/namespaces/{ns}/pods", pod(f"one-{i}"))
            while (t := first_line(kube, ns, f"one-{i}")) is None:
                time.sleep(0.02)
            single.append(t - t0)
        s = statistics.median(single)
        print(f"pod creation to process running, median of {args.single}:")
        print(f"  baseline: the command as a local process  {direct * 1000:7.1f} ms")
        print(f"  as a pod on a process node                {s * 1000:7.1f} ms   ratio {s / direct:6.1f}x baseline")

        t0 = time.time()
        for i in range(args.pods):
            kube.create(f"/api/v1/namespaces/{ns}/pods", pod(f"many-{i}"))
        running = set()
        while len(running) < args.pods:
            for p in kube.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="")["items"]:
                if p["metadata"]["name"].startswith("many-") and (p.get("status") or {}).get("phase") == "Running":
                    running.add(p["metadata"]["name"])
            time.sleep(0.1)
        dt = time.time() - t0
        t1 = time.time()
        procs = [subprocess.Popen(CMD, stdout=subprocess.PIPE) for _ in range(args.pods)]
        for p in procs:
            p.stdout.readline()
        dt_direct = time.time() - t1
        for p in procs:
            p.kill()
            p.wait()
        print(f"{args.pods} pods at once, created to all Running:")
        print(f"  baseline: {args.pods} local processes      {dt_direct:7.2f} s")
        print(f"  as pods                               {dt:7.2f} s   {args.pods / dt:5.1f} pods/s, ratio {dt / dt_direct:6.1f}x baseline")
        pid = lc.procs.pids()["node-agent"]
        print(f"node agent RSS with {args.pods + args.single} pods: {rss_mib(pid):.0f} MiB")
    finally:
        # Gone before this returns (its pods' processes stopped): the next benchmark must not share
        # the cores with the namespace controller and the node agent tearing down 55 pods.
        kube.delete(f"/api/v1/namespaces/{ns}")
        deadline = time.monotonic() + 300
        while kube.get_or_none(f"/api/v1/namespaces/{ns}") is not None and time.monotonic() < deadline:
            time.sleep(1)
        if started_here:
            lc.down(log=lambda *_: None)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
