"""The launcher (`python -m pretrain_trainer launch`, the pods' command): torchrun's agent with the
ranks forked from one import of torch and the trainer, training bit for bit like torchrun's own
freshly started ranks; `--start-method spawn` brings fresh interpreters back, as does a node with
GPUs; a SIGTERM to it after
its ranks finished exits 0 at once. (Its other exit codes: test_trainer_checkpoint.py's SIGTERM tests.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain_operator import contract
from pretrain_trainer.launch import signalled_code
from tests.helpers import wait_for
from tests.trainer_util import cmd, env, free_port, injected, losses, run, wait_for_step, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

LAYOUT = dict(nproc=4, data=2, tensor=2, steps=4, global_batch=8)


def launch(d: Path, *options: str, inject: str | None = None) -> tuple[dict[int, float], list[str], str]:
    """Train LAYOUT through the launcher (`inject`: code its processes run at start-up); the per-step
    losses, the ranks' command lines, its log."""
    d.mkdir()
    c = cmd(write_config(d, **LAYOUT), 4, d / "losses.txt", launch=True, launch_options=options)
    # A port free now: a run of another test still listening must not become this one's rendezvous.
    e = {**env(), "PET_NPROC_PER_NODE": "4", "PET_MASTER_PORT": free_port()}
    e.pop("OMP_NUM_THREADS")  # as in a pod: torchrun's agent sets it for the ranks
    if inject:
        e = injected(d, inject, e)
    p = subprocess.Popen(c, stderr=subprocess.PIPE, text=True, env=e, start_new_session=True)
    try:
        wait_for_step(d / "losses.txt", 1, p)
        ranks = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        cmdlines = [Path(f"/proc/{r}/cmdline").read_text() for r in ranks]
        log = p.stderr.read()
        assert p.wait(300) == 0, log[-3000:]
    finally:
        # A failed run must not outlive its test: still listening on its port, it failed every
        # later multi-rank test of the session (EADDRINUSE).
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
    return losses(d / "losses.txt"), [c.replace("\0", " ").strip() for c in cmdlines], log


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    run(write_config(d, **LAYOUT), 4, d / "losses.txt", torchrun=True)
    return losses(d / "losses.txt")


def test_ranks_forked_by_the_launcher_train_bit_for_bit_like_torchruns_own(tmp_path, torchrun_losses):
    got, ranks, log = launch(tmp_path / "fork")
    assert got == torchrun_losses and sorted(got) == [1, 2, 3, 4]
    # Forked: each rank is the launcher's own process image (same command line), not a new interpreter.
    assert len(ranks) >= 4 and all("pretrain_trainer launch train" in r for r in ranks), ranks
    # With the one CPU thread per rank torchrun sets for several ranks, as a fresh interpreter would
    # (forked ranks inherit the launcher's pool, sized for the whole machine, and oversubscribe it).
    assert "1 CPU thread(s) per rank" in log, log[-3000:]
    assert "nanobind: leaked" not in log  # the launcher's teardown once ended every pod's log with a hundred lines of it


def test_spawn_start_method_runs_fresh_interpreters_with_the_same_losses(tmp_path, torchrun_losses):
    t0 = time.monotonic()
    got, ranks, log = launch(tmp_path / "spawn", "--start-method", "spawn")
    assert got == torchrun_losses, (got, time.monotonic() - t0)
    assert any("multiprocessing" in r for r in ranks) and not any("pretrain_trainer launch train" in r for r in ranks), ranks
    assert "1 CPU thread(s) per rank" in log


def test_a_node_with_gpus_spawns_its_ranks_since_a_forked_one_cannot_start_cuda(tmp_path, torchrun_losses):
    # torchrun's launch config asks the accelerator for its device count, which starts CUDA in the
    # launcher: every forked rank on an H200 failed at torch.cuda.set_device ("Cannot re-initialize
    # CUDA in forked subprocess"). No GPU here: the launcher process alone is told it has one.
    gpu = "import sys\nif 'launch' in sys.argv:\n    import torch\n    torch.cuda.device_count = lambda: 1\n"
    got, ranks, log = launch(tmp_path / "gpu", inject=gpu)
    assert got == torchrun_losses
    assert "launcher: GPUs here: the ranks are spawned, not forked" in log, log[-3000:]
    assert any("multiprocessing" in r for r in ranks) and not any("pretrain_trainer launch train" in r for r in ranks), ranks


