"""`hack/local-cluster up|down` on a second, throwaway cluster: up twice is harmless, a port in
use is worked around, a stale state folder from a killed run is recovered, and `down` leaves no
process, no state folder and no bridge behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pretrain_localcluster import binaries, network
from pretrain_localcluster.config import REPO_ROOT, ClusterConfig
from pretrain_localcluster.controlplane import ClusterError, LocalCluster
from pretrain_localcluster.procs import ProcessTable, alive, owned


CLI = str(REPO_ROOT / "hack" / "local-cluster")


def _cli(state: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=timeout)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _bridge_exists(name: str) -> bool:
    return network.ip("link", "show", name, check=False).returncode == 0


@pytest.fixture
def second_cluster(tmp_path, cluster):
    # `cluster` first: the session's cluster already holds the default ports and pod CIDR.
    state = tmp_path / "lc"
    yield state
    _cli(state, "down")


def test_up_twice_down_leaves_no_process_no_state_and_no_bridge(second_cluster):
    state = second_cluster
    up = _cli(state, "up")
    assert up.returncode == 0, up.stderr + up.stdout
    st = json.loads((state / "cluster.json").read_text())
    assert "local cluster ready" in up.stdout
    assert (state / "kubeconfig").exists()
    # Another cluster (the session's) holds the defaults: this one got its own ports and network.
    assert "in use" in up.stdout
    pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "coredns", "node-agent"}
    assert all(alive(p) for p in pids.values())
    # A pod running on one of its process nodes, to be swept by `down`.
    kubectl = str(binaries.locate(["kubectl"])["kubectl"])
    pod = subprocess.run([kubectl, "--kubeconfig", str(state / "kubeconfig"), "run", "sleeper", "--image=local",
                          "--restart=Never", "--command", "--", "sleep", "600"], capture_output=True, text=True)
    assert pod.returncode == 0, pod.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((state / "pods").glob("*/containers/*/0/container.json")):
        time.sleep(0.2)
    sleeper = json.loads(next((state / "pods").glob("*/containers/*/0/container.json")).read_text())["pid"]
    assert alive(sleeper)

    again = _cli(state, "up")
    assert again.returncode == 0 and "already running" in again.stdout
    assert {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")} == pids

    status = _cli(state, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is True

    down = _cli(state, "down")
    assert down.returncode == 0, down.stderr
    assert not any(alive(p) for p in pids.values())
    assert not alive(sleeper)
    assert not state.exists()
    assert not [pid for pid in _pids() if owned(pid, str(state))], "a process of the cluster outlived `down`"
    assert str(state) not in Path("/proc/self/mountinfo").read_text()
    if st.get("bridge"):
        assert not _bridge_exists(st["bridge"])
    status = _cli(state, "status")
    assert status.returncode == 3 and "no local cluster" in status.stdout


def test_up_recovers_a_stale_state_folder_from_a_killed_run(second_cluster):
    state = second_cluster
    assert _cli(state, "up").returncode == 0
    pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    # A crash: the apiserver dies hard, the rest is left as it was.
    os.kill(pids["kube-apiserver"], signal.SIGKILL)
    again = _cli(state, "up")
    assert again.returncode == 0, again.stderr + again.stdout
    assert "stale state" in again.stdout
    new = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    assert not any(alive(p) for p in pids.values()), "the old processes must all be stopped"
    assert all(alive(p) for p in new.values())


def test_a_second_up_while_the_first_is_starting_waits_for_it_and_finds_it_running(second_cluster):
    state = second_cluster
    first = subprocess.Popen([CLI, "--state-dir", str(state), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The first `up` has written its state file and not yet started its API server: a second
        # `up` now used to take the folder for a killed run's and remove it under the first.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (state / "cluster.json").exists():
            time.sleep(0.01)
        assert (state / "cluster.json").exists(), "the first `up` never wrote its state"
        second = _cli(state, "up")
        out, _ = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, out
    assert "local cluster ready" in out
    assert second.returncode == 0, second.stderr + second.stdout
    assert "already running" in second.stdout and "stale state" not in second.stdout
    pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    assert "kube-apiserver" in pids and all(alive(p) for p in pids.values())


def test_a_component_killed_during_start_up_is_reported_with_its_signal(second_cluster):
    # Killed from outside, the API server leaves an empty log: the error must still say what happened.
    lc = LocalCluster(ClusterConfig.load(str(second_cluster)))
    pid_file = second_cluster / "pids" / "kube-apiserver.pid"

    def kill_it() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not pid_file.exists():
            time.sleep(0.002)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        # A Popen made now must not take the exit status away from `up` (it did: subprocess reaped
        # the dropped Popen object of the API server, and the error said "exit status unknown").
        subprocess.run(["true"])

    killer = threading.Thread(target=kill_it)
    killer.start()
    with pytest.raises(ClusterError, match=r"kube-apiserver exited during start-up \(killed by SIGKILL\)"):
        lc.up(log=lambda *_: None)
    killer.join()


def test_a_component_counts_as_the_clusters_own_whatever_its_proc_files_show(tmp_path):
    # Just after exec of a 100 MB binary, /proc/<pid>/cmdline and environ can read empty (4 starts
    # in 100 of kube-apiserver here): `up` took a live API server for dead then ("exited during
    # start-up", empty log), in about one clean-clone CI run in four. Here a process with neither
    # the marker in its command line nor any environment at all: started by the table, it is ours.
    table = ProcessTable(tmp_path / "lc")
    pid = table.start("probe", ["env", "-i", "sleep", "60"])
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    assert table.running() == {"probe": True}
    assert not owned(pid, str(tmp_path / "another"))
    table.stop("probe", grace_s=5)
    assert not alive(pid)
