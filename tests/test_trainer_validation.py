"""Validation during training (spec.validation): the held-out loss at every `everySteps` steps and at
the last step, which is the `eval` of that step's checkpoint, the same under every layout (within
1e-5), and which changes nothing in training: the losses stay bit for bit those of a run without it,
MoE bias balancing and LoRA's adapter dropout included (and `eval` of a LoRA checkpoint on the
seed's base works). Too little held-out data is a permanent error naming the field. A SIGTERM
during a validation ends it, and that step is saved; the next attempt validates that step before
training (a SIGTERM then stops it before its first step), the last step's included.

    .venv/bin/python -m pytest tests/test_trainer_validation.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pretrain_operator import contract as c
from tests.trainer_util import cmd, env, free_port, losses, run, single_process_losses, wait_for_step, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

TOL = 1e-5
STEPS = 5
VALIDATION = {"validation": {"everySteps": 2, "batches": 2}}  # 2 x globalBatchSize 4 = 8 held-out windows
SIGMOID_BIAS = {"model": {"preset": "tiny", "moe": {"experts": 4, "topK": 2, "routerScore": "sigmoid", "loadBalancing": "bias",
                                                    "biasUpdateRate": 0.05}}}


def validation_losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+) validation loss ([0-9.]+) over 8 held-out windows", log)}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same run without validation: the training losses to match."""
    return single_process_losses(tmp_path_factory.mktemp("plain") / "run", steps=STEPS, micro=1)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """One process with validation every 2 steps and a checkpoint at each: (folder, its losses, its
    validation losses, its final report)."""
    d = tmp_path_factory.mktemp("validated")
    cfg = write_config(d, steps=STEPS, interval=2, keep=5, micro=1, extra=VALIDATION)
    report = d / "termination-log"
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg), "--losses-out", str(d / "losses.txt")],
                       env={**env(), "PRETRAIN_TERMINATION_MESSAGE_PATH": str(report)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, losses(d / "losses.txt"), validation_losses(r.stderr), json.loads(report.read_text())


def test_validation_runs_at_every_interval_and_the_last_step_and_changes_no_training_loss(plain, validated):
    _, got, val, report = validated
    assert sorted(val) == [2, 4, 5]
    assert got == plain  # bit for bit: validation draws no random number and changes no weight
    assert val[5] < val[2]  # the held-out loss falls as it trains
    assert report["validationStep"] == 5 and abs(report["validationLoss"] - val[5]) < 1e-6


def test_the_validation_loss_of_a_step_is_the_eval_of_that_steps_checkpoint(validated):
    d, _, val, _ = validated
    for step in (2, 4):
        r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(d / "job.yaml"),
                            "--checkpoint", str(d / "ckpt" / f"step-{step:08d}")], env=env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        loss = float(re.search(r"held-out loss ([0-9.]+) over 8 windows", r.stdout).group(1))
        assert abs(loss - val[step]) <= TOL, (step, loss, val[step])


@pytest.mark.parametrize("nproc,parallelism,training", [
    (4, {"data": 2, "pipeline": 2, "pipelineSchedule": "1F1B"}, {}),
    (4, {"data": 2, "tensor": 2, "reshardAfterForward": False}, {"activationCheckpointing": "full"}),
], ids=["pp2xdp2-1f1b", "dp2xtp2-keep-gathered-ac"])
def test_a_parallel_layout_validates_to_the_single_process_loss(tmp_path, plain, validated, nproc, parallelism, training):
    cfg = write_config(tmp_path, nproc=nproc, steps=STEPS, interval=100, micro=1,
                       extra={**VALIDATION, "parallelism": parallelism, "training": {"steps": STEPS, "logEverySteps": 1, **training}})
    r = run(cfg, nproc, tmp_path / "losses.txt")
    val, want = validation_losses(r.stderr), validated[2]
    assert sorted(val) == sorted(want)
    for step in want:
        assert abs(val[step] - want[step]) <= TOL, (step, val[step], want[step])
    got = losses(tmp_path / "losses.txt")
    for step in plain:  # and the validations did not disturb training (the next training forward above all)
        assert abs(got[step] - plain[step]) <= TOL, (step, got[step], plain[step])


