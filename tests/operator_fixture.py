"""The operator under test runs as a real process (`python -m pretrain_operator`) against the
local cluster, as users run it with `make run-operator`; tests can stop it, start it with a crash
point, and read its metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pretrain_operator.contract import url_host
from pretrain_operator.controller import parse_metrics

STANDIN = str(Path(__file__).resolve().parent / "standin_trainer.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class OperatorProcess:
    # Every operator process running now: a test of another operator (the Helm-installed one)
    # pauses these, since two leaders on different Leases would both act on the same jobs.
    live: set["OperatorProcess"] = set()

    def __init__(self, kubeconfig: Path, log_dir: Path):
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.metrics_port = self.health_port = 0
        self.host = "127.0.0.1"
        self.runs = 0

    def start(self, crash_at: str = "", leader_timeout: float = 30, lead: bool = True, **env) -> "OperatorProcess":
        """Start it and wait until it leads (lead=False: until it serves its metrics, leading or not)."""
        self.metrics_port, self.health_port = free_port(), free_port()
        self.runs += 1
        # Bound to IPv6 (PRETRAIN_OPERATOR_BIND_ADDRESS=::), its liveness port listens on IPv6 alone.
        self.host = url_host("::1" if ":" in env.get("PRETRAIN_OPERATOR_BIND_ADDRESS", "") else "127.0.0.1")
        e = dict(os.environ, KUBECONFIG=str(self.kubeconfig),
                 PRETRAIN_OPERATOR_METRICS_PORT=str(self.metrics_port), PRETRAIN_OPERATOR_HEALTH_PORT=str(self.health_port),
                 PRETRAIN_OPERATOR_LEASE_DURATION_S="4", PRETRAIN_OPERATOR_LEASE_RENEW_S="1",
                 PRETRAIN_OPERATOR_RESYNC_S="3", PRETRAIN_OPERATOR_FINISHED_RESYNC_S="3",
                 PRETRAIN_OPERATOR_PROGRESS_INTERVAL_S="1",
                 PRETRAIN_OPERATOR_CRASH_AT=crash_at)
        e.update(env)  # a test's own settings over these
        self.log = open(self.log_dir / f"operator-{self.runs}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pretrain_operator"], env=e, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        OperatorProcess.live.add(self)
        deadline = time.monotonic() + leader_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited at start: {self.log_path.read_text()[-2000:]}")
            if self.metrics().get("pretrain_operator_leader") == (1.0 if lead else 0.0):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"operator did not {'become leader' if lead else 'serve its metrics'} in {leader_timeout:.0f} s: {self.log_path.read_text()[-2000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exited(self) -> int | None:
        """The exit code of a process that ended without stop() (None while running or stopped)."""
        return self.proc.poll() if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.runs}.log"

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=2) as r:
                return parse_metrics(r.read().decode())
        except OSError:
            return {}

    def total(self, name: str) -> float:
        """The sum of every sample of a metric, whatever its labels (0 for a labelled family with no
        sample yet). An operator that cannot be read, or does not export the family, is an error."""
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        family = name.removesuffix("_total")
        assert f"# TYPE {family} " in text or f"# TYPE {name} " in text, f"the operator exports no {name}"
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        OperatorProcess.live.discard(self)
