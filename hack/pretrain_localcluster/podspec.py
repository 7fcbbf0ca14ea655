"""Pure functions from a pod (a dict as the API returns it) to what the node agent does:
environment, /etc files, the pod's phase and conditions. No I/O here."""

from __future__ import annotations

import math
import re
from decimal import Decimal

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NONROOT_UID = 65532  # the uid used when runAsNonRoot is set without a runAsUser (distroless "nonroot")

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity(q: str | int | float | None) -> Decimal:
    """A Kubernetes resource quantity as a number ("500m" -> 0.5, "1Gi" -> 1073741824)."""
    if q is None:
        return Decimal(0)
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(q).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"bad quantity {q!r}")
    return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2)])


def _get(d: dict | None, *path, default=None):
    for p in path:
        if not isinstance(d, dict):
            return default
        d = d.get(p)
    return default if d is None else d


def field_ref(pod: dict, path: str, pod_ip: str | None, host_ip: str | None) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in ("metadata.labels", "metadata.annotations"):
        return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get(path.split(".")[1]) or {}).items()))
    if path not in simple:
        raise ValueError(f"unsupported fieldRef {path}")
    return simple[path] or ""


def resource_ref(container: dict, resource: str, divisor: str | None, node_alloc: dict) -> str:
    """resourceFieldRef: limits fall back to the node's allocatable, requests to 0 (as kubelet)."""
    kind, name = resource.split(".", 1)
    value = _get(container, "resources", kind, name)
    if value is None:
        value = node_alloc.get(name, "0") if kind == "limits" else "0"
    v = quantity(value) / quantity(divisor or "1")
    return str(int(math.ceil(v)))


def container_env(pod: dict, c: dict, *, pod_ip: str | None, host_ip: str | None, node_alloc: dict,
                  lookup, api_host: str, api_port: int) -> dict[str, str]:
    """The container's environment, in the kubelet's order: service env, envFrom, env.

    `lookup(kind, name, key|None, optional)` reads a ConfigMap or Secret key (or all keys when key
    is None); it returns None for an optional miss and raises for a required one.
    """
    env: dict[str, str] = {
        "PATH": DEFAULT_PATH,
        "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
        "KUBERNETES_SERVICE_HOST": api_host,
        "KUBERNETES_SERVICE_PORT": str(api_port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(api_port),
        "KUBERNETES_PORT": f"tcp://{api_host}:{api_port}",
        "KUBERNETES_PORT_443_TCP": f"tcp://{api_host}:{api_port}",
        "KUBERNETES_PORT_443_TCP_ADDR": api_host,
        "KUBERNETES_PORT_443_TCP_PORT": str(api_port),
        "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
    }
    for src in c.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind in ("configMapRef", "secretRef"):
            if kind in src:
                data = lookup(kind[:-3], src[kind]["name"], None, src[kind].get("optional", False)) or {}
                env.update({prefix + k: v for k, v in data.items()})
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = _expand(e.get("value") or "", env)
            continue
        vf = e.get("valueFrom") or {}
        if "fieldRef" in vf:
            env[name] = field_ref(pod, vf["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "resourceFieldRef" in vf:
            ref = vf["resourceFieldRef"]
            target = c
            if ref.get("containerName"):
                target = next(x for x in pod["spec"]["containers"] if x["name"] == ref["containerName"])
            env[name] = resource_ref(target, ref["resource"], ref.get("divisor"), node_alloc)
        elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
            kind = "configMap" if "configMapKeyRef" in vf else "secret"
            ref = vf[kind + "KeyRef"]
            v = lookup(kind, ref["name"], ref["key"], ref.get("optional", False))
            if v is not None:
                env[name] = v
        else:
            env[name] = ""
    return env


def _expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) references to earlier variables, $$ escapes, as the kubelet does."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def entrypoint(image: str) -> list[str]:
    """The command of a container that names none: a pause image's (registry.k8s.io/pause, a
    mirror's copy, pause-amd64: placeholders that hold a node's room) sleeps until stopped; others /bin/sh."""
    repo = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return ["sleep", "infinity"] if repo.startswith("pause") else ["/bin/sh"]


def expand_args(args: list[str], env: dict[str, str]) -> list[str]:
    return [_expand(a, env) for a in args]


def hostname_of(pod: dict) -> str:
    return pod["spec"].get("hostname") or pod["metadata"]["name"]


def hosts_file(pod: dict, pod_ip: str, domain: str) -> str:
    host = hostname_of(pod)
    lines = ["# Kubernetes-managed hosts file (pretrain local cluster).", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback"]
    sub = pod["spec"].get("subdomain")
    ns = pod["metadata"]["namespace"]
    lines.append(f"{pod_ip}\t{host}.{sub}.{ns}.svc.{domain}\t{host}" if sub else f"{pod_ip}\t{host}")
    for ha in pod["spec"].get("hostAliases") or []:
        lines.append(f"{ha['ip']}\t" + "\t".join(ha.get("hostnames", [])))
    return "\n".join(lines) + "\n"


def resolv_conf(pod: dict, nameserver: str, domain: str) -> str:
    ns = pod["metadata"]["namespace"]
    cfg = pod["spec"].get("dnsConfig") or {}
    search = [f"{ns}.svc.{domain}", f"svc.{domain}", domain] + list(cfg.get("searches") or [])
    servers = [nameserver] + list(cfg.get("nameservers") or [])
    opts = {"ndots": "5"}
    for o in cfg.get("options") or []:
        opts[o["name"]] = o.get("value")
    out = [f"nameserver {s}" for s in servers] + ["search " + " ".join(search)]
    out.append("options " + " ".join(k if v is None else f"{k}:{v}" for k, v in opts.items()))
    return "\n".join(out) + "\n"


def run_as(pod: dict, c: dict) -> tuple[int | None, int | None, list[int]]:
    """(uid, gid, supplemental groups) from the pod's and container's securityContext."""
    psc = pod["spec"].get("securityContext") or {}
    csc = c.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    if uid is None and csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        uid = NONROOT_UID
    if gid is None and uid is not None:
        gid = uid
    groups = list(psc.get("supplementalGroups") or [])
    if psc.get("fsGroup") is not None:
        groups.append(psc["fsGroup"])
    return uid, gid, groups


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def pod_phase(policy: str, init_done: bool, init_failed: bool, states: list[dict]) -> str:
    """Phase from the containers' states, each {"state": waiting|running|terminated, "exitCode"}.

    A terminated container that the policy restarts counts as not finished."""
    if init_failed:
        return "Failed"
    if not init_done:
        return "Pending"
    if any(s["state"] == "running" for s in states):
        return "Running"
    if states and all(s["state"] == "terminated" for s in states):
        if any(should_restart(policy, s["exitCode"]) for s in states):
            return "Running"
        return "Succeeded" if all(s["exitCode"] == 0 for s in states) else "Failed"
    return "Pending"