def _sigterm_caught(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the kernel's SigCgt mask)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def test_forked_ranks_take_sigterms_default_action_until_the_trainer_answers_it(tmp_path):
    # torchrun's agent answers SIGTERM by raising an exception; forked ranks inherited its handler,
    # so a SIGTERM while a rank loaded a checkpoint raised in the middle of the load, which took it
    # for a bad checkpoint and set a good one aside. A rank stopped in its start-up (here: opening
    # a data manifest that is a FIFO nobody writes) must end at once instead.
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "manifest.json")
    d = tmp_path / "run"
    d.mkdir()
    c = cmd(write_config(d, extra={"data": {"path": str(data)}}), 1, d / "losses.txt", launch=True)
    e = {**env(), "PET_NPROC_PER_NODE": "1", "PET_MASTER_PORT": free_port()}
    p = subprocess.Popen(c, stderr=subprocess.PIPE, text=True, env=e, start_new_session=True)
    try:
        def rank() -> int | None:
            kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            return next((int(k) for k in kids if Path(f"/proc/{k}/wchan").read_text() == "wait_for_partner"), None)
        r = wait_for(rank, timeout=120, what="the rank to open the data manifest")
        assert not _sigterm_caught(r)
        os.kill(r, signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
        assert p.returncode == 1 and "failed (exitcode: -15)" in err, err[-2000:]  # ended by the signal itself
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)



