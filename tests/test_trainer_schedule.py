"""The learning-rate schedule: linear warm-up, then a cosine, linear or square-root decay to minLr at
the last step, over every step after the warm-up or (decayFraction, warmup-stable-decay) only over
the last fraction, lr held before it. The defaults keep the cosine the trainer always had; a run
uses the schedule its spec names, step by step.

    .venv/bin/python -m pytest tests/test_trainer_schedule.py -q
"""

from __future__ import annotations

import math
import re

import pytest

from pretrain_operator import api
from tests.trainer_util import run, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")


def _lr(step: int, total: int = 100, **o) -> float:
    from pretrain_trainer.train import lr_at
    return lr_at(step, api.Optimizer(**{"lr": 1e-3, "minLr": 1e-4, "warmupSteps": 10, **o}), total)


def test_the_default_is_the_cosine_over_every_step_after_the_warm_up():
    for step in range(1, 101):
        frac = (step - 10) / 90
        want = 1e-3 * step / 10 if step <= 10 else 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * frac))
        assert _lr(step) == want, step


@pytest.mark.parametrize("decay", ["cosine", "linear", "sqrt"])
def test_warmup_stable_decay_holds_lr_then_decays_to_min_lr_at_the_last_step(decay):
    lrs = [_lr(s, decayType=decay, decayFraction=0.2) for s in range(1, 101)]
    assert lrs[9] == 1e-3 and all(lr == 1e-3 for lr in lrs[10:80])  # stable from the warm-up's end to step 80
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:]))  # then strictly down
    assert math.isclose(lrs[-1], 1e-4)


def test_linear_and_square_root_decays_have_their_shapes():
    mid = {d: _lr(55, decayType=d) for d in ("linear", "sqrt", "cosine")}  # half-way through the decay
    assert math.isclose(mid["linear"], 1e-3 - 0.5 * 9e-4)
    assert math.isclose(mid["sqrt"], 1e-3 - math.sqrt(0.5) * 9e-4)
    assert math.isclose(mid["cosine"], 1e-4 + 0.5 * 9e-4)


def test_a_run_follows_the_schedule_its_spec_names(tmp_path):
    opt = {"lr": 0.002, "minLr": 0.0002, "warmupSteps": 2, "decayType": "linear", "decayFraction": 0.5}
    r = run(write_config(tmp_path, steps=8, extra={"optimizer": opt}), 1, tmp_path / "losses.txt")
    logged = {int(s): float(v) for s, v in re.findall(r"step (\d+)/8 loss \S+ grad norm \S+ lr (\S+)", r.stderr)}
    assert logged == {s: float(f"{_lr(s, 8, **opt):.2e}") for s in range(1, 9)}
    assert logged[3] == logged[4] == 0.002 and logged[8] == 0.0002  # stable to step 4, then down to minLr
