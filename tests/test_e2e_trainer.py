"""End to end: the operator runs the real trainer (torchrun across two pods, data x tensor
parallel) on process nodes; a spot node running a rank is reclaimed with a termination notice;
the job checkpoints on the notice, restarts as attempt 2 without spending its failure budget,
resumes from that checkpoint, and succeeds; its per-step losses equal, bit for bit, those of the
same job's configuration trained without interruption (torchrun, same layout), and no step is
trained twice; the status ends with the last step's loss and held-out (validation) loss (the notice is longer than one step plus one save). A pod whose /dev/shm (its
spec.template.shmSize) cannot hold an async save's staging saves synchronously and says why. A
node whose kubelet dies keeps its pod's trainer running after the operator replaced it: the new
attempt fences the checkpoint folder and the stale trainer stops, having committed nothing since.
A second job given a running job's checkpoint claim fails for good, saying which job holds it.

    .venv/bin/python -m pytest tests/test_e2e_trainer.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import threading

import pytest
import yaml

from pretrain_localcluster import nodes
from pretrain_operator import contract as c
from pretrain_operator import render
from tests.helpers import wait_for
from tests.jobs import Jobs
from tests.trainer_util import cmd, env, losses

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")


def _real_job(name: str, label: str, steps: int, **spec) -> dict:
    """The real trainer on two pods of the test's pool: data 2 x tensor 2 on 4 ranks, writing each
    step's loss to its checkpoint volume; no interval checkpoint (a notice's request makes one)."""
    return {"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": name},
            "spec": {"nodes": 2, "nprocPerNode": 2, "parallelism": {"data": 2, "tensor": 2},
                     "data": {"seqLen": 32, "globalBatchSize": 8, "microBatchSize": 2},
                     "training": {"steps": steps, "logEverySteps": 2}, "optimizer": {"warmupSteps": 5},
                     "checkpoint": {"intervalSteps": 1000},
                     "scheduling": {"nodeSelector": {"pretrain.dev/test-pool": label}},
                     "template": {"terminationGracePeriodSeconds": 20,
                                  "command": [*render.default_command(), "--losses-out", "/checkpoints/losses.txt"]},
                     **spec}}


def _reclaim_rank_1s_node(cluster, jobs: Jobs, name: str) -> int:
    """Once attempt 1 is past step 8, reclaim rank 1's node after a 10 s termination notice; the
    step of the checkpoint the notice asked for."""
    jobs.wait_phase(name, "Running", timeout=120)
    jobs.wait(name, lambda s: (s.get("progress") or {}).get("step", 0) >= 8, timeout=180, what="training progress")
    victim = next(p for p in jobs.pods(name, attempt=1) if p.metadata.labels["pretrain.dev/node-rank"] == "1").spec.node_name
    t = threading.Thread(target=nodes.preempt, args=(cluster.state_dir, victim), kwargs={"notice_s": 10.0, "log": lambda *_: None})
    t.start()
    # No interval checkpoint exists (intervalSteps 1000): the notice's request makes one, before
    # any SIGTERM (whose own save would say "stop requested (SIGTERM)", not this).
    wait_for(lambda: "checkpoint requested by the operator: saved step" in jobs.logs(f"{name}-a1-n0"), timeout=60,
             what="rank 0 to serve the notice's checkpoint request")
    ck = jobs.wait(name, lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) > 0, timeout=60,
                   what="a checkpoint on the termination notice")["lastCheckpoint"]["step"]
    t.join(90)
    assert ck >= 8
    return ck


def test_the_real_trainer_survives_a_spot_reclaim(cluster, api, namespace, operator, core, tmp_path):
    jobs = Jobs(api, namespace)
    label = namespace[-5:]
    pool = [nodes.add_node(cluster.state_dir, spot=True, labels={"pretrain.dev/test-pool": label}) for _ in range(3)]
    try:
        jobs.create(_real_job("real", label, steps=40, validation={"everySteps": 10, "batches": 1}))
        ck = _reclaim_rank_1s_node(cluster, jobs, "real")
        st = jobs.wait_phase("real", "Succeeded", timeout=300)
        assert st["attempt"] == 2 and st["preemptions"] == 1 and st["failures"] == 0
        # Attempt 2 resumed from a checkpoint at or after the notice's (the SIGTERM at eviction may save a later one).
        log = jobs.logs("real-a2-n0")
        resumed = int(log.split("resumed from")[1].split("step-")[1].split()[0])
        assert resumed >= ck
        assert "done: 40 steps" in log

        # The losses both attempts wrote to the checkpoint volume, against an uninterrupted run of
        # the same rendered configuration with the same layout (4 ranks: data 2 x tensor 2).
        volume = jobs.claim_folder("real-ckpt")
        lines = [int(ln.split()[0]) for ln in (volume / "losses.txt").read_text().splitlines()]
        assert lines == list(range(1, 41)), f"steps trained (a repeat is a step lost to the preemption): {lines}"
        cfg = yaml.safe_load(core.read_namespaced_config_map(render.config_map_name("real"), namespace).data[c.CONFIG_FILE])
        cfg["checkpoint"]["path"] = str(tmp_path / "ckpt")
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
        r = subprocess.run(cmd(tmp_path / "job.yaml", 4, tmp_path / "want.txt"), env=env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert losses(volume / "losses.txt") == losses(tmp_path / "want.txt")
        # The status shows the last step's loss and held-out loss: rank 0's final report, its termination message.
        val = float(r.stderr.split("step 40 validation loss ")[1].split()[0])
        assert st["progress"] == {**st["progress"], "step": 40, "loss": round(losses(volume / "losses.txt")[40], 4),
                                  "validationStep": 40, "validationLoss": round(val, 4)}
    finally:
        for n in pool:
            nodes.remove_node(cluster.state_dir, n)


def test_an_elastic_job_short_of_nodes_after_a_reclaim_trains_on_one_on_the_same_loss_curve(cluster, api, namespace, operator,
                                                                                              core, tmp_path):
    # Two nodes of 8 CPUs, one pod of 5 each. Rank 1's node is reclaimed (no new one comes):
    # attempt 2 finds room for one pod, and at its start timeout the job shrinks to 1 node (data 1
    # x tensor 2 on its 2 ranks, the global batch of 8 by gradient accumulation). Attempt 3 loads
    # the 4-rank checkpoint on 2 ranks and trains the rest, no step twice, on the loss curve of an
    # uninterrupted run (within 1e-5, as layouts agree: tests/test_trainer_checkpoint.py).
    jobs = Jobs(api, namespace)
    label = namespace[-5:]
    pool = [nodes.add_node(cluster.state_dir, spot=True, labels={"pretrain.dev/test-pool": label}) for _ in range(2)]
    try:
        body = _real_job("shrinks", label, steps=30, elastic={"minNodes": 1}, resources={"requests": {"cpu": "5"}})
        body["spec"]["scheduling"]["startTimeoutSeconds"] = 30
        jobs.create(body)
        ck = _reclaim_rank_1s_node(cluster, jobs, "shrinks")
        st = jobs.wait_phase("shrinks", "Succeeded", timeout=400)
        assert st["attempt"] == 3 and st["nodes"] == 1 and st["preemptions"] == 1 and st["failures"] == 0
        assert st["restart"]["reason"] == "ElasticShrink" and "runs on 1 of 2 node(s) (parallelism.data 1" in st["restart"]["message"]
        log = jobs.logs("shrinks-a3-n0")
        assert int(log.split("resumed from")[1].split("step-")[1].split()[0]) >= ck
        assert "done: 30 steps" in log
        volume = jobs.claim_folder("shrinks-ckpt")
        lines = [int(ln.split()[0]) for ln in (volume / "losses.txt").read_text().splitlines()]
        assert lines == list(range(1, 31)), f"steps trained (a repeat is a step lost to the preemption): {lines}"
        # The uninterrupted run: the config the shrunk attempt ran with (2 ranks), from step 1.
        cfg = yaml.safe_load(core.read_namespaced_config_map(render.config_map_name("shrinks"), namespace).data[c.CONFIG_FILE])
        assert cfg["nodes"] == 1 and cfg["parallelism"] == {**cfg["parallelism"], "data": 1, "tensor": 2}
        cfg["checkpoint"]["path"] = str(tmp_path / "ckpt")
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
        r = subprocess.run(cmd(tmp_path / "job.yaml", 2, tmp_path / "want.txt"), env=env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        got, want = losses(volume / "losses.txt"), losses(tmp_path / "want.txt")
        assert sorted(got) == sorted(want) == list(range(1, 31))
        for step in want:
            assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])
    finally:
        for n in pool:
            nodes.remove_node(cluster.state_dir, n)


def test_a_trainer_pod_whose_shm_cannot_hold_async_staging_saves_synchronously_and_says_why(api, namespace, operator):
    # spec.template.shmSize -> the pod's memory emptyDir at /dev/shm (a tmpfs of that size on a
    # process node, as on a real node) -> the trainer's check before its first async save.
    jobs = Jobs(api, namespace)
    jobs.create({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "small-shm"},
                 "spec": {"nodes": 1, "nprocPerNode": 1,
                          "data": {"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 2},
                          "training": {"steps": 6, "logEverySteps": 1}, "optimizer": {"warmupSteps": 2},
                          "checkpoint": {"intervalSteps": 3, "async": True}, "template": {"shmSize": "1Mi"}}})
    st = jobs.wait_phase("small-shm", "Succeeded", timeout=240)
    log = jobs.logs("small-shm-a1-n0")
    assert "/dev/shm has 1 MiB free: raise spec.template.shmSize" in log and "saving synchronously from now on" in log, log[-3000:]
    assert st["lastCheckpoint"]["step"] == 6 and st["failures"] == 0


def test_a_trainer_left_running_on_a_node_whose_kubelet_died_is_fenced_off_by_the_next_attempt(cluster, api, namespace, operator, core):
    # One pod (the gang a stale attempt can outlive: no peer of its own gang to lose), 8 layers so
    # that it trains about 5 steps a second, each attempt's losses in a file of its own.
    jobs = Jobs(api, namespace)
    label = namespace[-5:] + "-kd"
    pool = [nodes.add_node(cluster.state_dir, spot=False, labels={"pretrain.dev/test-pool": label}) for _ in range(2)]
    try:
        jobs.create({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "stale"},
                     "spec": {"nodes": 1, "nprocPerNode": 1, "model": {"preset": "tiny", "layers": 8},
                              "data": {"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 2},
                              "training": {"steps": 300}, "optimizer": {"warmupSteps": 2},
                              "checkpoint": {"intervalSteps": 5, "keep": 100},
                              "scheduling": {"nodeSelector": {"pretrain.dev/test-pool": label}},
                              "template": {"command": [*render.default_command(), "--losses-out",
                                                       "/checkpoints/losses-a$(PRETRAIN_ATTEMPT).txt"]}}})
        jobs.wait("stale", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) >= 5, timeout=180, what="a checkpoint")
        pod = jobs.pods("stale", attempt=1)[0]
        nodes.kubelet_down(cluster.state_dir, pod.spec.node_name)
        st = jobs.wait_phase("stale", "Succeeded", timeout=300)
        assert st["attempt"] == 2 and st["preemptions"] == 1 and st["failures"] == 0
        jobs.wait_events("stale", "PodForceDeleted")

        # The stale trainer ran on after its pod was force-deleted, until attempt 2 claimed the
        # folder; then it stopped (exit 83) without committing anything more: at its next step, or
        # at once when the claim refused a save's commit (every 5 steps here, a second apart).
        pod_dir = cluster.state_dir / "pods" / pod.metadata.uid
        exit_file = wait_for(lambda: next(pod_dir.glob("containers/*/*/exit.json"), None), timeout=60,
                             what="the stale trainer's exit")
        assert json.loads(exit_file.read_text())["exitCode"] == c.EXIT_PREEMPTED
        stale_log = "".join(p.read_text() for p in pod_dir.glob("logs/*/*") if p.is_file())
        said = "has claimed /checkpoints since this attempt started: "
        assert f"{said}stopping at step" in stale_log or re.search(re.escape(said) + r"checkpoint of step \d+ not committed; exiting 83",
                                                                  stale_log), stale_log[-3000:]
        volume = jobs.claim_folder("stale-ckpt")
        log2 = jobs.logs("stale-a2-n0")
        resumed = int(log2.split("resumed from /checkpoints/step-")[1][:8])
        a1, a2 = losses(volume / "losses-a1.txt"), losses(volume / "losses-a2.txt")
        assert resumed < max(a1) < 300, (resumed, max(a1))  # it trained past the step attempt 2 resumed from
        markers = {int(m.parent.name[5:]): json.loads(m.read_text()) for m in volume.glob("step-*/COMMITTED")}
        assert all(m["attempt"] == 2 for step, m in markers.items() if step > resumed), markers
        assert max(markers) == 300
        both = sorted(set(a1) & set(a2))
        assert both and all(a1[s] == a2[s] for s in both)  # the same training, bit for bit, where both trained
    finally:
        for n in pool:
            nodes.remove_node(cluster.state_dir, n)


def test_a_job_given_a_running_jobs_checkpoint_claim_fails_for_good_naming_it_and_the_first_runs_on(api, namespace, operator):
    jobs = Jobs(api, namespace)
    spec = {"nodes": 1, "nprocPerNode": 1, "model": {"preset": "tiny", "layers": 8},
            "data": {"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 2},
            "training": {"steps": 2000}, "checkpoint": {"intervalSteps": 5}}
    first = jobs.create({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "first"}, "spec": spec})
    jobs.wait("first", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) >= 5, timeout=180, what="a checkpoint")
    # A copied manifest, its claimName kept.
    jobs.create({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "copy"},
                 "spec": {**spec, "checkpoint": {"intervalSteps": 5, "claimName": "first-ckpt"}}})
    st = jobs.wait_phase("copy", "Failed", timeout=120)
    failed = next(cd for cd in st["conditions"] if cd["type"] == "Failed")
    assert failed["reason"] == "NonRetryableExitCode", failed
    assert f"the checkpoint folder /checkpoints is in use by job {first['metadata']['uid']} (attempt 1" in failed["message"], failed
    assert st["attempt"] == 1 and st["preemptions"] == 0  # failed at once: no retry would change it
    before = jobs.status("first")["progress"]["step"]
    st1 = jobs.wait("first", lambda s: (s.get("progress") or {}).get("step", 0) > before + 10, timeout=60, what="the first job training on")
    assert st1["phase"] == "Running" and st1["attempt"] == 1 and st1["preemptions"] == 0