def test_a_sigterm_to_the_launcher_after_every_rank_finished_exits_0_at_once(tmp_path):
    # The kubelet's SIGTERM (a deletion, a drain) can reach the launcher after its ranks finished,
    # the last step checkpointed, before the agent's next check of them: torchrun's wrapper kept
    # them alive until then, the agent sent them SIGTERM (which a finished trainer ignores), killed
    # them after the whole shutdown timeout, and the launcher exited 143: a finished job's pod read
    # as a crash. A long --monitor-interval (the agent's checks) holds that window open.
    d = tmp_path / "run"
    d.mkdir()
    c = cmd(write_config(d, nproc=2, data=2, steps=2, interval=100), 2, d / "losses.txt", launch=True,
            launch_options=("--monitor-interval", "300"))
    e = {**env(), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port(), "PET_SHUTDOWN_TIMEOUT": "60"}
    with open(d / "stderr.txt", "w") as err:
        p = subprocess.Popen(c, stderr=err, text=True, env=e, start_new_session=True)
    try:
        wait_for(lambda: "done: 2 steps" in (d / "stderr.txt").read_text() or p.poll() is not None, timeout=180,
                 what="rank 0 to finish")
        assert p.poll() is None  # the agent has not noticed yet
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        code = p.wait(120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
    log = (d / "stderr.txt").read_text()
    assert code == 0 and time.monotonic() - t0 < 30, (code, time.monotonic() - t0, log[-3000:])
    assert "launcher: SIGTERM; the ranks exited [0]: exiting 0" in log, log[-3000:]
    assert sorted(losses(d / "losses.txt")) == [1, 2] and (d / "ckpt" / "step-00000002" / "COMMITTED").exists()


def test_the_launchers_code_when_signalled_follows_its_ranks():
    assert signalled_code({0}, signal.SIGTERM) == 0  # every rank finished
    assert signalled_code({contract.EXIT_PREEMPTED, -9}, signal.SIGTERM) == contract.EXIT_PREEMPTED  # saved; the rest killed after
    assert signalled_code({0, -9}, signal.SIGTERM) == 128 + signal.SIGTERM  # a rank killed before it finished
    assert signalled_code(set(), signal.SIGTERM) == 128 + signal.SIGTERM  # no rank started



def test_a_node_waits_for_rank_0s_rendezvous_store_until_its_join_timeout(tmp_path):
    # Rank 0's pod still pending (no room yet) or pulling its image while another node's launcher
    # runs: torch gives up on rank 0's rendezvous store after 60 s and a retry (105-170 s here) and
    # the node exited 1, a failure spent on a slow start, which the operator's start timeout (and an
    # elastic shrink) was there to judge. The launcher waits for rank 0's store until the join
    # timeout, which the operator sets from the start timeout (at least torch's 600 s), then starts
    # torch's agent. The store's timeout is cut to 5 s here, so that torch alone would give up in
    # seconds; the rest is the pods' environment.
    import yaml

    from pretrain_operator import api, render
    d = tmp_path / "run"
    d.mkdir()
    config = write_config(d, nproc=1, data=2, steps=2, interval=100, extra={"nodes": 2})
    spec = api.PretrainJobSpec.model_validate({**yaml.safe_load(config.read_text()), "scheduling": {"startTimeoutSeconds": 1800}})
    job = {"metadata": {"name": "late", "namespace": "ns", "uid": "u1"}, "spec": spec.model_dump()}
    port = free_port()

    def node(rank: int) -> subprocess.Popen:
        pod_env = {e["name"]: e["value"] for e in render.pod(job, spec, 1, rank)["spec"]["containers"][0]["env"]
                   if e["name"].startswith("PET_")}
        assert pod_env["PET_RDZV_CONF"] == "join_timeout=1860,read_timeout=1860"
        pod_env["PET_RDZV_ENDPOINT"] = f"127.0.0.1:{port}"  # rank 0's name through the Service, in a pod
        # On one machine every node would host the store; in pods only rank 0's name is its own.
        pod_env["PET_RDZV_CONF"] = "join_timeout=1860,read_timeout=5" + (",is_host=false" if rank else "")
        e = {**env(), **pod_env}
        e.pop("OMP_NUM_THREADS")
        with open(d / f"stderr-{rank}.txt", "w") as err:
            return subprocess.Popen(cmd(config, 1, d / "losses.txt", launch=True), stderr=err, text=True, env=e,
                                    start_new_session=True)

    nodes = [node(1)]
    try:
        wait_for(lambda: "launcher: rank 0's rendezvous store" in (d / "stderr-1.txt").read_text() or nodes[0].poll() is not None,
                 timeout=120, what="node 1 to wait for rank 0's store")
        time.sleep(8)  # past the store timeout (5 s) torch alone would have given up at
        assert nodes[0].poll() is None, (d / "stderr-1.txt").read_text()[-3000:]
        assert f"launcher: rank 0's rendezvous store 127.0.0.1:{port} not reachable" in (d / "stderr-1.txt").read_text()
        nodes.append(node(0))
        codes = [p.wait(240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
    assert codes == [0, 0], [(d / f"stderr-{r}.txt").read_text()[-2000:] for r in (1, 0)]
    assert sorted(losses(d / "losses.txt")) == [1, 2]


def _node_1_alone(tmp_path: Path, rdzv_conf: str) -> tuple[Path, list[str], dict]:
    """Node 1 of a 2-node job whose rank 0 never comes (its store's port free): the run folder, its
    launcher's command line and environment."""
    d = tmp_path / "run"
    d.mkdir()
    config = write_config(d, nproc=1, data=2, steps=2, interval=100, extra={"nodes": 2})
    e = {**env(), "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ID": "x",
         "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "PET_RDZV_CONF": rdzv_conf + ",is_host=false"}
    e.pop("OMP_NUM_THREADS")
    return d, cmd(config, 1, d / "losses.txt", launch=True), e


def test_the_launcher_gives_up_on_rank_0s_store_at_the_join_timeout(tmp_path):
    _, c, e = _node_1_alone(tmp_path, "join_timeout=12,read_timeout=3")
    r = subprocess.run(c, env=e, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "RendezvousConnectionError" in r.stderr, r.stderr[-3000:]
    assert "launcher: rank 0's rendezvous store" in r.stderr  # tried again before giving up


def test_the_join_timeout_comes_from_torchruns_rdzv_conf_and_the_agent_gets_torchs_store_timeout():
    from pretrain_trainer.launch import agent_conf, hosts_store, join_timeout
    assert join_timeout("join_timeout=1860") == 1860 and join_timeout("read_timeout=5,join_timeout=700,is_host=false") == 700
    assert join_timeout("") == join_timeout("read_timeout=5") == 600
    # The operator's read_timeout (for plain torchrun) is torch's 60 s in the launcher's agent (which
    # waited for the store itself): it also bounds every later store call of the agent (a rank 0
    # lost under a running gang). A user's own (template.env) is kept.
    assert agent_conf("join_timeout=1860,read_timeout=1860") == "read_timeout=60,join_timeout=1860"
    for mine in ("join_timeout=1860,read_timeout=5,is_host=false", "join_timeout=600,read_timeout=900", ""):
        assert agent_conf(mine) == mine
    assert hosts_store("", "late-n0.late:29400", 0) and not hosts_store("is_host=false", "127.0.0.1:1", 0)
    assert not hosts_store("", "late-n0.late:29400", 1) and hosts_store("is_host=true", "late-n0.late:29400", 1)


def test_a_sigterm_while_the_launcher_waits_for_rank_0s_store_ends_it_at_once(tmp_path):
    # A pod's first process answers no signal it has no handler for: the launcher waiting for rank
    # 0's store (torch's agent answers signals only once its ranks start) sat out its grace period.
    d, c, e = _node_1_alone(tmp_path, "join_timeout=600,read_timeout=600")
    with open(d / "stderr.txt", "w") as err:
        p = subprocess.Popen(c, stderr=err, text=True, env=e, start_new_session=True)
    try:
        wait_for(lambda: "launcher: rank 0's rendezvous store" in (d / "stderr.txt").read_text() or p.poll() is not None,
                 timeout=120, what="the launcher to wait for rank 0's store")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        code = p.wait(30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
    log = (d / "stderr.txt").read_text()
    assert code == 143 and "launcher: SIGTERM; the ranks exited []: exiting 143" in log, log[-3000:]
    assert took < 10, took  # not at the end of a store timeout (600 s here, 60 s per try of torch's)
