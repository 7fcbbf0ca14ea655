"""Start, stop and inspect the local control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, CoreDNS) as local processes.

    hack/local-cluster up        # or: make cluster-up
    hack/local-cluster status
    hack/local-cluster down      # or: make cluster-down

State lives in `.local-cluster/` (LOCAL_CLUSTER_DIR overrides): pki/, kubeconfig, logs/, pids/,
etcd data, and cluster.json (addresses and ports actually used). Limits: one machine; the API
server listens on the pod network's gateway address (loopback when the network is disabled or
we are not root); no kube-proxy, so Service ClusterIPs carry no traffic (headless Services and
DNS do).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from . import binaries, network, nodes, podnet
from .config import ClusterConfig
from .pki import PKI
from .procs import ProcessTable, how_it_ended
from .shim import unmount_under

COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "coredns"]
# Stop order for `down`: consumers first, etcd last (the apiserver flushes to it on exit).
STOP_ORDER = ["prometheus", "operator", "node-agent", "coredns", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]

COREDNS_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
"""


class ClusterError(RuntimeError):
    pass


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_ports(cfg: ClusterConfig, host: str, pod_host: str | None) -> tuple[dict[str, int], list[str]]:
    """Preferred ports where free, else free ones; returns the ports and a note per substitution."""
    chosen: dict[str, int] = {}
    notes = []
    used: set[int] = set()
    for name, port in cfg.ports.model_dump().items():
        bind_host = pod_host if name in ("apiserver", "coredns_pod", "kubelet") and pod_host else host
        if name in ("coredns_pod", "kubelet") and not pod_host:
            continue
        if port in used or not _port_free(bind_host, port):
            new = _free_port(bind_host)
            while new in used:
                new = _free_port(bind_host)
            notes.append(f"port {port} ({name}) is in use on {bind_host}; using {new}")
            port = new
        used.add(port)
        chosen[name] = port
    return chosen, notes


def _ssl_context(pki: PKI | None) -> ssl.SSLContext:
    if pki is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    ctx.load_cert_chain(str(pki.crt("admin")), str(pki.key("admin")))
    return ctx


