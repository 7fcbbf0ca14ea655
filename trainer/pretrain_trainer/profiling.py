"""Profiling a few steps with torch.profiler (`training.profile`), as torchtitan's [profiling] does:
each rank writes a Chrome trace of steps `startStep` .. `startStep + steps - 1` (the step before them
warms the profiler up) to `<folder>/steps-<first>-<last>/rank-<N>.json`, by default under the
checkpoint folder, so that on a cluster the traces land on the job's volume beside its checkpoints.

    training: {profile: {startStep: 100, steps: 3}}      # then open the files in ui.perfetto.dev

Each step's events sit under "ProfilerStep#<step>". CPU activity always, CUDA kernels on a GPU; no
shapes, no stacks, no memory (they make traces of a large model hundreds of MB per rank). Limits: one window per run; a run resumed past `startStep`
does not profile (it says so); nor does one whose folder cannot be written (it says so and trains on).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

log = logging.getLogger("pretrain_trainer.profiling")


def folder(spec, checkpoint_root: str) -> Path:
    p = spec.training.profile
    first = p.startStep
    return Path(p.folder or f"{checkpoint_root}/profiles") / f"steps-{first}-{first + p.steps - 1}"


class Profiler:
    """`step()` after every training step; does nothing without `training.profile`."""

    def __init__(self, spec, checkpoint_root: str, rank: int, resumed_at: int):
        self.prof = None
        p = spec.training.profile
        if p is None:
            return
        if p.startStep <= resumed_at:
            if rank == 0:
                log.info("training.profile: step %d is behind this run's start (step %d): not profiled", p.startStep, resumed_at + 1)
            return
        self.out = folder(spec, checkpoint_root) / f"rank-{rank}.json"
        # A folder that cannot be written is said now and the run trains unprofiled: found only
        # at the trace's write it crashed the run after startStep, and every restart before a
        # checkpoint past it crashed there again.
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            probe = self.out.with_suffix(".probe")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            log.warning("training.profile.folder %s cannot be written (%s): this run is not profiled", self.out.parent.parent, e)
            return
        warmup = 1 if p.startStep - 1 > resumed_at else 0  # the step before, when this run trains it
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, on_trace_ready=self._write,
                            schedule=schedule(skip_first=p.startStep - warmup, wait=0, warmup=warmup, active=p.steps, repeat=1))
        # The profiler's step count is the training step's: its schedule is read at the step
        # number, and each step's events sit under "ProfilerStep#<training step>".
        self.prof.step_num = resumed_at + 1
        self.prof.current_action = self.prof.schedule(self.prof.step_num)  # as its constructor does for step 0
        self.prof.start()

    def _write(self, prof) -> None:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.out))
        except OSError as e:  # the volume full or gone meanwhile: a diagnostic lost, not the run
            log.warning("profile not written to %s: %s", self.out, e)
            return
        log.info("profile written: %s", self.out)

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
