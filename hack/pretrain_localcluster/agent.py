"""The node agent: a kubelet for local processes, running every process node of one cluster.

    python -m pretrain_localcluster.agent STATE_DIR     # started by `hack/local-cluster up`

It registers the Nodes listed in `<state>/nodes.json` (each with its own `system:node:<name>`
identity, so the Node authorizer and NodeRestriction apply as on a real cluster), renews their
Leases every 2 s, and runs every pod bound to them: a network namespace on the cluster bridge,
then init containers in order, then containers, each through the shim (`shim.py`), with probes,
restarts with back-off, graceful deletion, status, and logs served to `kubectl logs` over TLS.
It also provisions PVCs of the `standard` StorageClass as folders.

Signals: SIGHUP re-reads nodes.json (drills add, fail and terminate nodes that way); SIGTERM
stops the agent and leaves pods running, as a kubelet does: a restarted agent adopts them from
their folders under `<state>/pods/`, and cleans up those whose pod is gone.

Limits: no images (commands run with this machine's files; a container without a command runs
/bin/sh, or a pause image's sleep), CPU limits not enforced, no exec or
port-forward, no PID namespace, no ephemeral containers, sidecar init containers run as plain ones.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from . import podnet, podspec
from .config import REPO_ROOT
from .kube import Kube, KubeError
from .nodes import node_ready
from .pki import PKI
from .procs import alive, owned
from .shim import unmount_under
from .volumes import VolumeBuilder, VolumeNotReady, read_config_source

log = logging.getLogger("node-agent")

STORAGE_CLASS = "standard"
PROVISIONER = "pretrain.dev/local-path"
LEASE_RENEW_S = 2.0
# The lease is the heartbeat. Like a kubelet, the agent checks the node's status every
# NODE_STATUS_S but writes it only when it differs from what it would post (the node lifecycle
# controller set Ready Unknown: it is set back at once) or NODE_STATUS_REPORT_S has passed. Posting
# it every 10 s was two full Node writes a second with the 20 nodes a test session makes, each
# fanned out to the controller-manager's, the scheduler's and the operator's watches.
NODE_STATUS_S = 10.0
NODE_STATUS_REPORT_S = 60.0
LEASE_REQUEST_TIMEOUT_S = 4.0
BACKOFF_BASE_S, BACKOFF_MAX_S = 1.0, 60.0
CONFIG_RETRY_S = 2.0  # a container whose env names a missing Secret or key: tried again this often


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_labels(n: dict) -> dict[str, str]:
    spot = n.get("spot", False)
    labels = {
        "kubernetes.io/hostname": n["name"],
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": n.get("instanceType", "local.process"),
        "topology.kubernetes.io/region": "local",
        "topology.kubernetes.io/zone": n.get("zone", "local-a"),
        # Capacity type, in the labels the clouds and Karpenter use.
        "karpenter.sh/capacity-type": "spot" if spot else "on-demand",
        "eks.amazonaws.com/capacityType": "SPOT" if spot else "ON_DEMAND",
        "node.kubernetes.io/lifecycle": "spot" if spot else "normal",
        "pretrain.dev/local-node": "true",
    }
    if spot:
        labels["cloud.google.com/gke-spot"] = "true"
    labels.update(n.get("labels") or {})
    return labels


class Container:
    """One container of a pod, across its restarts; its runs live in `<pod>/containers/<name>/<n>/`."""

    def __init__(self, spec: dict, init: bool, pod_dir: Path):
        self.spec, self.init, self.name = spec, init, spec["name"]
        self.dir = pod_dir / "containers" / self.name
        self.marker = str(pod_dir.parent.parent)  # the state folder: see procs.owned()
        self.log_dir = pod_dir / "logs" / self.name
        self.runs = sorted(int(p.name) for p in self.dir.glob("*") if p.name.isdigit()) if self.dir.exists() else []
        self.next_start = 0.0
        self.ready = False
        self.probe_ok = 0
        self.probe_fail = 0
        self.live_fail = 0
        self.next_probe = 0.0
        self.next_live = 0.0
        self.killing = False
        self.config_error = ""  # why its last start could not make its environment (it waits, retried)

    @property
    def restart_count(self) -> int:
        return max(len(self.runs) - 1, 0)

    def run_dir(self, n: int | None = None) -> Path:
        return self.dir / str(self.runs[-1] if n is None else n)

    def exit_doc(self, n: int | None = None) -> dict | None:
        if not self.runs:
            return None
        p = self.run_dir(n) / "exit.json"
        if p.exists():
            return json.loads(p.read_text())
        # The shim is gone without writing its exit (killed hard): the container is gone too.
        shim = self.shim_pid(n)
        if shim is not None and not alive(shim):
            c = self.container_doc(n) or {}
            return {"exitCode": 137, "reason": "Error", "message": "shim exited without a status",
                    "startedAt": c.get("startedAt"), "finishedAt": now_micro()}
        return None

    def container_doc(self, n: int | None = None) -> dict | None:
        p = self.run_dir(n) / "container.json"
        return json.loads(p.read_text()) if p.exists() else None

    def shim_pid(self, n: int | None = None) -> int | None:
        p = self.run_dir(n) / "shim.pid"
        return int(p.read_text()) if p.exists() else None

    def state(self) -> str:
        if not self.runs:
            return "waiting"
        return "terminated" if self.exit_doc() is not None else "running"

    def signal(self, sig: int) -> None:
        if not self.runs or self.exit_doc() is not None:
            return
        if sig == signal.SIGKILL:
            c = self.container_doc()
            if c and alive(c["pid"]) and owned(c["pid"], self.marker):  # never a recycled pid's group
                try:
                    os.killpg(c["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        pid = self.shim_pid()
        if pid and alive(pid):
            try:
                os.kill(pid, sig if sig != signal.SIGKILL else signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill_hard(self) -> None:
        """Everything of this container, shim included, no status (node failure)."""
        for n in self.runs:
            c = self.container_doc(n)
            for pid, group in ((c and c.get("pid"), True), (self.shim_pid(n), False)):
                if pid and alive(pid) and owned(pid, self.marker):
                    try:
                        os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


class PodWorker(threading.Thread):
    def __init__(self, agent: "Agent", pod: dict):
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['namespace']}/{pod['metadata']['name']}")
        self.agent = agent
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.node = pod["spec"]["nodeName"]
        self.kube = agent.node_kube(self.node)
        self.dir = agent.pods_dir / self.uid
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.frozen = False  # node failed or terminated: no more status from us
        self.gone = False  # the pod object no longer exists
        meta = self.dir / "pod.json"
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}
        spec = pod["spec"]
        self.init = [Container(c, True, self.dir) for c in spec.get("initContainers") or []]
        self.ctrs = [Container(c, False, self.dir) for c in spec.get("containers") or []]
        self.policy = spec.get("restartPolicy", "Always")
        self.last_status: dict | None = None
        self.transitions: dict[str, tuple[str, str]] = {}
        self.sandbox_error: str | None = None
        self.volumes: VolumeBuilder | None = None
        self.mounts_by_volume: dict[str, str] = {}
        self.torn_down = False
        self.init_failed = False

    # ---- helpers ---------------------------------------------------------------------------
    @property
    def ns(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def name_(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def host_network(self) -> bool:
        return bool(self.pod["spec"].get("hostNetwork"))

    def update(self, pod: dict) -> None:
        old_meta = (self.pod["metadata"].get("labels"), self.pod["metadata"].get("annotations"))
        self.pod = pod
        if self.volumes and (pod["metadata"].get("labels"), pod["metadata"].get("annotations")) != old_meta:
            try:
                self.volumes.refresh_downward(pod)
            except Exception as e:  # noqa: BLE001  (a refresh that fails is retried at the next change)
                log.warning("refreshing downward API volumes of %s: %s", self.name, e)
        self.wake.set()

    def save_meta(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "uid").write_text(self.uid)
        (self.dir / "pod.json").write_text(json.dumps(self.meta))

    # ---- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                if self.frozen:
                    return
                if self.gone:
                    self.cleanup()
                    return
                if self.pod["metadata"].get("deletionTimestamp"):
                    self.terminate()
                    return
                self.step()
            except Exception as e:  # noqa: BLE001  (a pod's failure must not stop the agent)
                log.exception("pod %s/%s: %s", self.ns, self.name_, e)
                time.sleep(1.0)
            self.wake.wait(0.3)
            self.wake.clear()

    def step(self) -> None:
        if self.terminal():
            self.teardown_sandbox()
            self.publish()
            self.wake.wait(2.0)
            return
        if not self.ensure_sandbox():
            self.publish()
            return
        try:
            self.volumes.refresh_tokens()
        except Exception as e:  # noqa: BLE001  (the old token stays valid a while: retried at the next step)
            log.warning("renewing the tokens of %s: %s", self.name, e)
        # Init containers, one at a time and in order.
        for c in self.init:
            st = c.state()
            if st == "terminated" and c.exit_doc()["exitCode"] == 0:
                continue
            if st == "running" or (st == "waiting" and time.monotonic() < c.next_start):
                break
            if st == "terminated":
                if self.policy == "Never":
                    self.init_failed = True
                    break
                if time.monotonic() < c.next_start:
                    break
            self.start_container(c)
            break
        else:
            for c in self.ctrs:
                st = c.state()
                if st == "waiting" and time.monotonic() >= c.next_start:
                    self.start_container(c)
                elif st == "terminated":
                    code = c.exit_doc()["exitCode"]
                    if podspec.should_restart(self.policy, code) and not c.killing:
                        if c.next_start == 0.0:
                            c.next_start = time.monotonic() + min(BACKOFF_BASE_S * 2 ** c.restart_count, BACKOFF_MAX_S)
                        elif time.monotonic() >= c.next_start:
                            c.next_start = 0.0
                            self.start_container(c)
                elif st == "running":
                    self.probe(c)
        self.publish()

    def init_done(self) -> bool:
        return all(c.state() == "terminated" and c.exit_doc()["exitCode"] == 0 for c in self.init)

    def phase(self) -> str:
        states = []
        for c in self.ctrs:
            st = c.state()
            states.append({"state": st, "exitCode": (c.exit_doc() or {}).get("exitCode", 0)})
        if self.init_failed:
            return "Failed"
        return podspec.pod_phase(self.policy, self.init_done(), False, states)

    def terminal(self) -> bool:
        return self.phase() in ("Succeeded", "Failed")

    # ---- sandbox ---------------------------------------------------------------------------
    def ensure_sandbox(self) -> bool:
        if self.volumes is not None and self.sandbox_error is None:
            return True
        try:
            self.setup_sandbox()
            self.sandbox_error = None
            return True
        except (VolumeNotReady, KubeError) as e:
            # Retried: a PVC binds, a ConfigMap appears, the API answers again.
            self.sandbox_error = str(e)
            self.wake.wait(1.0)
            return False

    def setup_sandbox(self) -> None:
        st = self.agent.state
        if not self.meta.get("ip"):
            self.meta.update(uid=self.uid, ns=self.ns, name=self.name_, node=self.node,
                             ip=st["gateway"] if self.host_network else self.agent.allocate_ip(self.node, self.uid))
            self.save_meta()
        pod_ip = self.meta["ip"]
        if not self.host_network and not podnet.netns_path(self.uid).exists():
            podnet.create(self.uid, pod_ip, st["cluster_cidr"], st["bridge"])
        etc = self.dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        domain = self.agent.domain
        (etc / "hosts").write_text(podspec.hosts_file(self.pod, pod_ip, domain))
        (etc / "resolv.conf").write_text(podspec.resolv_conf(self.pod, st["gateway"], domain))
        (etc / "hostname").write_text(podspec.hostname_of(self.pod) + "\n")
        vb = VolumeBuilder(self.kube, self.agent.admin, self.pod, self.dir, lambda: pod_ip, st["gateway"],
                           self.agent.ca_pem)
        mounts = {}
        for vol in self.pod["spec"].get("volumes") or []:
            mounts[vol["name"]] = vb.build(vol)
        self.mounts_by_volume = mounts
        self.volumes = vb
        self.meta.setdefault("startTime", now())
        self.save_meta()

    def teardown_sandbox(self) -> None:
        if self.torn_down:
            return
        if not self.host_network:
            podnet.delete(self.uid)
        unmount_under(self.dir / "volumes")  # medium Memory emptyDirs: their memory goes back now
        self.agent.release_ip(self.node, self.uid)
        self.torn_down = True

    # ---- containers ------------------------------------------------------------------------
    def start_container(self, c: Container) -> None:
        n = (c.runs[-1] + 1) if c.runs else 0
        run_dir = c.dir / str(n)
        run_dir.mkdir(parents=True, exist_ok=True)
        c.log_dir.mkdir(parents=True, exist_ok=True)
        pod_ip = self.meta["ip"]
        try:
            env = podspec.container_env(
                self.pod, c.spec, pod_ip=pod_ip, host_ip=self.agent.state["gateway"],
                node_alloc=self.agent.node_alloc(self.node), lookup=self.lookup,
                api_host=self.agent.state["gateway"], api_port=self.agent.state["ports"]["apiserver"])
        except (KubeError, KeyError, ValueError) as e:
            # As the kubelet: no run; the container waits (CreateContainerConfigError, saying why)
            # and is tried again, so it starts once the Secret or key it names exists.
            shutil.rmtree(run_dir, ignore_errors=True)
            c.config_error = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            c.next_start = time.monotonic() + CONFIG_RETRY_S
            return
        c.config_error = ""
        cmd = list(c.spec.get("command") or []) + list(c.spec.get("args") or [])
        if not cmd:
            cmd = podspec.entrypoint(c.spec.get("image", ""))
        cmd = podspec.expand_args(cmd, env)
        uid, gid, groups = podspec.run_as(self.pod, c.spec)
        if uid not in (None, 0) and "HOME" not in env:
            env["HOME"] = "/tmp"
        env.setdefault("HOME", "/root")
        # Commands run with this machine's Python: the agent's virtualenv first on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        mounts = [{"source": str(self.dir / "etc" / f), "target": f"/etc/{f}"} for f in ("hosts", "resolv.conf", "hostname")]
        for m in c.spec.get("volumeMounts") or []:
            src = self.mounts_by_volume.get(m["name"])
            if src is None:
                continue
            if m.get("subPath"):
                src = os.path.join(src, m["subPath"])
                os.makedirs(src, exist_ok=True) if not os.path.exists(src) else None
            mounts.append({"source": src, "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
        limit = ((c.spec.get("resources") or {}).get("limits") or {}).get("memory")
        spec = {
            "id": f"{self.uid}-{c.name}-{n}",
            "netns": None if self.host_network else str(podnet.netns_path(self.uid)),
            "hostname": podspec.hostname_of(self.pod),
            "scratch": str(run_dir / "rootfs"),
            "stateDir": str(run_dir),
            "logPath": str(c.log_dir / f"{n}.log"),
            "mounts": mounts,
            "argv": cmd, "env": env, "workingDir": c.spec.get("workingDir") or "/",
            "uid": uid, "gid": gid, "groups": groups,
            "memoryLimitBytes": int(podspec.quantity(limit)) if limit else None,
            # The interpreter behind the virtualenv may live under /root: non-root containers need a way in.
            "searchable": [os.path.realpath(sys.executable), str(Path(sys.prefix) / "bin" / "x")],
            # ... and the virtualenv and the checkout its editable install points at stay visible.
            "hostVisible": sorted({sys.prefix, str(REPO_ROOT)}),
            # The API server defaults these (/dev/termination-log, File) in every pod it stores.
            "terminationMessagePath": c.spec.get("terminationMessagePath") or "/dev/termination-log",
            "terminationMessagePolicy": c.spec.get("terminationMessagePolicy") or "File",
        }
        (run_dir / "spec.json").write_text(json.dumps(spec))
        Path(spec["logPath"]).touch()  # `kubectl logs` answers (empty) from the moment the container is reported
        proc = subprocess.Popen([sys.executable, "-m", "pretrain_localcluster.shim", str(run_dir / "spec.json")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(run_dir / "shim.err", "wb"), start_new_session=True,
                                env={"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PATH": os.environ.get("PATH", ""),
                                     "LOCAL_CLUSTER_OWNER": str(self.agent.state_dir)})
        (run_dir / "shim.pid").write_text(str(proc.pid))
        self.agent.children.append(proc)
        c.runs.append(n)
        c.ready = False
        c.probe_ok = c.probe_fail = c.live_fail = 0
        delay = (c.spec.get("readinessProbe") or {}).get("initialDelaySeconds", 0)
        c.next_probe = time.monotonic() + delay
        c.next_live = time.monotonic() + (c.spec.get("livenessProbe") or {}).get("initialDelaySeconds", 0)
        c.killing = False

    def lookup(self, kind: str, name: str, key: str | None, optional: bool):
        """env's configMapKeyRef/secretKeyRef/envFrom: one key, or every key when key is None."""
        try:
            raw = read_config_source(self.kube, self.ns, kind, name, optional)
        except VolumeNotReady as e:
            raise KeyError(str(e)) from None
        if raw is None:
            return None
        data = {k: v.decode(errors="replace") for k, v in raw.items()}
        if key is None:
            return data
        if key not in data:
            if optional:
                return None
            raise KeyError(f"key {key} not in {kind} {name}")
        return data[key]

    # ---- probes ----------------------------------------------------------------------------
    def run_probe(self, c: Container, probe: dict) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        host = self.meta["ip"]
        try:
            if "exec" in probe:
                cdoc = c.container_doc()
                if not cdoc:
                    return False
                r = subprocess.run(["nsenter", "-t", str(cdoc["pid"]), "-m", "-n", "-u", "-r", "-w", "--",
                                    *probe["exec"]["command"]], capture_output=True, timeout=timeout)
                return r.returncode == 0
            if "httpGet" in probe:
                g = probe["httpGet"]
                port = self.port_of(c, g["port"])
                url = f"{g.get('scheme', 'HTTP').lower()}://{g.get('host') or host}:{port}{g.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return 200 <= r.status < 400
            if "tcpSocket" in probe:
                port = self.port_of(c, probe["tcpSocket"]["port"])
                with socket.create_connection((probe["tcpSocket"].get("host") or host, port), timeout=timeout):
                    return True
        except Exception:  # noqa: BLE001  (any error is a failed probe)
            return False
        return False

    @staticmethod
    def port_of(c: Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return p["containerPort"]
        raise ValueError(f"no port named {port}")

    def probe(self, c: Container) -> None:
        t = time.monotonic()
        rp = c.spec.get("readinessProbe")
        if not rp:
            c.ready = True
        elif t >= c.next_probe:
            c.next_probe = t + rp.get("periodSeconds", 10)
            if self.run_probe(c, rp):
                c.probe_ok += 1
                c.probe_fail = 0
                if c.probe_ok >= rp.get("successThreshold", 1):
                    c.ready = True
            else:
                c.probe_fail += 1
                c.probe_ok = 0
                if c.probe_fail >= rp.get("failureThreshold", 3):
                    c.ready = False
        lp = c.spec.get("livenessProbe")
        if lp and t >= c.next_live:
            c.next_live = t + lp.get("periodSeconds", 10)
            if self.run_probe(c, lp):
                c.live_fail = 0
            else:
                c.live_fail += 1
                if c.live_fail >= lp.get("failureThreshold", 3):
                    log.info("liveness probe of %s/%s failed; restarting", self.name_, c.name)
                    c.live_fail = 0
                    self.stop_container(c, self.grace())

    # ---- stopping --------------------------------------------------------------------------
    def grace(self) -> float:
        g = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(g)

    def stop_container(self, c: Container, grace: float) -> None:
        if c.state() != "running":
            return
        c.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while c.state() == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        if c.state() == "running":
            c.signal(signal.SIGKILL)
            deadline = time.monotonic() + 5
            while c.state() == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
        if c.state() == "running":
            c.kill_hard()

    def terminate(self) -> None:
        """Graceful deletion: SIGTERM, grace period, SIGKILL, final status, then remove the object."""
        grace = self.grace()
        for c in self.ctrs + self.init:
            c.killing = True
        running = [c for c in self.ctrs + self.init if c.state() == "running"]
        for c in running:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.state() == "running" for c in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in running:
            if c.state() == "running":
                self.stop_container(c, 0)
        self.publish(final=True)
        try:
            self.kube.delete(f"/api/v1/namespaces/{self.ns}/pods/{self.name_}",
                             {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
        except KubeError as e:
            if e.status != 409:  # 409: a newer pod of the same name; ours is gone already
                raise
        self.cleanup()

    def cleanup(self) -> None:
        for c in self.ctrs + self.init:
            c.kill_hard()
        self.teardown_sandbox()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.agent.forget(self.uid)

    def detach(self) -> None:
        """The node's kubelet died, its containers did not: no more status, no reaction to the
        API (a deletion included), the processes left running."""
        self.frozen = True
        self.stopped.set()

    def freeze(self) -> None:
        """The node failed or was terminated: kill everything, say nothing more."""
        self.frozen = True
        self.stopped.set()
        for c in self.ctrs + self.init:
            c.kill_hard()
        try:
            self.teardown_sandbox()
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- status ----------------------------------------------------------------------------
    def container_status(self, c: Container) -> dict:
        spec = c.spec
        out = {"name": c.name, "image": spec.get("image", ""), "imageID": f"local://{spec.get('image', '')}",
               "restartCount": c.restart_count, "ready": False, "started": False, "state": {}, "lastState": {}}
        if not c.runs:
            reason = "PodInitializing" if not c.init and self.init and not self.init_done() else "ContainerCreating"
            message = self.sandbox_error
            if self.sandbox_error:
                reason = "ContainerCreating"
            elif c.config_error:
                reason, message = "CreateContainerConfigError", c.config_error
            out["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
            return out
        out["containerID"] = f"local://{self.uid}/{c.name}/{c.runs[-1]}"

        def term(doc):
            t = {"exitCode": doc["exitCode"], "reason": doc.get("reason", "Error"),
                 "startedAt": _sec(doc.get("startedAt")), "finishedAt": _sec(doc.get("finishedAt")),
                 "containerID": out["containerID"]}
            if doc.get("signal"):
                t["signal"] = doc["signal"]
            if doc.get("message"):
                t["message"] = doc["message"][:4096]  # the kubelet's limit per container
            return t

        doc = c.exit_doc()
        if doc is None:
            cd = c.container_doc() or {}
            out["state"] = {"running": {"startedAt": _sec(cd.get("startedAt")) or now()}}
            out["started"] = True
            out["ready"] = c.ready
        elif podspec.should_restart(self.policy, doc["exitCode"]) and not c.killing and not c.init:
            out["state"] = {"waiting": {"reason": "CrashLoopBackOff",
                                        "message": f"back-off restarting failed container {c.name}"}}
            out["lastState"] = {"terminated": term(doc)}
        else:
            out["state"] = {"terminated": term(doc)}
        if len(c.runs) > 1 and not out["lastState"]:
            prev = c.exit_doc(c.runs[-2])
            if prev:
                out["lastState"] = {"terminated": term(prev)}
        return out

    def condition(self, ctype: str, ok: bool, reason: str | None = None) -> dict:
        status = "True" if ok else "False"
        prev = self.transitions.get(ctype)
        if prev is None or prev[0] != status:
            self.transitions[ctype] = (status, now())
        c = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": self.transitions[ctype][1]}
        if reason and not ok:
            c["reason"] = reason
        return c

    def publish(self, final: bool = False) -> None:
        if self.frozen:
            return
        phase = self.phase()
        if final and phase in ("Running", "Pending"):
            # A pod deleted while running ends Failed unless every container exited 0 (kubelet >= 1.27).
            docs = [c.exit_doc() for c in self.ctrs]
            phase = "Succeeded" if docs and all(d and d["exitCode"] == 0 for d in docs) else "Failed"
        ctrs = [self.container_status(c) for c in self.ctrs]
        init = [self.container_status(c) for c in self.init]
        ready = phase == "Running" and all(s["ready"] for s in ctrs) and not final
        status = {
            "phase": phase,
            "hostIP": self.agent.state["gateway"], "hostIPs": [{"ip": self.agent.state["gateway"]}],
            "conditions": [
                self.condition("PodReadyToStartContainers", self.volumes is not None and not self.torn_down),
                self.condition("Initialized", self.init_done(), "ContainersNotInitialized"),
                self.condition("ContainersReady", ready, "ContainersNotReady"),
                self.condition("Ready", ready, "ContainersNotReady"),
            ],
            "containerStatuses": ctrs,
        }
        if init:
            status["initContainerStatuses"] = init
        if self.meta.get("ip"):
            status.update(podIP=self.meta["ip"], podIPs=[{"ip": self.meta["ip"]}])
        if self.meta.get("startTime"):
            status["startTime"] = self.meta["startTime"]
        if status == self.last_status:
            return
        try:
            self.kube.patch(f"/api/v1/namespaces/{self.ns}/pods/{self.name_}/status", {"status": status})
            self.last_status = status
        except KubeError as e:
            if e.status == 404:
                self.gone = True
            else:
                log.warning("status of %s/%s: %s", self.ns, self.name_, e)


def _sec(ts: str | None) -> str | None:
    """RFC 3339 with whole seconds, as the API's Time fields carry."""
    return ts[:19] + "Z" if ts else None


class Agent:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.state = json.loads((state_dir / "cluster.json").read_text())
        self.domain = self.state.get("cluster_domain", "cluster.local")
        self.pki = PKI(state_dir / "pki")
        self.ca_pem = self.pki.ca_crt.read_bytes()
        self.pods_dir = state_dir / "pods"
        self.pods_dir.mkdir(exist_ok=True)
        self.volumes_dir = state_dir / "volumes"
        self.admin = self._kube("admin")
        self._node_kubes: dict[str, Kube] = {}
        self.nodes: dict[str, dict] = {}  # name -> entry of nodes.json
        self.node_objs: dict[str, dict] = {}
        self.workers: dict[str, PodWorker] = {}
        self.ips: dict[str, dict[str, str]] = {}  # node -> ip -> uid
        self.last_ip: dict[str, str] = {}  # node -> the IP handed out last (allocation goes round the range)
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.children: list[subprocess.Popen] = []
        self.wake_sync = threading.Event()
        self.boot_id = os.urandom(8).hex()
        self.node_transition: dict = {}  # (node, condition, status) -> since when

    def _kube(self, name: str) -> Kube:
        return Kube(self.state["server"], str(self.pki.ca_crt), str(self.pki.crt(name)), str(self.pki.key(name)), maxsize=64)

    def node_kube(self, node: str) -> Kube:
        with self.lock:
            if node not in self._node_kubes:
                cert = f"node-{node}"
                if not self.pki.crt(cert).exists():
                    self.pki.issue(cert, f"system:node:{node}", ["system:nodes"])
                self._node_kubes[node] = self._kube(cert)
            return self._node_kubes[node]

    # ---- nodes -----------------------------------------------------------------------------
    def read_nodes(self) -> list[dict]:
        return json.loads((self.state_dir / "nodes.json").read_text())

    def node_alloc(self, node: str) -> dict:
        return ((self.node_objs.get(node) or {}).get("status") or {}).get("allocatable") or {}

    def node_body(self, n: dict) -> dict:
        gw = self.state["gateway"]
        cap = {"cpu": str(n.get("cpu", "4")), "memory": str(n.get("memory", "8Gi")), "pods": str(n.get("pods", 110)),
               "ephemeral-storage": "100Gi", "nvidia.com/gpu": str(n.get("gpus", 0))}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n["name"], "labels": node_labels(n)},
            "spec": {"taints": n.get("taints") or []},
            "status": self.node_status(n, cap, gw),
        }

    def node_status(self, n: dict, cap: dict, gw: str) -> dict:
        t = now()
        def cond(ctype, status, reason, msg):
            since = self.node_transition.setdefault((n["name"], ctype, status), t)
            return {"type": ctype, "status": status, "reason": reason, "message": msg,
                    "lastHeartbeatTime": t, "lastTransitionTime": since}
        return {
            "capacity": cap, "allocatable": cap,
            "addresses": [{"type": "InternalIP", "address": gw}, {"type": "Hostname", "address": n["name"]}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.state["ports"]["kubelet"]}},
            "nodeInfo": {"machineID": n["name"], "systemUUID": n["name"], "bootID": self.boot_id,
                         "kernelVersion": os.uname().release, "osImage": "pretrain local process node",
                         "containerRuntimeVersion": "process://0.1", "kubeletVersion": self.state["versions"]["KUBERNETES_VERSION"],
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "conditions": [
                cond("Ready", "True", "KubeletReady", "process node agent is posting ready status"),
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
            ],
        }

    def sync_nodes(self) -> None:
        """Make the running set match nodes.json: register new nodes, freeze failed/terminated ones."""
        wanted = {n["name"]: n for n in self.read_nodes()}
        for name, n in wanted.items():
            status = n.get("status", "active")
            was = self.nodes.get(name, {}).get("status")
            self.nodes[name] = n
            if status == "active" and was != "active":
                self.register(n)
            elif status in ("failed", "terminated") and was != status:
                log.info("node %s is %s: killing its pods' processes", name, status)
                with self.lock:
                    for w in list(self.workers.values()):
                        if w.node == name:
                            w.freeze()
                            self.workers.pop(w.uid, None)
            elif status == "kubelet-down" and was != status:
                # Workers stay registered (so the orphan clean-up leaves their processes alone) but
                # do nothing more; a later "terminated" (remove_node) kills what still runs.
                log.info("node %s lost its kubelet: its pods' processes run on, unwatched", name)
                with self.lock:
                    for w in self.workers.values():
                        if w.node == name:
                            w.detach()

    def register(self, n: dict) -> None:
        kube = self.node_kube(n["name"])
        body = self.node_body(n)
        existing = kube.get_or_none(f"/api/v1/nodes/{n['name']}")
        if existing is None:
            kube.create("/api/v1/nodes", body)
        else:
            kube.patch(f"/api/v1/nodes/{n['name']}/status", {"status": body["status"]})
        log.info("node %s registered (%s)", n["name"], "spot" if n.get("spot") else "on-demand")

    def heartbeat_loop(self) -> None:
        """One heartbeat thread per active node, as each real node has its own kubelet: a slow
        request for one node must not hold back another node's lease renewal."""
        beating: dict[str, threading.Thread] = {}
        while not self.stop.is_set():
            for name, n in list(self.nodes.items()):
                t = beating.get(name)
                if n.get("status", "active") == "active" and (t is None or not t.is_alive()):
                    beating[name] = threading.Thread(target=self.heartbeat, args=(name,), daemon=True,
                                                     name=f"heartbeat-{name}")
                    beating[name].start()
            self.stop.wait(LEASE_RENEW_S)

    def heartbeat(self, name: str) -> None:
        """Renew the node's lease every LEASE_RENEW_S and keep its status posted (see NODE_STATUS_S), until
        the node stops being active. A request that hangs is cut at LEASE_REQUEST_TIMEOUT_S and the
        next renewal follows at once: the node lifecycle controller marks a node NotReady when its
        lease is older than the grace period (8 s), so one stuck request must not use it up."""
        kube = self.node_kube(name)
        last_checked = last_posted = -NODE_STATUS_REPORT_S
        while not self.stop.is_set():
            n = self.nodes.get(name)
            if n is None or n.get("status", "active") != "active":
                return  # frozen, terminated or removed: heartbeat_loop starts a new thread if it comes back
            started = time.monotonic()
            try:
                self.renew_lease(kube, name)
                if started - last_checked >= NODE_STATUS_S:
                    last_checked = started
                    node = kube.get_or_none(f"/api/v1/nodes/{name}", timeout=LEASE_REQUEST_TIMEOUT_S)
                    if node:
                        self.node_objs[name] = node
                    # A Node deleted from outside (a drill) is not re-created until it is re-added.
                    if node and (started - last_posted >= NODE_STATUS_REPORT_S or not node_ready(node)):
                        body = self.node_body(n)
                        self.node_objs[name] = kube.patch(f"/api/v1/nodes/{name}/status", {"status": body["status"]},
                                                          timeout=LEASE_REQUEST_TIMEOUT_S)
                        last_posted = started
            except Exception as e:  # noqa: BLE001  (the API may be restarting or slow; keep beating)
                log.warning("heartbeat of %s: %s", name, e)
            took = time.monotonic() - started
            if took > LEASE_RENEW_S:
                log.warning("heartbeat of %s took %.1f s (a node's lease older than the grace period makes it NotReady)",
                            name, took)
            self.stop.wait(max(0.0, LEASE_RENEW_S - took))

    def renew_lease(self, kube: Kube, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            kube.patch(path, {"spec": spec}, strategic=False, timeout=LEASE_REQUEST_TIMEOUT_S)
        except KubeError as e:
            if e.status != 404:
                raise
            node = kube.get_or_none(f"/api/v1/nodes/{name}")
            if node is None:
                return
            kube.create_or_exists("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease",
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name,
                                                  "uid": node["metadata"]["uid"]}]},
                "spec": spec})

    # ---- IPs ---------------------------------------------------------------------------------
    def allocate_ip(self, node: str, uid: str) -> str:
        """The next free IP after the last one handed out, round the node's podCIDR, as the CNI
        host-local IPAM does: an IP is not reused at once, so neighbours that still hold the MAC of
        its previous pod in their ARP cache (for up to a minute) never send a new pod's traffic there."""
        with self.lock:
            cidr = self.pod_cidr(node)
            used = self.ips.setdefault(node, {})
            gw = ipaddress.ip_address(self.state["gateway"])
            # .1 is the gateway on a real node's bridge; keep the convention.
            hosts = [str(h) for i, h in enumerate(ipaddress.ip_network(cidr).hosts()) if i != 0 and h != gw]
            last = self.last_ip.get(node)
            start = hosts.index(last) + 1 if last in hosts else 0
            for host in hosts[start:] + hosts[:start]:
                if host not in used:
                    used[host] = uid
                    self.last_ip[node] = host
                    return host
        raise RuntimeError(f"node {node} has no free pod IP in {cidr}")

    def release_ip(self, node: str, uid: str) -> None:
        with self.lock:
            for ip, u in list(self.ips.get(node, {}).items()):
                if u == uid:
                    del self.ips[node][ip]

    def pod_cidr(self, node: str) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            obj = self.node_objs.get(node)
            if obj and obj["spec"].get("podCIDR"):
                return obj["spec"]["podCIDR"]
            obj = self.node_kube(node).get_or_none(f"/api/v1/nodes/{node}")
            if obj:
                self.node_objs[node] = obj
                if obj["spec"].get("podCIDR"):
                    return obj["spec"]["podCIDR"]
            time.sleep(0.2)
        raise VolumeNotReady(f"node {node} has no podCIDR yet")

    # ---- pods ------------------------------------------------------------------------------
    def forget(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)

    def handle_pod(self, pod: dict, deleted: bool = False) -> None:
        node = pod["spec"].get("nodeName")
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            if deleted:
                if w:
                    w.gone = True
                    w.wake.set()
                return
            if not node or self.nodes.get(node, {}).get("status", "active") != "active" or node not in self.nodes:
                return
            if w is None:
                w = PodWorker(self, pod)
                self.workers[uid] = w
                w.start()
            else:
                w.update(pod)

    def adopt_ips(self) -> None:
        for meta in self.pods_dir.glob("*/pod.json"):
            m = json.loads(meta.read_text())
            if m.get("ip") and m.get("node"):
                self.ips.setdefault(m["node"], {})[m["ip"]] = m["uid"]
                # A restarted agent goes on after the highest IP in use (host-local keeps its last on disk).
                last = self.last_ip.get(m["node"])
                if last is None or ipaddress.ip_address(m["ip"]) > ipaddress.ip_address(last):
                    self.last_ip[m["node"]] = m["ip"]

    def pod_loop(self) -> None:
        while not self.stop.is_set():
            try:
                lst = self.admin.get("/api/v1/pods")
                seen = set()
                for pod in lst["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.handle_pod(pod)
                self.cleanup_orphans(seen)
                rv = lst["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    for ev in self.admin.watch("/api/v1/pods", rv, timeout_s=120):
                        obj = ev["object"]
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if ev["type"] == "BOOKMARK":
                            continue
                        self.handle_pod(obj, deleted=ev["type"] == "DELETED")
                        if self.reload.is_set():
                            break
                    if self.reload.is_set():
                        self.reload.clear()
                        break
            except KubeError as e:
                if e.status != 410:
                    log.warning("pod watch: %s", e)
                    time.sleep(1)
            except Exception as e:  # noqa: BLE001  (reconnect on any stream error)
                log.warning("pod watch: %s", e)
                time.sleep(1)

    def cleanup_orphans(self, live_uids: set[str]) -> None:
        """Pod folders whose pod is gone (deleted while the agent was down): kill and remove."""
        for d in self.pods_dir.iterdir():
            uid_file = d / "uid"
            if not uid_file.exists():
                continue
            uid = uid_file.read_text().strip()
            with self.lock:
                known = uid in self.workers
            if uid not in live_uids and not known:
                meta = json.loads((d / "pod.json").read_text()) if (d / "pod.json").exists() else {}
                for cdir in (d / "containers").glob("*") if (d / "containers").exists() else []:
                    c = Container({"name": cdir.name}, False, d)
                    c.kill_hard()
                podnet.delete(uid)
                if meta.get("node"):
                    self.release_ip(meta["node"], uid)
                unmount_under(d)
                shutil.rmtree(d, ignore_errors=True)
                log.info("cleaned up pod folder %s (pod gone)", d.name)

    # ---- storage -------------------------------------------------------------------------------
    def ensure_storage_class(self) -> None:
        self.admin.create_or_exists("/apis/storage.k8s.io/v1/storageclasses", {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
        })

    def provisioner_loop(self) -> None:
        """Dynamic provisioning: a folder per claim, a PV pointing at it; Released PVs are deleted."""
        while not self.stop.is_set():
            try:
                for pvc in self.admin.get("/api/v1/persistentvolumeclaims")["items"]:
                    self.provision(pvc)
                for pv in self.admin.get("/api/v1/persistentvolumes")["items"]:
                    ann = pv["metadata"].get("annotations") or {}
                    if ann.get("pv.kubernetes.io/provisioned-by") == PROVISIONER and \
                            (pv.get("status") or {}).get("phase") == "Released" and \
                            pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                        shutil.rmtree(pv["spec"]["hostPath"]["path"], ignore_errors=True)
                        self.admin.delete(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
            except Exception as e:  # noqa: BLE001
                log.warning("provisioner: %s", e)
            self.stop.wait(1.0)

    def provision(self, pvc: dict) -> None:
        if (pvc.get("status") or {}).get("phase") != "Pending" or pvc["spec"].get("volumeName"):
            return
        sc = pvc["spec"].get("storageClassName")
        ann = pvc["metadata"].get("annotations") or {}
        if sc != STORAGE_CLASS and ann.get("volume.kubernetes.io/storage-provisioner") != PROVISIONER:
            return
        uid = pvc["metadata"]["uid"]
        name = f"pvc-{uid}"
        path = self.volumes_dir / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        self.admin.create_or_exists("/api/v1/persistentvolumes", {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {"capacity": {"storage": pvc["spec"]["resources"]["requests"]["storage"]},
                     "accessModes": pvc["spec"].get("accessModes") or ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Delete", "storageClassName": sc or STORAGE_CLASS,
                     "volumeMode": pvc["spec"].get("volumeMode", "Filesystem"),
                     "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                     "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                  "namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"], "uid": uid}},
        })

    # ---- main --------------------------------------------------------------------------------
    def reap_loop(self) -> None:
        while not self.stop.is_set():
            self.children = [p for p in self.children if p.poll() is None]
            self.stop.wait(1.0)

    def run(self) -> None:
        from .logserver import serve_logs
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set() or self.wake_sync.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.ensure_storage_class()
        self.adopt_ips()
        self.sync_nodes()
        serve_logs(self)
        for target in (self.heartbeat_loop, self.pod_loop, self.provisioner_loop, self.reap_loop):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        (self.state_dir / "agent.ready").write_text(str(os.getpid()))
        log.info("node agent running %d node(s)", len(self.nodes))
        while not self.stop.is_set():
            if self.wake_sync.wait(0.5):
                self.wake_sync.clear()
                try:
                    self.sync_nodes()
                except Exception as e:  # noqa: BLE001
                    log.exception("sync nodes: %s", e)
        log.info("node agent stopping; pods keep running and are adopted by the next agent")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    Agent(Path(sys.argv[1])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
