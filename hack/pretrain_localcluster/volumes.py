"""Pod volumes materialized as folders under the pod's folder, then bind-mounted by the shim.

emptyDir (medium Memory: a tmpfs of its sizeLimit when the agent runs as root), hostPath,
configMap, secret, downwardAPI (refreshed by the agent when labels or annotations change, as the
kubelet does), projected (serviceAccountToken through the TokenRequest
API, renewed past 80 % of its lifetime as the kubelet does; configMap, secret, downwardAPI) and
persistentVolumeClaim (the bound PV's local folder).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import time
from pathlib import Path

from . import podspec
from .shim import MS_NODEV, MS_NOSUID, mount


class VolumeNotReady(RuntimeError):
    """A volume cannot be set up yet (a PVC not bound, a ConfigMap missing): retry later."""


def _write_files(dst: Path, files: dict[str, bytes], mode: int = 0o644) -> None:
    """Atomic swap of the whole folder's content, like the kubelet's ..data symlink dance."""
    dst.mkdir(parents=True, exist_ok=True)
    staging = dst / f"..data_tmp_{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for rel, data in files.items():
        p = staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
    staging.chmod(0o755)
    old = dst / "..data"
    target_name = f"..{os.urandom(4).hex()}"
    os.rename(staging, dst / target_name)
    tmp_link = dst / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(target_name, tmp_link)
    prev = os.readlink(old) if old.is_symlink() else None
    os.replace(tmp_link, old)
    for rel in files:
        top = rel.split("/", 1)[0]
        link = dst / top
        if not link.is_symlink() and not link.exists():
            os.symlink(f"..data/{top}", link)
    if prev:
        shutil.rmtree(dst / prev, ignore_errors=True)


def _items(data: dict[str, bytes], items: list | None) -> dict[str, bytes]:
    if not items:
        return dict(data)
    return {it["path"]: data[it["key"]] for it in items if it["key"] in data}


def read_config_source(kube, ns: str, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
    """A ConfigMap's or Secret's data as bytes (binaryData included); None for an optional miss."""
    obj = kube.get_or_none(f"/api/v1/namespaces/{ns}/{'configmaps' if kind == 'configMap' else 'secrets'}/{name}")
    if obj is None:
        if optional:
            return None
        raise VolumeNotReady(f"{kind} {ns}/{name} not found")
    if kind == "secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def renewal_due(issued: float, expires: float) -> float:
    """When the kubelet renews a projected token: past 80 % of its lifetime, or a day old."""
    return issued + min(0.8 * (expires - issued), 24 * 3600)


class VolumeBuilder:
    """Builds a pod's volumes. `kube` is the node's client; `admin` reads PVs (cluster-scoped)."""

    def __init__(self, kube, admin, pod: dict, pod_dir: Path, pod_ip_fn, host_ip: str, ca_pem: bytes):
        self.kube, self.admin, self.pod, self.pod_dir = kube, admin, pod, pod_dir
        self.pod_ip_fn, self.host_ip, self.ca_pem = pod_ip_fn, host_ip, ca_pem
        self.ns = pod["metadata"]["namespace"]
        self.tokens: dict[str, float] = {}  # projected volume -> when its tokens are due for renewal

    def _cm_or_secret(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        return read_config_source(self.kube, self.ns, kind, name, optional)

    def downward_files(self, items: list) -> dict[str, bytes]:
        out = {}
        for it in items or []:
            if "fieldRef" in it:
                v = podspec.field_ref(self.pod, it["fieldRef"]["fieldPath"], self.pod_ip_fn(), self.host_ip)
            else:
                ref = it["resourceFieldRef"]
                c = next(x for x in self.pod["spec"]["containers"] if x["name"] == ref.get("containerName", x["name"]))
                v = podspec.resource_ref(c, ref["resource"], ref.get("divisor"), {})
            out[it["path"]] = v.encode()
        return out

    def _token(self, src: dict) -> tuple[bytes, float]:
        """A bound token for the pod's service account, and when it is due for renewal."""
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [src["audience"]] if src.get("audience") else None,
                         "expirationSeconds": src.get("expirationSeconds", 3607),
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod["metadata"]["name"],
                                            "uid": self.pod["metadata"]["uid"]}}}
        if body["spec"]["audiences"] is None:
            del body["spec"]["audiences"]
        issued = time.time()
        tr = self.kube.create(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
        expires = dt.datetime.fromisoformat(tr["status"]["expirationTimestamp"]).timestamp()
        return tr["status"]["token"].encode(), renewal_due(issued, expires)

    def refresh_tokens(self, now: float | None = None) -> list[str]:
        """Renew the projected service-account tokens that are due, as the kubelet does; returns
        the volumes rewritten (atomically: a reader sees the old token or the new one)."""
        now = time.time() if now is None else now
        due = [v for v in self.pod["spec"].get("volumes") or [] if v["name"] in self.tokens and now >= self.tokens[v["name"]]]
        for vol in due:
            self.build(vol)
        return [v["name"] for v in due]

    def build(self, vol: dict) -> str:
        """Make the volume's folder (or find its host path); returns the path to bind-mount."""
        name = vol["name"]
        base = self.pod_dir / "volumes" / name
        mode = lambda v: v.get("defaultMode", 0o644)  # noqa: E731
        if "emptyDir" in vol:
            base.mkdir(parents=True, exist_ok=True)
            if (vol["emptyDir"] or {}).get("medium") == "Memory" and os.geteuid() == 0 and not os.path.ismount(base):
                # A tmpfs, as the kubelet makes it, its size the sizeLimit (without one, tmpfs's
                # default: half the machine's memory); shared by the pod's containers, unmounted
                # with the pod's sandbox (`unmount_under`).
                size = vol["emptyDir"].get("sizeLimit")
                mount("tmpfs", str(base), "tmpfs", MS_NOSUID | MS_NODEV,
                      "mode=0777" + (f",size={int(podspec.quantity(size))}" if size else ""))
            base.chmod(0o777)  # as the kubelet makes it: writable by whatever user the pod runs as
            self._fs_group(base)
            return str(base)
        if "hostPath" in vol:
            hp = vol["hostPath"]
            p = Path(hp["path"])
            if hp.get("type") in ("DirectoryOrCreate",) or (not hp.get("type") and not p.exists()):
                p.mkdir(parents=True, exist_ok=True)
            elif hp.get("type") == "FileOrCreate" and not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
            if not p.exists():
                raise VolumeNotReady(f"hostPath {p} does not exist")
            return str(p)
        if "configMap" in vol or "secret" in vol:
            kind = "configMap" if "configMap" in vol else "secret"
            src = vol[kind]
            data = self._cm_or_secret(kind, src.get("name") or src.get("secretName"), src.get("optional", False))
            _write_files(base, _items(data or {}, src.get("items")), mode(src))
            return str(base)
        if "downwardAPI" in vol:
            _write_files(base, self.downward_files(vol["downwardAPI"].get("items")), mode(vol["downwardAPI"]))
            return str(base)
        if "projected" in vol:
            files: dict[str, bytes] = {}
            due = []
            for s in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in s:
                    files[s["serviceAccountToken"]["path"]], when = self._token(s["serviceAccountToken"])
                    due.append(when)
                elif "configMap" in s or "secret" in s:
                    kind = "configMap" if "configMap" in s else "secret"
                    d = self._cm_or_secret(kind, s[kind]["name"], s[kind].get("optional", False))
                    files.update(_items(d or {}, s[kind].get("items")))
                elif "downwardAPI" in s:
                    files.update(self.downward_files(s["downwardAPI"].get("items")))
            _write_files(base, files, mode(vol["projected"]))
            if due:
                self.tokens[name] = min(due)
            return str(base)
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            pvc = self.kube.get_or_none(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}")
            if pvc is None or (pvc.get("status") or {}).get("phase") != "Bound":
                raise VolumeNotReady(f"PersistentVolumeClaim {claim} is not bound yet")
            pv = self.admin.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
            path = (pv["spec"].get("hostPath") or pv["spec"].get("local") or {}).get("path")
            if not path:
                raise VolumeNotReady(f"PersistentVolume {pv['metadata']['name']} has no local path")
            Path(path).mkdir(parents=True, exist_ok=True)
            self._fs_group(Path(path))
            return path
        raise VolumeNotReady(f"volume {name}: type not supported by process nodes ({', '.join(k for k in vol if k != 'name')})")

    def _fs_group(self, p: Path) -> None:
        g = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        if g is not None:
            os.chown(p, -1, int(g))
            p.chmod(p.stat().st_mode | 0o2070)

    def refresh_downward(self, pod: dict) -> None:
        """Re-project downwardAPI volumes after a metadata change (labels, annotations)."""
        self.pod = pod
        for vol in pod["spec"].get("volumes") or []:
            if "downwardAPI" in vol:
                self.build(vol)