def test_validation_leaves_the_moe_bias_balancing_as_it_was(tmp_path):
    # The aux-loss-free bias moves with the load the router saw: a validation's tokens must not count.
    without = single_process_losses(tmp_path / "without", steps=STEPS, micro=1, extra=SIGMOID_BIAS)
    with_ = single_process_losses(tmp_path / "with", steps=STEPS, micro=1,
                                  extra={**SIGMOID_BIAS, "validation": {"everySteps": 1, "batches": 2}})
    assert with_ == without


def test_too_little_held_out_data_for_validation_batches_is_a_permanent_error_naming_the_field(tmp_path):
    # A prepared corpus (the synthetic one grows to hold any validation): the json package's sources.
    src, data = tmp_path / "text", tmp_path / "data"
    src.mkdir()
    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        (src / f.name).write_text(f.read_text())
    subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(data),
                    "--vocab-size", "300"], env=env(), check=True, capture_output=True, timeout=120)
    cfg = write_config(tmp_path, steps=2, extra={"data": {"path": str(data)}, "validation": {"everySteps": 1, "batches": 1000}})
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 85
    assert "validation.batches (1000) x data.globalBatchSize (4): 4000 held-out windows" in r.stderr
    assert "lower validation.batches" in r.stderr


def test_a_lora_run_on_the_seeds_base_validates_to_the_eval_of_its_checkpoint(tmp_path):
    # No lora.baseCheckpoint: the base is the seed's random init, in training and in eval alike.
    # Adapter dropout draws random numbers in training only: the losses stay those without validation.
    lora = {"lora": {"rank": 4, "dropout": 0.1}}
    without = single_process_losses(tmp_path / "without", steps=4, micro=1, extra=lora)
    d = tmp_path / "with"
    d.mkdir()
    r = run(write_config(d, steps=4, micro=1, extra={**lora, **VALIDATION}), 1, d / "losses.txt")
    assert losses(d / "losses.txt") == without
    val = validation_losses(r.stderr)
    e = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(d / "job.yaml")], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert e.returncode == 0, e.stderr[-2000:]
    assert abs(float(re.search(r"held-out loss ([0-9.]+) over 8 windows", e.stdout).group(1)) - val[4]) <= TOL


def test_an_moe_that_drops_tokens_validates_to_the_eval_of_its_checkpoint(tmp_path):
    # Capacity is counted over one forward's tokens: eval ran one row per forward, validation a
    # microbatch (2 rows), so they dropped other tokens and differed (5.775671 against 5.775619).
    moe = {"model": {"preset": "tiny", "moe": {"experts": 4, "topK": 2, "capacityFactor": 1.0}}}
    r = run(write_config(tmp_path, steps=4, micro=2, extra={**moe, **VALIDATION}), 1, tmp_path / "losses.txt")
    val = validation_losses(r.stderr)
    e = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(tmp_path / "job.yaml")], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert e.returncode == 0, e.stderr[-2000:]
    assert abs(float(re.search(r"held-out loss ([0-9.]+) over 8 windows", e.stdout).group(1)) - val[4]) <= TOL


