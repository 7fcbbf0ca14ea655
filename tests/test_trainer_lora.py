"""LoRA trains only the adapters: examples/lora.yaml (on a base checkpoint made here) gives the
same per-step losses under FSDP2 (data parallel 2), tensor parallel 2 and pipeline parallel 2 as
in one process, the
frozen base is bit-identical after training on every rank, the checkpoints hold the adapters and
their optimizer state only, and a resumed run continues bit for bit.

    .venv/bin/python -m pytest tests/test_trainer_lora.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.trainer_util import env, losses, run, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

REPO = Path(__file__).resolve().parent.parent
BITS = "LoRA: frozen base weights bit-identical after training"


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A dense checkpoint of the tiny model: the LoRA base."""
    d = tmp_path_factory.mktemp("base")
    run(write_config(d, steps=2, interval=100), 1, d / "losses.txt")
    return d / "ckpt"


def _example(d: Path, base: Path, nproc: int, parallelism: dict, steps: int = 4, interval: int = 2) -> Path:
    """examples/lora.yaml, shortened for CPU, on `base`, saving under `d`."""
    doc = next(d for d in yaml.safe_load_all((REPO / "examples" / "lora.yaml").read_text()) if d["kind"] == "PretrainJob")
    doc["spec"]["lora"]["baseCheckpoint"] = str(base)
    doc["spec"].update(nodes=1, nprocPerNode=nproc, parallelism=parallelism,
                       data={"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 2},
                       training={"steps": steps, "logEverySteps": 1}, optimizer={**doc["spec"]["optimizer"], "warmupSteps": 1},
                       checkpoint={"path": str(d / "ckpt"), "intervalSteps": interval})
    d.mkdir(exist_ok=True)
    (d / "job.yaml").write_text(yaml.safe_dump(doc))
    return d / "job.yaml"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base):
    d = tmp_path_factory.mktemp("one")
    r = run(_example(d, base, 1, {}), 1, d / "losses.txt")
    assert BITS in r.stderr
    return d, losses(d / "losses.txt")


@pytest.mark.parametrize("parallelism", [{"data": 2}, {"tensor": 2}, {"pipeline": 2}], ids=["fsdp2", "tp2", "pp2"])
def test_lora_trains_only_the_adapters_and_matches_one_process(tmp_path, base, reference, parallelism):
    ref_dir, want = reference
    r = run(_example(tmp_path, base, 2, parallelism), 2, tmp_path / "losses.txt")
    got = losses(tmp_path / "losses.txt")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])
    assert BITS in r.stderr
    assert got[4] != got[1]  # and the adapters did train
    # The adapter checkpoint is small: adapters and their AdamW moments, nothing of the base.
    step = tmp_path / "ckpt" / "step-00000004"
    meta = (step / ".metadata").read_bytes()
    assert b"lora_A" in meta and b"lora_B" in meta and b"tok_embeddings" not in meta and b"wq.base" not in meta
    assert _size(step) < _size(next(base.glob("step-*"))) / 2  # rank 8 on a 64-wide model: adapters are large here


def test_a_resumed_lora_run_continues_bit_for_bit(tmp_path, base, reference):
    ref_dir, want = reference
    shutil.copytree(ref_dir / "ckpt", tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "step-00000004")  # as if stopped after step 2
    (tmp_path / "ckpt" / "latest").write_text("step-00000002")
    r = run(_example(tmp_path, base, 1, {}), 1, tmp_path / "losses.txt")
    assert "resumed from" in r.stderr and "step-00000002" in r.stderr
    assert losses(tmp_path / "losses.txt") == {3: want[3], 4: want[4]}


