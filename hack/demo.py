"""`make demo`: a PretrainJob trains a small Llama-style model over 2 pods x 4 processes (pipeline,
data and tensor parallel) on the local cluster, a spot node running one of its ranks is reclaimed
mid-run (termination notice, eviction, node deleted), and the job carries on from its checkpoint
as a new attempt.

    make demo                    # set-up included; leaves the cluster and the operator running
    .venv/bin/python hack/demo.py [--steps 200] [--preempt-at 0.4]

Steps: start the cluster (4 nodes, 2 spot) and the operator (logs in .local-cluster/logs/
operator.log), make a corpus and tokenizer from the Python standard library's sources (nothing is
downloaded), apply examples/quickstart.yaml (with the corpus and a spot preference), show progress,
preempt, show the restart, print the summary with the phases' timings, and draw loss against step
(`.local-cluster/demo/loss.png`) from Prometheus' range queries. Prometheus runs beside the cluster
(`hack/local-cluster prometheus`), discovering the operator and the trainer pods.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

from pretrain_localcluster import binaries, network, nodes  # noqa: E402
from pretrain_localcluster.config import ClusterConfig  # noqa: E402
from pretrain_localcluster.controlplane import LocalCluster  # noqa: E402
from pretrain_localcluster.monitoring import Prometheus, loss_curve, plot_loss, register_host_operator  # noqa: E402


def kubectl(lc: LocalCluster, *args: str, input: str | None = None) -> str:
    exe = str(binaries.locate(["kubectl"])["kubectl"])
    r = subprocess.run([exe, "--kubeconfig", str(lc.cfg.kubeconfig), *args], input=input, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def corpus(lc: LocalCluster) -> Path:
    out = lc.state_dir / "data" / "stdlib"
    if (out / "manifest.json").exists():
        return out
    src = lc.state_dir / "data" / "stdlib-src"
    src.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "email", "http", "logging", "asyncio"):
        for f in sorted((stdlib / name).glob("*.py")):
            (src / f"{name}-{f.name}").write_text(f.read_text(errors="replace"))
    print(f"== corpus: {len(list(src.glob('*.py')))} files of the Python standard library -> BPE tokenizer and shards")
    subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(out),
                    "--vocab-size", "512"], check=True)
    return out


def layout(docs: list[dict]) -> str:
    """"2 pods x 4 processes (pipeline 2 x data 2 x tensor 2)", from the manifest."""
    spec = next(d for d in docs if d["kind"] == "PretrainJob")["spec"]
    par = " x ".join(f"{k} {spec['parallelism'][k]}" for k in ("pipeline", "data", "tensor", "expert")
                     if spec["parallelism"].get(k, 1) > 1)
    return f"{spec['nodes']} pods x {spec.get('nprocPerNode', 1)} processes ({par})"


def job_manifest(data: Path, steps: int) -> list[dict]:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "PretrainJob")
    job["spec"]["data"]["path"] = str(data)
    job["spec"]["training"]["steps"] = steps
    # Prefer spot capacity (as a cost-conscious user would): the reclaim hits the job.
    job["spec"]["scheduling"] = {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchExpressions": [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]}]}}]}}}
    job["spec"]["template"] = {"terminationGracePeriodSeconds": 30}
    return docs


def status(lc: LocalCluster) -> dict:
    out = kubectl(lc, "get", "ptj", "quickstart", "-o", "json")
    return json.loads(out).get("status") or {}


def line(st: dict) -> str:
    pr = st.get("progress") or {}
    ck = (st.get("lastCheckpoint") or {}).get("step", "-")
    loss = pr.get("loss")
    return (f"phase {st.get('phase', '?'):<10} attempt {st.get('attempt', 0)}  step {pr.get('step', 0):>4}/{pr.get('totalSteps', '?')}"
            f"  loss {loss if loss is not None else '-':<7}  held-out {pr.get('validationLoss', '-'):<7}  tok/s {pr.get('tokensPerSecond', '-'):<7}  checkpoint {ck:<5}"
            f"  ready {st.get('readyNodes', '-')}  preemptions {st.get('preemptions', 0)} failures {st.get('failures', 0)}")


def export_hf(lc: LocalCluster, st: dict) -> Path | None:
    """The last checkpoint, from the job's claim, as a Hugging Face folder (`pretrain_trainer export`)."""
    if not (st.get("lastCheckpoint") or {}).get("step"):
        return None
    pvc = json.loads(kubectl(lc, "get", "pvc", "quickstart-checkpoints", "-o", "json"))
    pv = json.loads(kubectl(lc, "get", "pv", pvc["spec"]["volumeName"], "-o", "json"))
    volume = Path(pv["spec"]["hostPath"]["path"])
    cfg = yaml.safe_load(kubectl(lc, "get", "configmap", "quickstart-config", "-o", "jsonpath={.data.config\\.yaml}"))
    cfg["checkpoint"]["path"] = str(volume)
    out = lc.state_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.yaml").write_text(yaml.safe_dump(cfg))
    step = st["lastCheckpoint"]["step"]
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "export", "--config", str(out / "job.yaml"),
                        "--checkpoint", str(volume / f"step-{step:08d}"), "--out", str(out / "hf")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"   export to Hugging Face failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    return out / "hf"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--preempt-at", type=float, default=0.4, help="fraction of the steps at which to reclaim a spot node")
    a = ap.parse_args()
    lc = LocalCluster(ClusterConfig.load())
    t_start = time.monotonic()
    phases: dict[str, float] = {}
    if not network.can_manage():
        print("make demo: process nodes need root and the `ip` command (iproute2): run it as root", file=sys.stderr)
        return 2
    lc.up()
    # A run before reclaimed a spot node for good: bring the nodes back (the demo reclaims one again).
    nodes.top_up(lc.state_dir, lc.cfg.nodes.count, lc.cfg.nodes.spot, lc.cfg.nodes.spot_taints,
                 log=lambda m: print(f"== {m}"))
    phases["cluster start"] = time.monotonic() - t_start
    kubectl(lc, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    if not lc.procs.running().get("operator"):
        lc.procs.start("operator", [sys.executable, "-m", "pretrain_operator"],
                       env={**__import__("os").environ, "KUBECONFIG": str(lc.cfg.kubeconfig),
                            "PRETRAIN_OPERATOR_METRICS_PORT": "18000", "PRETRAIN_OPERATOR_HEALTH_PORT": "18080"})
        print("== operator started (log: .local-cluster/logs/operator.log, metrics: http://127.0.0.1:18000/metrics)")
    t = time.monotonic()
    prom = Prometheus(lc)
    prom_url = prom.up()
    register_host_operator(lc, 18000)
    phases["prometheus start"] = time.monotonic() - t
    print(f"== prometheus: {prom_url} (scrapes the operator and the trainer pods through Kubernetes service discovery)")
    t = time.monotonic()
    data = corpus(lc)
    phases["data preparation"] = time.monotonic() - t
    subprocess.run([str(binaries.locate(["kubectl"])["kubectl"]), "--kubeconfig", str(lc.cfg.kubeconfig),
                    "delete", "ptj", "quickstart", "--ignore-not-found", "--wait=true"], capture_output=True)
    kubectl(lc, "delete", "pvc", "quickstart-checkpoints", "--ignore-not-found", "--wait=true")
    docs = job_manifest(data, a.steps)
    kubectl(lc, "apply", "-f", "-", input=yaml.safe_dump_all(docs))
    print(f"== applied examples/quickstart.yaml: {layout(docs)}, {a.steps} steps")
    t0 = time.monotonic()
    wall0 = time.time()
    preempted = None
    t_preempt = t_reclaimed = None
    step_at_preemption = None
    last = ""
    while True:
        st = status(lc)
        ln = line(st)
        if ln != last:
            print(f"  [{time.monotonic() - t0:6.1f}s] {ln}", flush=True)
            last = ln
        step = (st.get("progress") or {}).get("step", 0)
        if step > 0 and "apply to first step" not in phases:
            phases["apply to first step"] = time.monotonic() - t0
        if preempted is None and st.get("phase") == "Running" and step >= a.preempt_at * a.steps:
            pods = json.loads(kubectl(lc, "get", "pods", "-l", "pretrain.dev/job=quickstart", "-o", "json"))["items"]
            node_labels = {n["metadata"]["name"]: n["metadata"]["labels"]
                           for n in json.loads(kubectl(lc, "get", "nodes", "-o", "json"))["items"]}
            spot = [p["spec"]["nodeName"] for p in pods
                    if node_labels.get(p["spec"].get("nodeName"), {}).get("karpenter.sh/capacity-type") == "spot"]
            target = spot[0] if spot else pods[0]["spec"]["nodeName"]
            step_at_preemption = step
            t_preempt = time.time()
            print(f"== spot reclaim of {target} (runs a rank of the job): termination notice, 5 s, eviction, node deleted")
            nodes.preempt(lc.state_dir, target, notice_s=5.0, taint="gke", log=lambda m: print(f"   {m}"))
            t_reclaimed = time.time()  # the notice's 5 s are over: the node is gone
            preempted = target
        if st.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(1.0)
    st = status(lc)
    resumed = (st.get("restart") or {})
    print()
    pr = st.get("progress") or {}
    print(f"== {st.get('phase')}: final loss {pr.get('loss')} (held-out {pr.get('validationLoss')}), attempts {st.get('attempt')}, "
          f"preemptions {st.get('preemptions')}, failures {st.get('failures')}; {st.get('runningSeconds', 0)} s with every node up")
    if preempted:
        logs = kubectl(lc, "logs", "quickstart-a2-n0") if st.get("attempt", 1) >= 2 else ""
        r = [ln for ln in logs.splitlines() if "resumed from" in ln]
        from_step = int(r[0].rsplit("step-", 1)[1]) if r else 0
        lost = st.get("lostSteps", 0)  # the operator's count, from rank 0's final report too (polling here misses steps)
        r = prom.query_range('max(pretrain_step{namespace="default", pretrain_job="quickstart", attempt="2"})',
                             t_preempt, time.time(), 1.0)
        first = [float(t) for t, v in (r[0]["values"] if r else []) if float(v) > from_step]
        if first:  # to within a scrape interval (2 s)
            phases["notice to first resumed step"] = first[0] - t_preempt
            phases["reclaim to first resumed step"] = first[0] - t_reclaimed
        print(f"   notice for {preempted} at step {step_at_preemption}; the trainer checkpointed on the notice and "
              f"attempt 2 resumed from step {from_step}: {lost} step(s) trained again (restart reason {resumed.get('reason')})")
    print(f"   checkpoints: PVC quickstart-checkpoints ({lc.state_dir}/volumes/), last step {(st.get('lastCheckpoint') or {}).get('step')}")
    phases["training (apply to Succeeded)"] = time.monotonic() - t0
    hf = export_hf(lc, st)
    if hf:
        print(f"   Hugging Face model (Llama format, with the tokenizer): {hf}")
    time.sleep(3)  # one more scrape of the last step
    curves = loss_curve(prom, "default", "quickstart", wall0, time.time(), 2.0)
    held_out = loss_curve(prom, "default", "quickstart", wall0, time.time(), 2.0,
                          loss="pretrain_validation_loss", step="pretrain_validation_step")
    png = plot_loss(curves, lc.state_dir / "demo" / "loss.png",
                    f"quickstart: {st.get('attempt')} attempts, {st.get('preemptions')} preemption(s)", step_at_preemption,
                    held_out)
    print(f"   loss plot (from Prometheus range queries): {png}")
    # last_over_time: the trainers are gone once the job has Succeeded, their series stale.
    last_loss = prom.query_command('last_over_time(pretrain_loss{node_rank="0"}[1h])')
    print(f"   metrics: {last_loss}  (PromQL: pretrain_step, pretrain_loss, "
          f"pretrain_operator_job_preemptions; alerts: curl -s {prom_url}/api/v1/alerts); "
          f"operator: curl -s http://127.0.0.1:18000/metrics")
    phases["demo total"] = time.monotonic() - t_start
    print("   timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    print(f"   explore: hack/kubectl get ptj; hack/kubectl describe ptj quickstart; "
          f"hack/kubectl logs quickstart-a{st.get('attempt')}-n0  (or KUBECONFIG={lc.cfg.kubeconfig} for your kubectl)")
    print("   stop everything: make cluster-down")
    return 0 if st.get("phase") == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
