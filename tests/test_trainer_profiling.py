"""training.profile: every rank writes a Chrome trace (torch.profiler) of exactly the profiled steps,
labelled with their training step numbers, also in a run resumed from a checkpoint; a run resumed
past the start step profiles nothing and says so.

    .venv/bin/python -m pytest tests/test_trainer_profiling.py -q
"""

from __future__ import annotations

import json

import pytest

from tests.trainer_util import losses, run, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")


def profiled_steps(trace) -> list[int]:
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)  # the operators are in it
    return sorted({int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#")})


def _training(steps: int, profile: dict) -> dict:
    return {"training": {"steps": steps, "logEverySteps": 1, "profile": profile}}


def test_each_rank_writes_a_trace_of_exactly_the_profiled_steps(tmp_path):
    cfg = write_config(tmp_path, nproc=2, data=2, steps=5, interval=100,
                       extra=_training(5, {"startStep": 2, "steps": 2, "folder": str(tmp_path / "traces")}))
    r = run(cfg, 2, tmp_path / "losses.txt")
    for rank in (0, 1):
        assert profiled_steps(tmp_path / "traces" / "steps-2-3" / f"rank-{rank}.json") == [2, 3]
    assert "profile written" in r.stderr


def test_a_resumed_run_profiles_by_training_step_and_not_before_its_start(tmp_path):
    run(write_config(tmp_path, steps=4, interval=4), 1, tmp_path / "losses.txt")
    # Resumed at step 4: steps 5 and 6 profiled, under the checkpoint folder by default.
    run(write_config(tmp_path, steps=6, interval=100, extra=_training(6, {"startStep": 5, "steps": 2})), 1, tmp_path / "losses.txt")
    assert profiled_steps(tmp_path / "ckpt" / "profiles" / "steps-5-6" / "rank-0.json") == [5, 6]
    # Resumed at step 6 (the last run's final checkpoint): step 3 is behind it.
    r = run(write_config(tmp_path, steps=8, interval=100, extra=_training(8, {"startStep": 3, "steps": 2})), 1,
            tmp_path / "losses.txt")
    assert "training.profile: step 3 is behind this run's start (step 7): not profiled" in r.stderr
    assert not (tmp_path / "ckpt" / "profiles" / "steps-3-4").exists()


def test_a_profile_folder_that_cannot_be_written_is_said_at_the_start_and_the_run_trains_on(tmp_path):
    # Found only at the trace's write, it crashed the run after startStep (and every restart
    # before a checkpoint past it crashed there again).
    (tmp_path / "a-file").write_text("")
    cfg = write_config(tmp_path, steps=4, interval=100, extra=_training(4, {"startStep": 2, "steps": 1, "folder": str(tmp_path / "a-file" / "traces")}))
    r = run(cfg, 1, tmp_path / "losses.txt")
    assert f"training.profile.folder {tmp_path / 'a-file' / 'traces'} cannot be written" in r.stderr
    assert "this run is not profiled" in r.stderr and "profile written" not in r.stderr
    assert sorted(losses(tmp_path / "losses.txt")) == [1, 2, 3, 4]
