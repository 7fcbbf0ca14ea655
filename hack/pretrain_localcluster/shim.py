"""The container shim (what conmon is to CRI-O): one per container process.

    python -m pretrain_localcluster.shim SPEC.json      # run by the node agent, as root

It joins the pod's network namespace, makes a private mount and UTS namespace, sets the pod's
hostname, builds the container's root (an overlay over the host's `/` with its upper layer on a
tmpfs, so the container can write anywhere without touching the host), bind-mounts the volumes and
the pod's /etc/hosts and /etc/resolv.conf, gives it a /dev of its own (the host's devices, its own
writes) with the termination message file, puts the process in a memory cgroup when the container
has a memory limit and in the pods' CPU cgroup (weighted below the node agent and the control
plane, as a kubelet's system-reserved CPU keeps a busy node's heartbeat alive), then forks the
container: its own process group, chroot, uid/gid/groups, working directory, environment, exec. The shim stays as its parent: it forwards SIGTERM/SIGINT to
the container's process group, writes its output as CRI log lines (`<RFC3339Nano> stdout|stderr F
<line>`), and when it exits kills what is left of the group and writes `exit.json` (exit code,
signal, reason Completed/Error/OOMKilled/StartError, times, and the termination message: what the
container wrote to its terminationMessagePath, or with FallbackToLogsOnError a failed container's
last log lines). Because every mount lives in the container's own mount namespace, nothing is left
mounted on the host when it ends.

Limits: no PID or IPC namespace (containers see the host's processes); CPU limits are not enforced;
no seccomp or capabilities dropping.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
MEMCG = Path("/sys/fs/cgroup/memory")
CPUCG = Path("/sys/fs/cgroup/cpu")
# Every pod process shares one CPU cgroup whose weight is half that of one process outside it (the
# node agent's and the control plane's threads have the default 1024), as a kubelet's
# system-reserved CPU does. Idle, the pods get every core; when the node agent or the API server
# needs CPU, it gets it first. A node heartbeat held back past the 8 s grace period makes the node
# NotReady, and the operator takes its pods for lost: a false preemption (seen once in CI on a
# loaded machine).
KUBEPODS_CPU_SHARES = 512

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {src} on {target}")


def mount_points() -> set[str]:
    """The mount points of this mount namespace."""
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].replace("\\040", " ") for line in f}


def unmount_under(path: str | Path) -> None:
    """Detach every mount at or under `path` in this mount namespace, deepest first (a medium
    Memory emptyDir is a tmpfs in the node agent's: see volumes.py). Nothing mounted: nothing done."""
    prefix = os.path.realpath(path)
    for mp in sorted((p for p in mount_points() if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True):
        _libc.umount2(mp.encode(), MNT_DETACH)  # one already gone: nothing to do


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def in_root(root: str, path: str) -> str:
    """`path` inside `root`, following symlinks as the container will see them (an absolute link
    such as /var/run -> /run points inside the root, never at the host's)."""
    parts = [p for p in path.split("/") if p and p != "."]
    cur = ""
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            cur = cur.rsplit("/", 1)[0] if cur else ""
            continue
        candidate = f"{cur}/{part}"
        full = root + candidate
        if os.path.islink(full):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks under {path}")
            target = os.readlink(full)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                cur = ""
            continue
        cur = candidate
    return root + (cur or "/")


def enter_pod(spec: dict) -> tuple[str, bool]:
    """Namespaces, hostname and the container's root; returns the root path and whether its /dev
    is its own (private_dev)."""
    if spec.get("netns"):
        with open(spec["netns"]) as f:
            _check(_libc.setns(f.fileno(), CLONE_NEWNET), "setns(net)")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(mount, uts)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    socket.sethostname(spec["hostname"])

    scratch = spec["scratch"]
    os.makedirs(scratch, exist_ok=True)
    mount("tmpfs", scratch, "tmpfs", 0, f"size={spec.get('scratchSize', '4g')},mode=0755")
    upper, work, root = (os.path.join(scratch, d) for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        os.makedirs(d)
    mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={upper},workdir={work}")
    # The overlay shows only the root file system: add the kernel's, fresh where per-namespace.
    mount("/proc", root + "/proc", None, MS_BIND | MS_REC)
    own_dev = private_dev(root, scratch)
    try:
        mount("sysfs", root + "/sys", "sysfs", MS_NOSUID | MS_NODEV)  # shows the pod's own links
    except OSError:
        mount("/sys", root + "/sys", None, MS_BIND | MS_REC)
    for m in spec.get("mounts", []):
        target = in_root(root, m["target"])
        if os.path.isdir(m["source"]):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "a").close()
        mount(m["source"], target, None, MS_BIND | MS_REC)
        if m.get("readOnly"):
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    # Commands run with this machine's Python: a volume mounted over the checkout holding it (an
    # emptyDir at /tmp over a clone in /tmp) would hide it, so it is shown again, read-only.
    targets = [os.path.normpath(m["target"]) for m in spec.get("mounts", [])]
    for host in spec.get("hostVisible", []):
        if any(host.startswith(t.rstrip("/") + "/") for t in targets):
            inside = in_root(root, host)
            os.makedirs(inside, exist_ok=True)
            mount(host, inside, None, MS_BIND | MS_REC)
            mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if spec.get("uid") not in (None, 0):
        for exe in spec.get("searchable", []):
            searchable(root, exe)
    return root, own_dev


def private_dev(root: str, scratch: str) -> bool:
    """The host's /dev in an overlay of the container's own (its upper layer on the scratch tmpfs),
    as a runtime gives each container its own /dev: what the container writes there, its
    termination log first, stays its own. The device nodes are the host's. The file systems
    mounted under /dev (shm, pts, mqueue) are bound in as they are: an overlay shows only /dev's.
    Where the kernel refuses that overlay, the host's /dev is bound as it is (False): the container
    then writes to the host's, so nothing is created there for it."""
    upper, work = os.path.join(scratch, "dev-upper"), os.path.join(scratch, "dev-work")
    os.makedirs(upper)
    os.makedirs(work)
    try:
        mount("overlay", root + "/dev", "overlay", 0, f"lowerdir=/dev,upperdir={upper},workdir={work}")
    except OSError:
        mount("/dev", root + "/dev", None, MS_BIND | MS_REC)
        return False
    points = sorted(p for p in mount_points() if p.startswith("/dev/"))
    bound: list[str] = []
    for mp in points:
        if not any(mp.startswith(b + "/") for b in bound) and os.path.isdir(mp):
            mount(mp, root + mp, None, MS_BIND | MS_REC)
            bound.append(mp)
    return True


def termination_log(root: str, spec: dict, own_dev: bool) -> int | None:
    """Create the container's termination message file (empty, writable by any user, as the
    kubelet does) at its terminationMessagePath inside the container; returns a descriptor of it
    (not inherited by the container), or None if it cannot be made (then there is no message).
    The shim reads the message through that descriptor, never by path: a path the container could
    turn into a symlink would make the shim, root outside the chroot, read a host file."""
    path = spec.get("terminationMessagePath") or "/dev/termination-log"
    if not own_dev and path.startswith("/dev/"):
        return None  # it would be the host's /dev
    try:
        inside = in_root(root, path)
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        fd = os.open(inside, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        os.fchmod(fd, 0o666)
        return fd
    except OSError:
        return None


MAX_MESSAGE = 4096  # the kubelet's limit per container
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048  # FallbackToLogsOnError: the log's last lines, at most this much


def termination_message(fd: int | None, spec: dict, exit_code: int) -> str:
    """What the container wrote to its termination log; with FallbackToLogsOnError and nothing
    written, a failed container's last log lines instead."""
    message = ""
    if fd is not None:
        try:
            message = os.pread(fd, MAX_MESSAGE, 0).decode(errors="replace")
        except OSError:
            pass
        os.close(fd)
    if not message and exit_code != 0 and spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        try:
            with open(spec["logPath"], "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * FALLBACK_BYTES))
                lines = f.read().decode(errors="replace").splitlines()[-FALLBACK_LINES:]
        except OSError:
            lines = []
        text = "\n".join(ln.split(" ", 3)[3] if ln.count(" ") >= 3 else ln for ln in lines)  # CRI prefix off
        message = text[-FALLBACK_BYTES:]
    return message


def searchable(root: str, path: str) -> None:
    """Let a non-root container reach `path` (the interpreter it is told to use, e.g. under
    /root/.pyenv): add search permission to its ancestors. The change lands in the overlay's
    upper layer only; the host's directories keep their modes."""
    parts = [p for p in os.path.dirname(path).split("/") if p]
    cur = root
    for p in parts:
        cur = os.path.join(cur, p)
        try:
            st = os.stat(cur)
            if not st.st_mode & 0o001:
                os.chmod(cur, st.st_mode | 0o005)
        except OSError:
            return


def memory_cgroup(spec: dict) -> Path | None:
    limit = spec.get("memoryLimitBytes")
    if not limit or not (MEMCG / "memory.limit_in_bytes").exists():
        return None
    cg = MEMCG / "pretrain-local" / spec["id"]
    cg.mkdir(parents=True, exist_ok=True)
    (cg / "memory.limit_in_bytes").write_text(str(int(limit)))
    return cg


def kubepods_cpu_cgroup() -> Path | None:
    """The pods' CPU cgroup (cgroup v1), or None where it cannot be made (no cpu controller, no root)."""
    cg = CPUCG / "pretrain-local-kubepods"  # a child of the root: its weight is against the root's processes
    try:
        cg.mkdir(exist_ok=True)
        (cg / "cpu.shares").write_text(str(KUBEPODS_CPU_SHARES))
    except OSError:
        return None
    return cg


def oom_killed(cg: Path | None) -> bool:
    if cg is None:
        return False
    try:
        for line in (cg / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                return True
    except OSError:
        pass
    return False


def run(spec: dict) -> int:
    state = Path(spec["stateDir"])
    state.mkdir(parents=True, exist_ok=True)
    log = open(spec["logPath"], "ab", buffering=0)
    started = now_rfc3339()
    try:
        root, own_dev = enter_pod(spec)
        cg = memory_cgroup(spec)
        cpu_cg = kubepods_cpu_cgroup()
    except OSError as e:
        log.write(f"{now_rfc3339()} stderr F shim: cannot set up the container: {e}\n".encode())
        _write_json(state / "exit.json", {"exitCode": 128, "reason": "StartError", "message": str(e),
                                           "startedAt": started, "finishedAt": now_rfc3339()})
        return 0

    message_fd = termination_log(root, spec, own_dev)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    exec_err_r, exec_err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the container
        try:
            os.setpgid(0, 0)
            for group in (cg, cpu_cg):
                if group is not None:
                    (group / "cgroup.procs").write_text(str(os.getpid()))
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            devnull = os.open("/dev/null", os.O_RDONLY)
            os.dup2(devnull, 0)
            os.chroot(root)
            os.chdir(spec.get("workingDir") or "/")
            gid, uid = spec.get("gid"), spec.get("uid")
            if uid is not None or gid is not None or spec.get("groups"):
                os.setgroups([int(g) for g in spec.get("groups", [])])
            if gid is not None:
                os.setgid(int(gid))
            if uid is not None:
                os.setuid(int(uid))
            os.umask(0o022)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException as e:  # noqa: BLE001  (report anything to the parent, then die)
            os.write(exec_err_w, f"{type(e).__name__}: {e}".encode())
            os._exit(127)
    os.close(out_w)
    os.close(err_w)
    os.close(exec_err_w)
    _write_json(state / "container.json", {"pid": pid, "startedAt": started})

    def forward(sig, _frame):
        # To the container's main process only, as a container runtime signals its first process:
        # to its whole group, the trainer's ranks got the kubelet's SIGTERM straight, beside the
        # launcher's forwarding, and a launcher that forwarded nothing passed every local test.
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, forward)

    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, b"stdout")
    sel.register(err_r, selectors.EVENT_READ, b"stderr")
    partial = {b"stdout": b"", b"stderr": b""}

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            try:
                data = os.read(key.fd, 65536)
            except InterruptedError:
                continue
            stream = key.data
            if not data:
                sel.unregister(key.fd)
                if partial[stream]:
                    log.write(f"{now_rfc3339()} ".encode() + stream + b" P " + partial[stream] + b"\n")
                    partial[stream] = b""
                continue
            lines = (partial[stream] + data).split(b"\n")
            partial[stream] = lines.pop()
            ts = now_rfc3339().encode()
            log.write(b"".join(ts + b" " + stream + b" F " + ln + b"\n" for ln in lines))

    status = None
    while status is None:
        pump(0.2)
        try:
            wpid, st = os.waitpid(pid, os.WNOHANG)
        except InterruptedError:
            continue
        if wpid == pid:
            status = st
    # The container's main process is gone: so is the rest of its group, as when a cgroup dies.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 2.0
    while sel.get_map() and time.monotonic() < deadline:
        pump(0.1)

    exec_error = os.read(exec_err_r, 4096).decode(errors="replace")
    finished = now_rfc3339()
    doc: dict = {"startedAt": started, "finishedAt": finished}
    if os.WIFSIGNALED(status):
        doc.update(exitCode=128 + os.WTERMSIG(status), signal=os.WTERMSIG(status))
    else:
        doc["exitCode"] = os.WEXITSTATUS(status)
    if exec_error:
        doc.update(exitCode=128, reason="StartError", message=exec_error)
        log.write(f"{finished} stderr F {exec_error}\n".encode())
    elif oom_killed(cg):
        doc["reason"] = "OOMKilled"
    else:
        doc["reason"] = "Completed" if doc["exitCode"] == 0 else "Error"
    if not exec_error:
        message = termination_message(message_fd, spec, doc["exitCode"])
        if message:
            doc["message"] = message
    _write_json(state / "exit.json", doc)
    if cg is not None:
        try:
            cg.rmdir()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(Path(sys.argv[1]).read_text())))