def test_a_resumed_lora_run_and_its_eval_keep_the_base_it_was_trained_on(tmp_path, reference):
    # lora.baseCheckpoint is a run's checkpoint folder (examples/lora.yaml): its newest step that
    # verifies, which moves while that run commits more. A preempted LoRA run resumed its adapters
    # (and their AdamW moments) on the newer base, and eval and export of its checkpoints took
    # whatever was newest then: a base and adapters that never trained together, without a word.
    _, want = reference
    b = tmp_path / "b"
    b.mkdir()
    run(write_config(b, steps=2, interval=100), 1, b / "losses.txt")  # the base fixture's, bit for bit, in a folder of its own
    cfg = _example(tmp_path / "l", b / "ckpt", 1, {})
    run(cfg, 1, tmp_path / "l" / "losses.txt")
    shutil.rmtree(tmp_path / "l" / "ckpt" / "step-00000004")  # as if stopped after step 2
    (tmp_path / "l" / "ckpt" / "latest").write_text("step-00000002")

    def evaluate() -> str:
        r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(cfg)],
                           capture_output=True, text=True, env=env(), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout
    before = evaluate()
    run(write_config(b, steps=4, interval=100), 1, b / "more.txt")  # the base run goes on: step 4 is its newest now
    assert evaluate() == before
    r = run(cfg, 1, tmp_path / "l" / "again.txt")
    assert f"LoRA base {b / 'ckpt' / 'step-00000002'}: the one the checkpoints' adapters were trained on" in r.stderr
    assert losses(tmp_path / "l" / "again.txt") == {3: want[3], 4: want[4]}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_lora_dropout_under_activation_checkpointing_gives_the_gradients_of_its_forward_pass(mode):
    # The blocks' recomputation during the backward pass drew new dropout masks (the RNG state was
    # not kept): the same loss, other gradients (up to 33 apart in a probe).
    import torch

    from pretrain_operator import api
    from pretrain_trainer import parallel
    from pretrain_trainer.lora import apply_lora
    from pretrain_trainer.model import ModelArgs, Transformer, init_weights
    spec = api.PretrainJobSpec.model_validate({"model": {"preset": "tiny"}, "lora": {"rank": 4, "dropout": 0.3}})

    def grads(checkpointing: str):
        model = Transformer(ModelArgs.from_spec(spec.model))
        init_weights(model, 0)
        apply_lora(model, spec.lora, 0)
        parallel.apply_activation_checkpointing(model, checkpointing)
        x = torch.randint(0, model.args.vocabSize, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the dropout masks
        model(x).float().pow(2).mean().backward()
        return {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}

    want, got = grads("none"), grads(mode)
    assert want.keys() == got.keys() and want
    for n in want:
        assert torch.allclose(want[n], got[n], rtol=1e-5, atol=1e-7), n


def test_the_pin_is_read_from_the_newest_checkpoint_that_has_one_and_follows_the_specs_base(tmp_path):
    # The newest step's extra.json unreadable (its verification will skip it): an older step pins
    # alike (it re-resolved the base, and pinned the wrong one from then on). A base given by
    # model.initFrom is a LoRA run's base too.
    import json

    from pretrain_operator import api
    from pretrain_trainer.checkpoint import MARKER, pinned_base, step_dir
    from pretrain_trainer.train import lora_base_spec
    for s in (2, 4):
        step_dir(tmp_path, s).mkdir()
        (step_dir(tmp_path, s) / MARKER).write_text("{}")
    (step_dir(tmp_path, 2) / "extra.json").write_text(json.dumps({"base": {"spec": "/b", "source": "/b/step-00000002"}}))
    (step_dir(tmp_path, 4) / "extra.json").write_text('{"step": 4, "ba')  # half-written
    assert pinned_base(tmp_path, "/b") == pinned_base(step_dir(tmp_path, 2), "/b") == "/b/step-00000002"
    assert pinned_base(tmp_path, "/elsewhere") is None  # the spec's base changed: the user's choice
    assert pinned_base(step_dir(tmp_path, 4), "/b") is None
    lora = {"rank": 4, "targetModules": ["wq"]}
    base = {"model": {"preset": "tiny"}, "lora": lora}
    assert lora_base_spec(api.PretrainJobSpec.model_validate({**base, "model": {"preset": "tiny", "initFrom": "/hf"}})) == "/hf"
    assert lora_base_spec(api.PretrainJobSpec.model_validate({**base, "lora": {**lora, "baseCheckpoint": "/b"}})) == "/b"
    assert lora_base_spec(api.PretrainJobSpec.model_validate(base)) is None
    assert lora_base_spec(api.PretrainJobSpec.model_validate({"model": {"preset": "tiny", "initFrom": "/hf"}})) is None


def test_a_pipeline_stage_lora_leaves_frozen_trains_and_resumes_and_patterns_matching_nothing_exit_85(tmp_path):
    # A path pattern of stage 0's layer leaves stage 1 with nothing to train: its optimizer got
    # an empty parameter list and the run crashed (exit 1, retried as a failure); a pattern of
    # another model's names (Hugging Face's q_proj) froze every weight, with the same crash.
    import subprocess

    from tests.trainer_util import cmd
    lora = {"rank": 4, "alpha": 8, "targetModules": ["layers.0.attention.wq"]}
    cfg = write_config(tmp_path, nproc=2, pipeline=2, schedule="GPipe", steps=4, interval=2, extra={"lora": lora})
    r = run(cfg, 2, tmp_path / "l.txt")
    assert "(1 adapted layers here)" in r.stderr and sorted(losses(tmp_path / "l.txt")) == [1, 2, 3, 4]
    r = run(write_config(tmp_path, nproc=2, pipeline=2, schedule="GPipe", steps=6, interval=2, extra={"lora": lora}), 2, tmp_path / "l.txt")
    assert "resumed from" in r.stderr and "step-00000004" in r.stderr and sorted(losses(tmp_path / "l.txt")) == [1, 2, 3, 4, 5, 6]
    (tmp_path / "bad").mkdir()
    bad = write_config(tmp_path / "bad", extra={"lora": {**lora, "targetModules": ["q_proj", "v_proj"]}})
    r = subprocess.run(cmd(bad, 1, tmp_path / "bad.txt"), env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 85, r.stderr[-3000:]
    assert "lora.targetModules ['q_proj', 'v_proj'] match no linear layer of the model: its names are wq wk wv wo" in r.stderr


def test_a_lora_runs_mfu_counts_the_frozen_base_at_4n_and_the_adapters_at_6n():
    # 6N over the whole model overstated a LoRA run's MFU by half: the frozen base computes no
    # gradient of its weights. The adapters' count is that of a real model's trainable parameters.
    import torch
    from pretrain_operator import api
    from pretrain_trainer import lora
    from pretrain_trainer.model import ModelArgs, Transformer, flops_per_token, num_params
    for model_spec in ({}, {"moe": {"experts": 8, "topK": 2, "sharedExpert": True}}):
        spec = api.PretrainJobSpec.model_validate({"model": model_spec, "lora": {"rank": 4}})
        args = ModelArgs.from_spec(spec.model)
        model = Transformer(args)
        lora.apply_lora(model, spec.lora, 0)
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora.adapter_params(args, spec.lora) == adapters > 0
        base = num_params(args, active=True) - args.vocabSize * args.dim
        attention = 12 * args.layers * args.dim * 64
        assert flops_per_token(args, 64) == 6 * base + attention
        assert flops_per_token(args, 64, adapters) == 4 * base + 6 * adapters + attention
    assert torch.get_default_device().type == "cpu"  # the meta count left the default device alone
