"""helm on the chart, for the chart's tests: helm v4 (and v3 for the compatibility checks), built
from their Go modules by hack/build-binaries and cached like the local cluster's binaries."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from pretrain_localcluster import binaries
from pretrain_localcluster.config import REPO_ROOT

CHART = REPO_ROOT / "charts" / "pretrain-operator"
HELMS = {4: "helm", 3: "helm3"}


def helm_bin(major: int = 4) -> Path:
    name = HELMS[major]
    return binaries.ensure([name])[name]


def helm(*args: str, major: int = 4, kubeconfig: Path | None = None, check: bool = True,
         timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [str(helm_bin(major)), *args] + (["--kubeconfig", str(kubeconfig)] if kubeconfig else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[1:])} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def template(*args: str, major: int = 4, release: str = "po", namespace: str = "ops") -> list[dict]:
    """`helm template` of the chart: the rendered objects (CRDs not included)."""
    out = helm("template", release, str(CHART), "-n", namespace, *args, major=major).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]
