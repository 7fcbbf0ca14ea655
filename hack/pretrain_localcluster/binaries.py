"""Where the Go-built binaries are: asks hack/build-binaries (which builds what is missing).

`KUBEBUILDER_ASSETS` (envtest layout) or `PRETRAIN_BIN_DIR` supply prebuilt binaries instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .config import HACK_DIR

BUILD_SCRIPT = HACK_DIR / "build-binaries"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "coredns")


class BinaryError(RuntimeError):
    pass


def ensure(components: tuple[str, ...] | list[str] = CONTROL_PLANE) -> dict[str, Path]:
    """Build anything missing (a no-op when cached), then return each component's binary path."""
    proc = subprocess.run([str(BUILD_SCRIPT), *components], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        # build-binaries already printed one message naming the component and the fix.
        raise BinaryError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "build-binaries failed")
    return locate(components)


def locate(components: tuple[str, ...] | list[str] = CONTROL_PLANE) -> dict[str, Path]:
    out = subprocess.run(
        [str(BUILD_SCRIPT), "--print-dir", *components], check=True, capture_output=True, text=True
    ).stdout.split()
    paths = {c: Path(d) / c for c, d in zip(components, out)}
    missing = [c for c, p in paths.items() if not p.exists()]
    if missing:
        raise BinaryError(f"not built yet: {', '.join(missing)}; run hack/build-binaries {' '.join(missing)}")
    return paths
