"""A blend of prepared folders (data.sources): each source gives exactly its weight's share of every
global batch's samples (to within one sample), the same global batches for any data-parallel
degree; a blended run resumed from its checkpoint continues bit for bit and runs within 1e-5 on two
ranks; validation and `eval` read the same blended held-out windows; a source prepared with another
tokenizer is a permanent error naming it.

    .venv/bin/python -m pytest tests/test_trainer_blend.py -q
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.trainer_util import env, losses, run, write_config

pytest.importorskip("tokenizers", reason="the trainer extra is installed by `make test`")
torch = pytest.importorskip("torch", reason="the trainer extra is installed by `make test`")

TOL = 1e-5


def _prepare(stdlib_pkg: str, out: Path, tokenizer: Path | None = None) -> Path:
    src = out.parent / f"{out.name}-text"
    src.mkdir()
    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / stdlib_pkg).glob("*.py")):
        (src / f.name).write_text(f.read_text())
    args = ["--tokenizer", str(tokenizer)] if tokenizer else ["--vocab-size", "300"]
    subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(out), *args],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    a = _prepare("json", d / "a")
    b = _prepare("email", d / "b", tokenizer=a / "tokenizer.json")  # the same tokenizer: blendable
    return a, b


def _blend(folders, weights=(3.0, 1.0), seq=16):
    from pretrain_trainer.data import Blend, TokenSource
    return Blend([TokenSource(str(f), 512, 1234) for f in folders], list(weights), seq)


def test_each_source_gives_its_share_of_every_batch_and_the_batches_do_not_depend_on_the_layout(folders):
    from pretrain_trainer.data import Loader
    blend = _blend(folders)
    one = Loader(blend, 16, 8, 2, 0, 1, seed=5)
    two = [Loader(blend, 16, 8, 2, r, 2, seed=5) for r in range(2)]
    for n in range(1, 41):
        rows = torch.cat([x for x, _ in one.next_batch()])
        assert one.taken == [6 * n, 2 * n]  # 3:1 of 8 samples, exactly, at every step
        halves = [torch.cat([x for x, _ in loader.next_batch()]) for loader in two]
        assert torch.equal(rows, torch.cat(halves))
    # The state is the position and each source's count: a loader restored from it continues alike.
    again = Loader(blend, 16, 8, 2, 0, 1, seed=5)
    again.load_state_dict(one.state_dict())
    assert torch.equal(torch.cat([x for x, _ in again.next_batch()]), torch.cat([x for x, _ in one.next_batch()]))


def test_a_blended_run_resumes_bit_for_bit_runs_alike_on_two_ranks_and_validates_as_eval_does(tmp_path, folders):
    data = {"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 1,
            "sources": [{"path": str(folders[0]), "weight": 3}, {"path": str(folders[1]), "weight": 1}]}
    extra = {"data": data, "validation": {"everySteps": 4, "batches": 2}}

    def config(d: Path, steps: int, nproc: int = 1) -> Path:
        d.mkdir(exist_ok=True)
        return write_config(d, nproc=nproc, data=nproc, steps=steps, interval=4, keep=5,
                            extra={**extra, "training": {"steps": steps, "logEverySteps": 1}})

    ref = run(config(tmp_path / "ref", 8), 1, tmp_path / "ref" / "losses.txt")
    want = losses(tmp_path / "ref" / "losses.txt")
    # The same run resumed from its step-4 checkpoint (the data position: 12 samples of a, 4 of b).
    cfg = config(tmp_path / "resumed", 8)
    shutil.copytree(tmp_path / "ref" / "ckpt" / "step-00000004", tmp_path / "resumed" / "ckpt" / "step-00000004")
    r = run(cfg, 1, tmp_path / "resumed" / "losses.txt")
    assert "resumed from" in r.stderr
    assert losses(tmp_path / "resumed" / "losses.txt") == {s: v for s, v in want.items() if s > 4}
    run(config(tmp_path / "dp2", 8, nproc=2), 2, tmp_path / "dp2" / "losses.txt")
    got = losses(tmp_path / "dp2" / "losses.txt")
    assert sorted(got) == sorted(want) and all(abs(got[s] - want[s]) <= TOL for s in want), (got, want)
    # The held-out windows of the blend: validation at step 8 and eval of step 8's checkpoint.
    val = float(re.search(r"step 8 validation loss ([0-9.]+) over 8 held-out windows", ref.stderr).group(1))
    e = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(tmp_path / "ref" / "job.yaml")],
                       env=env(), capture_output=True, text=True, timeout=120)
    assert e.returncode == 0, e.stderr[-2000:]
    assert abs(float(re.search(r"held-out loss ([0-9.]+) over 8 windows", e.stdout).group(1)) - val) <= TOL


def test_a_source_prepared_with_another_tokenizer_is_a_permanent_error_naming_it(tmp_path, folders):
    other = _prepare("email", tmp_path / "other")  # its own tokenizer, trained on other text
    data = {"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 2,
            "sources": [{"path": str(folders[0])}, {"path": str(other)}]}
    cfg = write_config(tmp_path, extra={"data": data})
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 85
    assert "data.sources[1] was tokenized with another tokenizer than data.sources[0]" in r.stderr
