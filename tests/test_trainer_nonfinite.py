"""Steps whose gradients are not finite (NaN or inf) update nothing: the weights, and so every
checkpoint after them, stay finite; more than training.maxSkippedSteps of them in a row stop the run
with exit 85 (permanent: a resume would replay them) on every rank at the same step, naming the
field. The NaNs are real: initial weights (model.initFrom, a Hugging Face folder) with one bad
embedding row, which poisons exactly the batches holding its token, or a bad final norm, which
poisons all.

    .venv/bin/python -m pytest tests/test_trainer_nonfinite.py -q
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest

from tests.trainer_util import cmd, env, losses, write_config

torch = pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")


def poisoned_base(d, row: int | None = None, norm: bool = False):
    """The tiny model's seed init as a Hugging Face folder, with embedding row `row` set to inf or
    the final norm's weight to NaN."""
    from pretrain_operator.api import ModelSpec
    from pretrain_trainer.hf import hf_config, to_hf, write_safetensors
    from pretrain_trainer.model import ModelArgs, Transformer, init_weights

    args = ModelArgs.from_spec(ModelSpec(preset="tiny"))
    model = Transformer(args)
    init_weights(model, 1234)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if row is not None:
        sd["tok_embeddings.weight"][row] = math.inf
    if norm:
        sd["norm.weight"][:] = math.nan
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(args)))
    write_safetensors(to_hf(sd, args), d, 1 << 40)
    return d


