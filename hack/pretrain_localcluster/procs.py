"""Starting and stopping the local cluster's processes, by pid, and nothing else.

Each process runs in its own session (so a Ctrl-C in the shell that ran `up` does not reach it),
logs to `<state>/logs/<name>.log`, and is recorded in `<state>/pids/<name>.pid` together with a
marker (the state folder path) that must appear in `/proc/<pid>/cmdline` or environ before we ever
signal that pid: a recycled pid never gets killed by mistake.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


# What ProcessTable.start started in this process, by pid: its Popen and the state folder it is for.
_children: dict[int, tuple[subprocess.Popen, str]] = {}
_ended: dict[int, int] = {}  # wait status of our other children reaped by `alive`


def alive(pid: int) -> bool:
    """True while `pid` runs (zombies count as dead; our own children are reaped here)."""
    child, _ = _children.get(pid, (None, None))
    if child is not None:
        # Asked through its Popen object: a dropped one would be reaped by subprocess's own
        # clean-up at the next Popen, and its exit status lost (`how_it_ended` needs it).
        return child.poll() is None
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            _ended[pid] = status
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def how_it_ended(pid: int) -> str:
    """How a child of this process that `alive` found dead ended: its exit code or the signal that
    killed it (a process killed from outside leaves an empty log: this is the only trace)."""
    child, _ = _children.get(pid, (None, None))
    if child is not None and child.returncode is not None:
        code = child.returncode
    elif pid in _ended:
        code = os.waitstatus_to_exitcode(_ended[pid])
    else:
        return "not a child of this process: its exit status is unknown"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def owned(pid: int, marker: str) -> bool:
    """True if `pid` was started for the state folder `marker` (by this process, or as the marker in
    its cmdline, environ or root says)."""
    child, started_for = _children.get(pid, (None, None))
    if child is not None and child.returncode is None:
        # Known without /proc: for a moment after exec of a large binary, /proc/<pid>/cmdline and
        # environ can both read empty (4 starts in 100 of kube-apiserver here); an API server seen
        # then was taken for dead: "exited during start-up", with an empty log.
        return started_for == marker
    try:
        # A container process: chrooted into a root under the state folder.
        if marker in os.readlink(f"/proc/{pid}/root"):
            return True
    except OSError:
        pass
    for name in ("cmdline", "environ"):
        try:
            if marker.encode() in Path(f"/proc/{pid}/{name}").read_bytes():
                return True
        except OSError:
            pass
    return False


class ProcessTable:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.pid_dir = state_dir / "pids"
        self.log_dir = state_dir / "logs"
        self.marker = str(state_dir)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ if env is None else env)
        full_env["LOCAL_CLUSTER_OWNER"] = self.marker  # the ownership marker, see _owned()
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )
        _children[proc.pid] = proc, self.marker
        (self.pid_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc.pid

    def pids(self) -> dict[str, int]:
        out = {}
        if self.pid_dir.is_dir():
            for p in sorted(self.pid_dir.glob("*.pid")):
                try:
                    out[p.stem] = int(p.read_text().strip())
                except ValueError:
                    continue
        return out

    def running(self) -> dict[str, bool]:
        return {n: alive(pid) and owned(pid, self.marker) for n, pid in self.pids().items()}

    def stop(self, name: str, grace_s: float = 10.0) -> None:
        pid_file = self.pid_dir / f"{name}.pid"
        pid = self.pids().get(name)
        if pid is not None and alive(pid) and owned(pid, self.marker):
            # The whole session: a component's children (if any) go with it.
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                _signal_group(pid, signal.SIGKILL)
                while alive(pid):
                    time.sleep(0.05)
        if pid is not None:
            _children.pop(pid, None)
        pid_file.unlink(missing_ok=True)

    def stop_all(self, order: list[str] | None = None, grace_s: float = 10.0) -> None:
        names = list(self.pids())
        ordered = [n for n in (order or []) if n in names] + [n for n in names if n not in (order or [])]
        for n in ordered:
            self.stop(n, grace_s)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session made pid the group leader
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