def test_validation_under_a_v_shaped_pipeline_schedule_is_refused_naming_the_fields(tmp_path):
    # torch's forward-only eval of ZBVZeroBubble and DualPipeV fails ("can't steal_bwd_input if this
    # stage doesn't have backward"): refused at the start (the CRD refuses it too), not at step N.
    cfg = write_config(tmp_path, nproc=2, pipeline=2, schedule="ZBVZeroBubble", extra=VALIDATION)
    r = subprocess.run(cmd(cfg, 2, tmp_path / "losses.txt"), env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == c.EXIT_PERMANENT, r.stderr[-3000:]
    assert "validation does not run under parallelism.pipelineSchedule ZBVZeroBubble" in r.stderr


def test_a_sigterm_during_a_validation_ends_it_saves_that_step_and_the_next_attempts_validate_it_first(tmp_path):
    # A long validation (96 forward passes of a 16-layer model) at step 5 of a data-parallel 2 run;
    # one rank is signalled as soon as step 5 is logged, which is before its validation starts. Both
    # ranks drop the validation at their next batch and save step 5 (before: the whole validation
    # and step 6 first, time a termination notice's grace period may not have).
    cfg = write_config(tmp_path, nproc=2, data=2, steps=200, interval=1000,
                       extra={"model": {"layers": 16}, "data": {"seqLen": 16}, "validation": {"everySteps": 5, "batches": 48}})
    launch_env = {**env(), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port(),
                  "PRETRAIN_TERMINATION_MESSAGE_PATH": str(tmp_path / "termination-log")}
    p = subprocess.Popen(cmd(cfg, 2, tmp_path / "losses.txt", launch=True), stderr=subprocess.PIPE, text=True, env=launch_env)
    wait_for_step(tmp_path / "losses.txt", 1, p)
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    wait_for_step(tmp_path / "losses.txt", 5, p)
    os.kill(max(int(w) for w in workers), signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == c.EXIT_PREEMPTED, err[-3000:]
    assert "stop requested (SIGTERM) during the validation of step 5: validation dropped" in err
    assert "step 5 validation loss" not in err
    from pretrain_trainer.checkpoint import committed_steps  # after the torch check above
    assert committed_steps(tmp_path / "ckpt") == [5]
    trained = losses(tmp_path / "losses.txt")
    assert max(trained) == 5  # nobody trained on

    # The next attempt validates step 5 before training; a SIGTERM then (the rank signalled as
    # soon as rank 0 says it is about to start) ends that validation too, and every rank stops
    # before step 6: exit 83, nothing saved, the checkpoint of step 5 still the one to resume.
    p = subprocess.Popen(cmd(cfg, 2, tmp_path / "losses.txt", launch=True), stderr=subprocess.PIPE, text=True, env=launch_env)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "training tiny on 2 rank(s)" in line:
            break
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    os.kill(max(int(w) for w in workers), signal.SIGTERM)
    err = "".join(seen) + p.communicate(timeout=120)[1]
    assert p.returncode == c.EXIT_PREEMPTED, err[-3000:]
    assert "stop requested (SIGTERM) during the validation of step 5: validation dropped" in err
    assert f"stop requested (SIGTERM) before step 6: no step trained, checkpoint of step 5 kept; exiting {c.EXIT_PREEMPTED}" in err
    assert committed_steps(tmp_path / "ckpt") == [5] and max(losses(tmp_path / "losses.txt")) == 5
    assert json.loads((tmp_path / "termination-log").read_text())["step"] == 5

    # The same job cut to 5 steps: step 5 is now the last, its checkpoint already there. The attempt
    # trains nothing, validates step 5 (before: exit 0 with no held-out loss and no loss in the
    # final report), and its report has step 5's training loss from the checkpoint.
    short = write_config(tmp_path, nproc=2, data=2, steps=5, interval=1000,
                         extra={"model": {"layers": 16}, "data": {"seqLen": 16}, "validation": {"everySteps": 5, "batches": 48}})
    r = subprocess.run(cmd(short, 2, tmp_path / "losses.txt", launch=True), capture_output=True, text=True, env=launch_env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    val = re.findall(r"step 5 validation loss ([0-9.]+) over 192 held-out windows", r.stderr)
    assert len(val) == 1, r.stderr[-3000:]
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["step"] == 5 and report["validationStep"] == 5 and abs(report["validationLoss"] - float(val[0])) < 1e-6
    assert abs(report["loss"] - trained[5]) < 1e-9
    # ... and it is the held-out loss of step 5's weights: `eval` of that checkpoint, in one process.
    e = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(short)], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-2000:]
    assert abs(float(re.search(r"held-out loss ([0-9.]+) over 192 windows", e.stdout).group(1)) - float(val[0])) <= TOL