def _healthy(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            return r.status == 200
    except Exception:
        return False


@contextmanager
def _lifecycle_lock(state_dir: Path):
    """One `up` or `down` at a time per state folder (two terminals, or a test session and a
    leftover run in the same clone). Without it a second `up` took the first one's half-written
    folder for a killed run's and removed it: the first API server then failed on a missing
    pki/sa.key. The lock file is outside the folder, which `down` removes."""
    key = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"pretrain-local-cluster-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class LocalCluster:
    """One local cluster, identified by its state folder."""

    def __init__(self, cfg: ClusterConfig | None = None):
        self.cfg = cfg or ClusterConfig.load()
        self.state_dir = self.cfg.state_dir
        self.procs = ProcessTable(self.state_dir)
        self.pki = PKI(self.state_dir / "pki")

    # ---- state ---------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def health(self) -> dict[str, bool]:
        """Each component's health check, as `status` prints it."""
        st = self.state()
        if not st:
            return {}
        admin = _ssl_context(self.pki)
        anon = _ssl_context(None)
        p = st["ports"]
        lo = "127.0.0.1"
        checks = {
            "etcd": (f"http://{lo}:{p['etcd_metrics']}/health", None),
            "kube-apiserver": (f"{st['server']}/readyz", admin),
            "kube-controller-manager": (f"https://{lo}:{p['controller_manager']}/healthz", anon),
            "kube-scheduler": (f"https://{lo}:{p['scheduler']}/healthz", anon),
            "coredns": (f"http://{lo}:{st['coredns_ready_port']}/ready", None),
        }
        return {name: _healthy(url, ctx) for name, (url, ctx) in checks.items()}

    def is_running(self) -> bool:
        running = self.procs.running()
        wanted = COMPONENTS + (["node-agent"] if (self.state() or {}).get("bridge") else [])
        return bool(running) and all(running.get(c) for c in wanted) and all(self.health().values())

    # ---- up ------------------------------------------------------------------------------
    def up(self, log=print) -> dict:
        """Start the control plane; returns the state. A running cluster is left as it is; an `up`
        or `down` of the same folder in progress elsewhere is waited for."""
        with _lifecycle_lock(self.state_dir):
            return self._up(log)

    def _up(self, log) -> dict:
        t0 = time.monotonic()
        if self.state_dir.exists():
            if self.state() and self.is_running():
                log(f"local cluster already running (state: {self.state_dir})")
                return self.state()
            if any(self.state_dir.iterdir()):
                log(f"found stale state in {self.state_dir} (a killed or half-started run); cleaning it up")
                self._down(log=lambda *_: None)

        paths = binaries.ensure()
        self.state_dir.mkdir(parents=True, exist_ok=True)

        net = self.cfg.network
        use_net = net.enabled and network.can_manage()
        if net.enabled and not use_net:
            log("not root (or no `ip`): no pod network; the control plane listens on loopback only")
        state: dict = {"state_dir": str(self.state_dir), "versions": self.cfg.versions}
        if use_net:
            cidr = network.choose_cidr(net.cluster_cidrs)
            bridge = network.bridge_name(str(self.state_dir))
            # Recorded before creating, so `down` after a crash right here still removes it.
            state.update(cluster_cidr=cidr, bridge=bridge, gateway=network.gateway_of(cidr))
            self._write_state(state)
            network.create_bridge(bridge, cidr)
        host = "127.0.0.1"
        api_host = state.get("gateway", host)
        ports, notes = pick_ports(self.cfg, host, state.get("gateway"))
        for n in notes:
            log(n)
        state["ports"] = ports
        state["server"] = f"https://{api_host}:{ports['apiserver']}"
        state["coredns_ready_port"] = _free_port(host)
        state["cluster_domain"] = net.cluster_domain
        self._write_state(state)

        self._make_pki(state)
        argv = self._argv(paths, state)
        try:
            self.procs.start("etcd", argv["etcd"])
            self.procs.start("kube-apiserver", argv["kube-apiserver"])
            # Not before /readyz: the controller-manager and scheduler exit at once if the
            # bootstrap RBAC roles (made by an apiserver post-start hook) are not there yet.
            self._wait("kube-apiserver", f"{state['server']}/readyz", _ssl_context(self.pki))
            self.procs.start("kube-controller-manager", argv["kube-controller-manager"])
            self.procs.start("kube-scheduler", argv["kube-scheduler"])
            self.kubectl("apply", "-f", "-", input=COREDNS_RBAC)
            (self.state_dir / "Corefile").write_text(self._corefile(state))
            self.procs.start("coredns", argv["coredns"], cwd=self.state_dir)
            for name in COMPONENTS:
                self._wait_component(name)
            if use_net:
                nodes.start_agent(self, state, log)
        except Exception:
            self._down(log=lambda *_: None, keep_logs=True)
            raise
        state["ready_after_s"] = round(time.monotonic() - t0, 2)
        self._write_state(state)
        log(f"local cluster ready in {state['ready_after_s']} s: {state['server']} (state: {self.state_dir})")
        log(f"  export KUBECONFIG={self.cfg.kubeconfig}")
        log("  kubectl get nodes,pods -A")
        return state

    def _write_state(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=2))

    def _make_pki(self, state: dict) -> None:
        pki = self.pki
        pki.ensure_ca()
        ips = ["127.0.0.1", "10.96.0.1"] + ([state["gateway"]] if "gateway" in state else [])
        dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
               f"kubernetes.default.svc.{self.cfg.network.cluster_domain}"]
        pki.issue("apiserver", "kube-apiserver", server=True, client=False, dns=dns, ips=ips)
        pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["system:masters"])
        server = state["server"]
        for name, cn, orgs in [
            ("admin", "admin", ["system:masters"]),
            ("controller-manager", "system:kube-controller-manager", []),
            ("scheduler", "system:kube-scheduler", []),
            ("coredns", "system:coredns", []),
        ]:
            pki.issue(name, cn, orgs)
            target = self.cfg.kubeconfig if name == "admin" else self.state_dir / f"{name}.kubeconfig"
            pki.kubeconfig(target, server, cn, name)

    def _argv(self, paths: dict[str, Path], st: dict) -> dict[str, list[str]]:
        d, p, pki = self.state_dir, st["ports"], self.pki
        lo = "127.0.0.1"
        api_host = st.get("gateway", lo)
        etcd = [
            str(paths["etcd"]), "--name", "local", "--data-dir", str(d / "etcd"),
            "--listen-client-urls", f"http://{lo}:{p['etcd_client']}",
            "--advertise-client-urls", f"http://{lo}:{p['etcd_client']}",
            "--listen-peer-urls", f"http://{lo}:{p['etcd_peer']}",
            "--initial-advertise-peer-urls", f"http://{lo}:{p['etcd_peer']}",
            "--initial-cluster", f"local=http://{lo}:{p['etcd_peer']}",
            "--listen-metrics-urls", f"http://{lo}:{p['etcd_metrics']}",
            "--quota-backend-bytes", str(2 * 1024**3), "--log-level", "warn",
        ]
        apiserver = [
            str(paths["kube-apiserver"]),
            "--etcd-servers", f"http://{lo}:{p['etcd_client']}",
            "--bind-address", api_host, "--secure-port", str(p["apiserver"]),
            "--tls-cert-file", str(pki.crt("apiserver")), "--tls-private-key-file", str(pki.key("apiserver")),
            "--client-ca-file", str(pki.ca_crt),
            "--service-account-key-file", str(pki.dir / "sa.pub"),
            "--service-account-signing-key-file", str(pki.dir / "sa.key"),
            "--service-account-issuer", f"https://kubernetes.default.svc.{self.cfg.network.cluster_domain}",
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins",
            "NodeRestriction,PodSecurity,ServiceAccount,DefaultTolerationSeconds,DefaultStorageClass,"
            "NamespaceLifecycle,LimitRanger,ResourceQuota,Priority,TaintNodesByCondition",
            "--service-cluster-ip-range", self.cfg.network.service_cidr,
            "--kubelet-client-certificate", str(pki.crt("apiserver-kubelet-client")),
            "--kubelet-client-key", str(pki.key("apiserver-kubelet-client")),
            "--kubelet-certificate-authority", str(pki.ca_crt),
            "--kubelet-preferred-address-types", "InternalIP",
            "--allow-privileged=true", "--profiling=false", "--v=1",
        ]
        if "gateway" in st:
            apiserver += ["--advertise-address", st["gateway"]]
        else:
            # A loopback advertise address is refused while the endpoint reconciler runs.
            apiserver += ["--advertise-address", lo, "--endpoint-reconciler-type", "none"]
        cm_kc = str(d / "controller-manager.kubeconfig")
        controller_manager = [
            str(paths["kube-controller-manager"]),
            "--kubeconfig", cm_kc, "--authentication-kubeconfig", cm_kc, "--authorization-kubeconfig", cm_kc,
            "--bind-address", lo, "--secure-port", str(p["controller_manager"]),
            "--service-account-private-key-file", str(pki.dir / "sa.key"),
            "--root-ca-file", str(pki.ca_crt), "--use-service-account-credentials",
            "--cluster-signing-cert-file", str(pki.ca_crt), "--cluster-signing-key-file", str(pki.ca_key),
            "--node-monitor-grace-period", self.cfg.node_monitor_grace_period,
            "--node-monitor-period", "2s",
            "--leader-elect=false", "--controllers", "*",
            "--service-cluster-ip-range", self.cfg.network.service_cidr, "--v=1",
        ]
        if "cluster_cidr" in st:
            controller_manager += [
                "--allocate-node-cidrs", "--cluster-cidr", st["cluster_cidr"],
                "--node-cidr-mask-size", str(self.cfg.network.node_cidr_mask),
            ]
        sch_kc = str(d / "scheduler.kubeconfig")
        scheduler = [
            str(paths["kube-scheduler"]),
            "--kubeconfig", sch_kc, "--authentication-kubeconfig", sch_kc, "--authorization-kubeconfig", sch_kc,
            "--bind-address", lo, "--secure-port", str(p["scheduler"]), "--leader-elect=false", "--v=1",
        ]
        coredns = [str(paths["coredns"]), "-conf", str(d / "Corefile")]
        return {"etcd": etcd, "kube-apiserver": apiserver, "kube-controller-manager": controller_manager,
                "kube-scheduler": scheduler, "coredns": coredns}

    def _corefile(self, st: dict) -> str:
        dom = self.cfg.network.cluster_domain
        kc = self.state_dir / "coredns.kubeconfig"
        block = (
            "  errors\n"
            f"  kubernetes {dom} in-addr.arpa ip6.arpa {{\n"
            f"    kubeconfig {kc} local\n"
            "    pods insecure\n"
            "    fallthrough in-addr.arpa ip6.arpa\n"
            "    ttl 5\n"
            "  }\n"
        )
        out = f".:{st['ports']['coredns']} {{\n  bind 127.0.0.1\n{block}  ready 127.0.0.1:{st['coredns_ready_port']}\n}}\n"
        if "gateway" in st:
            out += f".:{st['ports']['coredns_pod']} {{\n  bind {st['gateway']}\n{block}}}\n"
        return out

    def _wait(self, name: str, url: str, ctx: ssl.SSLContext | None) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while time.monotonic() < deadline:
            if _healthy(url, ctx, timeout=1.0):
                return
            if not self.procs.running().get(name):
                raise self._exited(name)
            time.sleep(0.1)
        raise ClusterError(f"{name} not healthy after {self.cfg.ready_timeout_s:.0f} s ({url}):\n{self.log_tail(name)}")

    def _wait_component(self, name: str) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while time.monotonic() < deadline:
            if self.health().get(name):
                return
            if not self.procs.running().get(name):
                raise self._exited(name)
            time.sleep(0.1)
        raise ClusterError(f"{name} not healthy after {self.cfg.ready_timeout_s:.0f} s:\n{self.log_tail(name)}")

    def _exited(self, name: str) -> ClusterError:
        pid = self.procs.pids().get(name)
        how = how_it_ended(pid) if pid else "no pid file"
        return ClusterError(f"{name} exited during start-up ({how}); the end of its log:\n{self.log_tail(name) or '(empty)'}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        f = self.procs.log_dir / f"{name}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) if f.exists() else "(no log)"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        kubectl = binaries.locate(["kubectl"])["kubectl"]
        proc = subprocess.run([str(kubectl), "--kubeconfig", str(self.cfg.kubeconfig), *args],
                              input=input, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    # ---- down ----------------------------------------------------------------------------
    def down(self, log=print, keep_logs: bool = False) -> None:
        """Stop exactly the processes this state folder started (by pid) and remove the state."""
        with _lifecycle_lock(self.state_dir):
            self._down(log, keep_logs)

    def _down(self, log, keep_logs: bool = False) -> None:
        st = self.state() or {}
        self.procs.stop_all(order=STOP_ORDER)
        # The node agent leaves pods running when it stops (as a kubelet does): kill their processes
        # and remove their network namespaces. Mounts live in the pods' own mount namespaces, but
        # for medium Memory emptyDirs: tmpfs mounts in this one, under the state folder.
        podnet.sweep(st)
        unmount_under(self.state_dir)
        if st.get("bridge") and network.can_manage():
            network.delete_bridge(st["bridge"])
        if keep_logs:
            for child in self.state_dir.iterdir() if self.state_dir.exists() else []:
                if child.name != "logs":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        log(f"local cluster stopped; removed {self.state_dir}" + (" (logs kept)" if keep_logs else ""))

    # ---- status --------------------------------------------------------------------------
    def status(self) -> dict:
        st = self.state()
        if not st:
            return {"running": False, "state_dir": str(self.state_dir)}
        running = self.procs.running()
        health = self.health()
        return {
            "running": self.is_running(),
            "state_dir": str(self.state_dir),
            "server": st.get("server"),
            "kubeconfig": str(self.cfg.kubeconfig),
            "components": {n: {"pid": self.procs.pids().get(n), "running": running.get(n, False),
                               "healthy": health.get(n)} for n in COMPONENTS + (["node-agent"] if st.get("bridge") else [])},
            "ports": st.get("ports"),
            "pod_network": {k: st.get(k) for k in ("bridge", "cluster_cidr", "gateway")},
        }
