"""Running the trainer for real: torchrun with gloo on CPU, one small job config per test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def write_config(d: Path, *, nproc: int = 1, data: int = 1, tensor: int = 1, pipeline: int = 1, schedule: str = "1F1B",
                 steps: int = 6, interval: int = 3, micro: int = 2, global_batch: int = 4, keep: int = 3,
                 extra: dict | None = None) -> Path:
    spec = {"nodes": 1, "nprocPerNode": nproc,
            "parallelism": {"data": data, "tensor": tensor, "pipeline": pipeline, "pipelineSchedule": schedule},
            "model": {"preset": "tiny"}, "data": {"seqLen": 32, "globalBatchSize": global_batch, "microBatchSize": micro},
            "training": {"steps": steps, "logEverySteps": 1}, "optimizer": {"warmupSteps": min(2, steps)},
            "checkpoint": {"path": str(d / "ckpt"), "intervalSteps": interval, "keep": keep}}
    for k, v in (extra or {}).items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    p = d / "job.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def free_port() -> str:
    """A TCP port free now (the kernel's pick), for a run's rendezvous: a fixed or pid-derived one
    was shared by every test of a session, and a run left behind by a timed-out test held it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def env(podinfo: Path | None = None) -> dict:
    e = dict(os.environ, PRETRAIN_METRICS_PORT="0", OMP_NUM_THREADS="1")
    if podinfo:
        e["PRETRAIN_PODINFO_DIR"] = str(podinfo)
    return e


def injected(tmp_path: Path, code: str, base: dict | None = None) -> dict:
    """An environment (`base`, else env()) whose Python processes run `code` at start-up, as a
    sitecustomize: how the tests inject a fault into the trainer and its forked or spawned ranks."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(code)
    e = dict(base if base is not None else env())
    e["PYTHONPATH"] = os.pathsep.join([str(inject), e.get("PYTHONPATH", "")])
    return e


def cmd(config: Path, nproc: int, losses: Path, launch: bool = False, launch_options: tuple[str, ...] = (),
        torchrun: bool = False) -> list[str]:
    """The trainer's command line: one process; `nproc` ranks forked by the pods' launcher (torchrun's
    agent, one import of torch for all: on 2 cores a 4-rank test took 13 s instead of 25 with
    torchrun's fresh interpreters, the 8-rank one 24 s instead of 53), or with `torchrun` torchrun's
    own; or (launch) the launcher with torchrun's options before the subcommand, the rest from the
    environment (PET_*)."""
    args = ["train", "--config", str(config), "--losses-out", str(losses)]
    if launch:
        options = list(launch_options)
    elif nproc == 1:
        return [sys.executable, "-m", "pretrain_trainer", *args]
    else:
        options = ["--nproc_per_node", str(nproc), "--master_port", free_port()]
        if torchrun:
            return [TORCHRUN, *options, "-m", "pretrain_trainer", *args]
    return [sys.executable, "-m", "pretrain_trainer", "launch", *options, *args]


def run(config: Path, nproc: int, losses: Path, timeout: float = 300, torchrun: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd(config, nproc, losses, torchrun=torchrun), env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(path: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, so a later line for a step wins."""
    out = {}
    for line in path.read_text().splitlines():
        s, v = line.split()
        out[int(s)] = float(v)
    return out


def loss_steps(path: Path) -> list[int]:
    """The steps of `path`'s lines in the order they were written: a run resumed from step k
    appends k+1, k+2...; one that ignored its checkpoint would append 1, 2... (which `losses`
    hides: the later line for a step wins)."""
    return [int(line.split()[0]) for line in path.read_text().splitlines()]


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Return as soon as `path` shows `step` (polled every 5 ms: a tiny model trains a step in about
    10 ms, so a test that signals the run next needs it to have many steps left; 40 are plenty)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and any(int(ln.split()[0]) >= step for ln in path.read_text().splitlines() if ln.strip()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def single_process_losses(d: Path, **config) -> dict[int, float]:
    """Train in one process in a fresh folder `d` and return its per-step losses (the reference)."""
    d.mkdir()
    run(write_config(d, **config), 1, d / "losses.txt")
    return losses(d / "losses.txt")