def test_a_step_with_non_finite_gradients_is_skipped_and_the_weights_stay_finite(tmp_path):
    from pretrain_trainer.data import TokenSource
    token = int(TokenSource("", 512, 1234).tokens[0])  # of the synthetic corpus' repeated pattern: in most batches, not all
    base = poisoned_base(tmp_path / "base", row=token)
    cfg = write_config(tmp_path, steps=12, interval=12, micro=1,
                       extra={"model": {"preset": "tiny", "initFrom": str(base)}, "training": {"steps": 12, "logEverySteps": 1, "maxSkippedSteps": 100}})
    r = subprocess.run(cmd(cfg, 1, tmp_path / "losses.txt"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = {int(s) for s in re.findall(r"step (\d+): the gradient norm is nan: optimizer step skipped", r.stderr)}
    got = losses(tmp_path / "losses.txt")
    assert skipped == {s for s, v in got.items() if not math.isfinite(v)}  # exactly the poisoned batches
    assert 0 < len(skipped) < 12
    # Without the skip, the first poisoned step's NaN reaches every weight through AdamW.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(tmp_path / "ckpt" / "step-00000012"), str(tmp_path / "final.pt"))
    weights = torch.load(tmp_path / "final.pt")["model"]
    emb = weights.pop("tok_embeddings.weight")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert torch.isfinite(torch.cat([emb[:token], emb[token + 1:]])).all() and torch.isinf(emb[token]).all()


def test_more_non_finite_steps_in_a_row_than_allowed_stop_every_rank_with_exit_85_naming_the_field(tmp_path):
    base = poisoned_base(tmp_path / "base", norm=True)  # every batch
    cfg = write_config(tmp_path, nproc=2, pipeline=2, steps=10, interval=100, micro=1,
                       extra={"model": {"preset": "tiny", "initFrom": str(base)}, "training": {"steps": 10, "logEverySteps": 1, "maxSkippedSteps": 2}})
    r = subprocess.run(cmd(cfg, 2, tmp_path / "losses.txt"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 85, r.stderr[-3000:]  # the permanent error's code, which the launcher passes on
    # Both ranks, at step 3.
    assert r.stderr.count("pretrain_trainer: step 3: the gradients were not finite (norm nan) for 3 steps in a row, "
                          "more than training.maxSkippedSteps (2)") == 2, r.stderr[-3000:]
    assert sorted(losses(tmp_path / "losses.txt")) == [1, 2]  # step 3 stopped before its loss was recorded


def test_non_finite_steps_in_a_row_count_across_a_resume(tmp_path):
    # Two skipped steps in the checkpoint, two more after its resume: four in a row, more than
    # maxSkippedSteps (3), as in one run. The count started again at each attempt: a run preempted
    # in the middle of a run of NaNs trained on past the limit, and its exit step differed.
    base = poisoned_base(tmp_path / "base", norm=True)  # every batch

    def train(steps: int) -> subprocess.CompletedProcess:
        cfg = write_config(tmp_path, steps=steps, interval=100, micro=1, extra={
            "model": {"preset": "tiny", "initFrom": str(base)}, "training": {"steps": steps, "logEverySteps": 1, "maxSkippedSteps": 3}})
        return subprocess.run(cmd(cfg, 1, tmp_path / f"losses-{steps}.txt"), env=env(), capture_output=True, text=True, timeout=300)
    r = train(2)
    assert r.returncode == 0 and r.stderr.count("the gradient norm is nan: optimizer step skipped") == 2, r.stderr[-3000:]
    r = train(10)
    assert "resumed from" in r.stderr and r.returncode == 85, r.stderr[-3000:]
    assert ("step 4: the gradients were not finite (norm nan) for 4 steps in a row, more than training.maxSkippedSteps (3)"
            in r.stderr), r.stderr[-3000:]
    assert sorted(losses(tmp_path / "losses-10.txt")) == [3]


def test_a_save_before_any_optimizer_step_changes_neither_the_run_nor_its_resume(tmp_path):
    # Every step so far skipped: the optimizer holds no state yet. torch's get_state_dict fills it by
    # stepping AdamW with lr 0, so a save there (a checkpoint request, a notice) made each step
    # count 1 in the run and the checkpoint: AdamW's bias correction one step off from then on.
    from pretrain_operator import contract as c
    from pretrain_trainer.data import Blend, Loader, TokenSource
    loader = Loader(Blend([TokenSource("", 512, 1234)], [1.0], 32), 32, 4, 1, 0, 1, 1234)  # write_config's data
    batches = [{int(t) for x, _ in loader.next_batch() for t in x.flatten()} for _ in range(8)]
    row = min(batches[0] - set().union(*batches[1:]))
    base = poisoned_base(tmp_path / "base", row=row)  # a token of step 1's batch alone: step 1 skipped, no other

    def train(d, podinfo=None):
        d.mkdir(exist_ok=True)
        cfg = write_config(d, steps=8, interval=100, micro=1, extra={
            "model": {"preset": "tiny", "initFrom": str(base)}, "training": {"steps": 8, "logEverySteps": 1, "maxSkippedSteps": 100}})
        r = subprocess.run(cmd(cfg, 1, d / "losses.txt"), env=env(podinfo), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return losses(d / "losses.txt"), r.stderr

    plain, log = train(tmp_path / "plain")
    assert "step 1: the gradient norm is nan: optimizer step skipped" in log and "step 2: the gradient norm" not in log, log[-3000:]
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "annotations").write_text(f'{c.ANN_CHECKPOINT_REQUEST}="notice-1"\n')
    requested, log = train(tmp_path / "requested", podinfo)  # saves step 1, then trains on
    assert "checkpoint requested by the operator" in log
    same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))  # noqa: E731
    assert all(same(plain[s], requested[s]) for s in plain), (plain, requested)
    # Its step-1 checkpoint resumed: the same losses after step 1, bit for bit.
    (tmp_path / "resumed" / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "requested" / "ckpt" / "step-00000001", tmp_path / "resumed" / "ckpt" / "step-00000001")
    resumed, log = train(tmp_path / "resumed")
    assert "resumed from" in log and sorted(resumed) == list(range(2, 9)), log[-3000:]
    assert all(resumed[s] == plain[s] for s in resumed), (plain, resumed)
