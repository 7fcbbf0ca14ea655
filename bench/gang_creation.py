"""The operator: time from `create` to all pods of a 4-node and a 32-node job existing, 100 jobs
x 4 pods applied at once, and the operator's memory.

    .venv/bin/python bench/gang_creation.py [--jobs 100]

Pods are left Pending (their nodeSelector matches no node), as in the peers' figures, so this
measures the operator, not the nodes. Baseline, in the same run: a client creating the very same
pods directly with the same concurrency (the floor for any controller on this API server).
Runs its own operator process on the session's local cluster (started if needed).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from pretrain_operator import api, render

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PodWatch, api_requests, cluster_with_crd, delete_namespaces, new_namespace, rss_mib, start_operator  # noqa: E402

POOL = 16


def job(name: str, nodes: int) -> dict:
    return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name},
            "spec": {"nodes": nodes, "parallelism": {"data": nodes}, "data": {"globalBatchSize": nodes},
                     "scheduling": {"nodeSelector": {"pretrain.dev/bench": "pending"}, "startTimeoutSeconds": 86400},
                     "template": {"command": ["sleep", "3600"]}}}


def direct(core, ns: str, jobs: list[tuple[str, int]]) -> float:
    """The baseline: the same pods, created straight from a client (fake owner, no operator)."""
    fake = {"metadata": {"name": "x", "namespace": ns, "uid": str(uuid.uuid4())}}
    spec = api.PretrainJobSpec.model_validate(job("x", 1)["spec"])
    pods = []
    for name, nodes in jobs:
        s = spec.model_copy(update={"nodes": nodes})
        fj = {"metadata": {**fake["metadata"], "name": name}}
        for p in render.gang(fj, s, 1):
            p["metadata"].pop("ownerReferences")
            pods.append(p)
    t0 = time.monotonic()
    with ThreadPoolExecutor(POOL) as ex:
        list(ex.map(lambda p: core.create_namespaced_pod(ns, p), pods))
    return time.monotonic() - t0


def new_ns(core) -> str:
    return new_namespace(core, f"bench-{uuid.uuid4().hex[:6]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--settle", type=float, default=20.0, help="seconds before the second memory reading")
    args = ap.parse_args(argv or [])
    lc, started_here, core, custom = cluster_with_crd()
    op = start_operator(lc)
    namespaces = []
    try:
        print(f"operator RSS idle (leading, no jobs yet): {rss_mib(op.pid):.0f} MiB")
        print(f"{'case':<34}{'baseline (direct)':>20}{'operator':>12}{'ratio':>8}")
        for nodes in (4, 32):
            ns = new_ns(core); namespaces.append(ns)
            base = direct(core, ns, [(f"direct{nodes}", nodes)])
            ns = new_ns(core); namespaces.append(ns)
            pw = PodWatch(core, ns)
            t0 = time.monotonic()
            custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, job(f"j{nodes}", nodes))
            t = pw.wait(nodes, t0)
            print(f"{f'one {nodes}-node job: all pods created':<34}{base:>19.2f}s{t:>11.2f}s{t / base:>7.1f}x")
        ns = new_ns(core); namespaces.append(ns)
        base = direct(core, ns, [(f"d{i}", 4) for i in range(args.jobs)])
        ns = new_ns(core); namespaces.append(ns)
        before = api_requests(op)
        pw = PodWatch(core, ns)
        t0 = time.monotonic()
        with ThreadPoolExecutor(POOL) as ex:
            list(ex.map(lambda i: custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL,
                                                                        job(f"j{i}", 4)), range(args.jobs)))
        t = pw.wait(4 * args.jobs, t0)
        print(f"{f'{args.jobs} jobs x 4 pods: all created':<34}{base:>19.2f}s{t:>11.2f}s{t / base:>7.1f}x")
        peak = rss_mib(op.pid)
        during = api_requests(op)
        time.sleep(args.settle)  # the jobs' status writes finish; freed heap goes back to the OS
        after = api_requests(op)
        print("operator's API requests per job: " + ", ".join(
            f"{m} {(during.get(m, 0) - before.get(m, 0)) / args.jobs:.1f} ({(after.get(m, 0) - before.get(m, 0)) / args.jobs:.1f} "
            f"{args.settle:.0f} s later)" for m in sorted(after)))
        print(f"operator RSS after {args.jobs + 2} jobs: {peak:.0f} MiB as the last pods appear, "
              f"{rss_mib(op.pid):.0f} MiB {args.settle:.0f} s later")
    finally:
        op.terminate()
        op.wait(20)
        delete_namespaces(core, namespaces)
        if started_here:
            lc.down(log=lambda *_: None)


if __name__ == "__main__":
    main(sys.argv[1:])
