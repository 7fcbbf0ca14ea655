"""Time from a spot reclaim to the job's new gang running, against the time the job's first gang
took to start (the baseline, same job, same run).

    .venv/bin/python bench/recovery.py [--runs 3]

Each run: a 2-node PretrainJob (the contract's stand-in trainer, so only the operator and the
cluster are measured) on a pool of 3 fresh spot nodes; once it runs, the node of rank 0 is
reclaimed with no notice (eviction, then the Node deleted); the clock stops when the job is
Running again as attempt 2 (every pod of the new gang running).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

from pretrain_localcluster import nodes
from pretrain_localcluster.config import REPO_ROOT

from pretrain_operator import api

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cluster_with_crd, delete_namespaces, new_namespace, start_operator  # noqa: E402

STANDIN = str(REPO_ROOT / "tests" / "standin_trainer.py")


def status(custom, ns, name) -> dict:
    return custom.get_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, name).get("status") or {}


def wait(pred, timeout=180):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


def one(lc, core, custom, run: int) -> tuple[float, float]:
    label = uuid.uuid4().hex[:6]
    pool = [nodes.add_node(lc.state_dir, spot=True, labels={"pretrain.dev/bench-pool": label}) for _ in range(3)]
    ns = f"bench-rec-{label}"
    new_namespace(core, ns)
    core.create_namespaced_persistent_volume_claim(ns, {"metadata": {"name": "ckpt"}, "spec": {
        "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    body = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": "rec"},
            "spec": {"nodes": 2, "parallelism": {"data": 2}, "data": {"globalBatchSize": 16},
                     "training": {"steps": 100000}, "optimizer": {"warmupSteps": 0},
                     "checkpoint": {"claimName": "ckpt", "intervalSteps": 5},
                     "scheduling": {"nodeSelector": {"pretrain.dev/bench-pool": label}},
                     "template": {"command": ["python", STANDIN], "terminationGracePeriodSeconds": 5}}}
    try:
        t0 = time.monotonic()
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, body)
        wait(lambda: status(custom, ns, "rec").get("phase") == "Running")
        first = time.monotonic() - t0
        time.sleep(2)
        pod = core.read_namespaced_pod("rec-a1-n0", ns)
        t1 = time.monotonic()
        nodes.preempt(lc.state_dir, pod.spec.node_name, notice_s=0, log=lambda *_: None)
        wait(lambda: (lambda s: s.get("phase") == "Running" and s.get("attempt") == 2)(status(custom, ns, "rec")))
        return first, time.monotonic() - t1
    finally:
        # The namespace gone (its pods ended on their nodes) before the pool goes and the next run
        # starts: runs must not overlap. remove_node stops each node's agent too (deleting only the
        # Node left it renewing a lease); the reclaimed node is gone already (a no-op).
        delete_namespaces(core, [ns])
        for n in pool:
            try:
                nodes.remove_node(lc.state_dir, n)
            except nodes.DrillError:  # no longer in the cluster's node list
                pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv or [])
    lc, started_here, core, custom = cluster_with_crd()
    op = start_operator(lc)
    try:
        results = [one(lc, core, custom, i) for i in range(a.runs)]
        first = statistics.median(r[0] for r in results)
        rec = statistics.median(r[1] for r in results)
        print(f"2-node job, median of {a.runs} (stand-in trainer, pods on process nodes):")
        print(f"  baseline: create to first gang running      {first:6.2f} s")
        print(f"  spot reclaim to the new gang running         {rec:6.2f} s   ratio {rec / first:4.2f}x")
    finally:
        op.terminate()
        op.wait(20)
        if started_here:
            lc.down(log=lambda *_: None)


if __name__ == "__main__":
    main(sys.argv[1:])
