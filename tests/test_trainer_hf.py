"""Hugging Face interop: `export` of a dense checkpoint loads in transformers as LlamaForCausalLM
(with the data's tokenizer), of a top-2 MoE checkpoint as MixtralForCausalLM, and a LoRA
checkpoint as a PEFT adapter on the exported base (or merged), each giving the trainer's logits
within 1e-5; importing an export gives every weight back bit for bit; `eval` and a run started
from a Hugging Face folder (`model.initFrom`) read the same weights; what no Hugging Face
architecture expresses is refused with a message naming the fields. Offline: configs are built
here, nothing comes from the Hub.

    .venv/bin/python -m pytest tests/test_trainer_hf.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.trainer_util import env, losses, run, write_config

torch = pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")
transformers = pytest.importorskip("transformers", reason="the hf extra is installed by `make venv`")
peft = pytest.importorskip("peft", reason="the hf extra is installed by `make venv`")

TOL = 1e-5
TOKENS = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
LORA = {"rank": 4, "alpha": 8, "targetModules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}


def _export_cli(cfg: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain_trainer", "export", "--config", str(cfg), "--out", str(out),
                           *flags], capture_output=True, text=True, env=env())


def _export(cfg: Path, out: Path, merge_lora: bool = False, max_shard_gb: float = 5.0) -> Path:
    """The same export in this process (the command line is run once, in the dense test)."""
    from pretrain_trainer.hf import export
    return export(str(cfg), None, str(out), merge_lora, max_shard_gb)


def _ours(cfg: Path, checkpoint: str | None = None):
    from pretrain_trainer.evaluate import model_from_checkpoint
    from pretrain_trainer.train import load_spec
    return model_from_checkpoint(load_spec(str(cfg)), checkpoint)[0]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A dense run on real text (a few standard-library modules) with its own BPE tokenizer."""
    d = tmp_path_factory.mktemp("dense")
    src = d / "text"
    src.mkdir()
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, src / name.replace("/", "_"))
    subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(d / "data"),
                    "--vocab-size", "512"], check=True, capture_output=True)
    cfg = write_config(d, steps=2, interval=100, extra={"data": {"path": str(d / "data")}})
    run(cfg, 1, d / "losses.txt")
    return cfg


@pytest.fixture(scope="module")
def dense_hf(tmp_path_factory, dense) -> Path:
    """The dense checkpoint exported with the command line."""
    out = tmp_path_factory.mktemp("dense_hf") / "hf"
    r = _export_cli(dense, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LlamaForCausalLM" in r.stdout
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moe")
    cfg = write_config(d, steps=2, interval=100, extra={"model": {"preset": "tiny", "moe": {"experts": 4, "topK": 2}}})
    run(cfg, 1, d / "losses.txt")
    return cfg


def test_an_exported_dense_model_loads_in_transformers_as_llama_with_the_trainers_logits(dense, dense_hf):
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense_hf, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (_logits(hf) - _logits(_ours(dense))).abs().max() <= TOL
    # The data's tokenizer comes along and encodes like the one `prepare` trained.
    from tokenizers import Tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(dense_hf)
    text = "def decode(self, s):\n    return json.loads(s)\n"
    assert tok(text)["input_ids"] == Tokenizer.from_file(str(dense.parent / "data" / "tokenizer.json")).encode(text).ids
    assert tok.eos_token == "<|endoftext|>"


def test_an_exported_top2_moe_model_loads_in_transformers_as_mixtral_with_the_trainers_logits(tmp_path, moe):
    _export(moe, tmp_path / "hf", max_shard_gb=0.001)  # ~1 MB shards: the sharded layout too
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert (_logits(hf) - _logits(_ours(moe))).abs().max() <= TOL


def test_an_exported_lora_adapter_loads_with_peft_on_the_exported_base_with_the_trainers_logits(tmp_path, dense):
    cfg = write_config(tmp_path, steps=2, interval=100,
                       extra={"lora": {**LORA, "baseCheckpoint": str(dense.parent / "ckpt")},
                              "data": {"path": str(dense.parent / "data")}, "optimizer": {"lr": 0.01, "warmupSteps": 1}})
    run(cfg, 1, tmp_path / "losses.txt")
    ours = _logits(_ours(cfg))
    _export(cfg, tmp_path / "hf")
    assert (tmp_path / "hf" / "adapter" / "adapter_config.json").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert (_logits(base.eval()) - ours).abs().max() > 1e-3  # the adapters matter ...
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    assert (_logits(tuned) - ours).abs().max() <= TOL  # ... and peft applies them as the trainer does
    _export(cfg, tmp_path / "merged", merge_lora=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not (tmp_path / "merged" / "adapter").exists()
    assert (_logits(merged) - ours).abs().max() <= TOL


def test_an_import_of_an_export_gives_every_weight_back_bit_for_bit(tmp_path, dense, moe):
    from pretrain_trainer.hf import load_hf
    from pretrain_trainer.model import ModelArgs, Transformer, init_weights
    from pretrain_trainer.train import load_spec
    for name, cfg in (("dense", dense), ("moe", moe)):
        _export(cfg, tmp_path / name)
        want = _ours(cfg).state_dict()
        fresh = Transformer(ModelArgs.from_spec(load_spec(str(cfg)).model))
        init_weights(fresh, 12345)
        load_hf(fresh, tmp_path / name)
        got = fresh.state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_eval_and_a_run_started_from_a_hugging_face_folder_read_the_same_weights(tmp_path, dense, dense_hf):
    # `eval --checkpoint HF_DIR` builds its model this way.
    assert torch.equal(_logits(_ours(dense, str(dense_hf))), _logits(_ours(dense)))
    # Continual pretraining: a fresh run initialised from the folder; its first loss is the
    # exported model's loss on the first batch.
    cfg = write_config(tmp_path, steps=1, interval=100, extra={"model": {"preset": "tiny", "initFrom": str(dense_hf)},
                                                               "data": {"path": str(dense.parent / "data")}})
    r = run(cfg, 1, tmp_path / "losses.txt")
    assert f"initial weights from {dense_hf}" in r.stderr
    from pretrain_trainer.data import Loader
    from pretrain_trainer.train import load_spec, open_data
    spec = load_spec(str(cfg))
    loader = Loader(open_data(spec, 512), spec.data.seqLen, spec.data.globalBatchSize,
                    spec.data.microBatchSize, 0, 1, spec.training.seed)
    model = _ours(dense)
    micro = loader.next_batch()
    with torch.no_grad():
        want = sum(float(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())) for x, y in micro) / len(micro)
    assert abs(losses(tmp_path / "losses.txt")[1] - want) <= TOL


def test_what_no_hugging_face_architecture_expresses_is_refused_naming_the_fields(tmp_path, capsys):
    cfg = write_config(tmp_path, extra={"model": {"preset": "tiny", "moe": {"experts": 4, "topK": 1, "routerScore": "sigmoid"}}})
    with pytest.raises(SystemExit) as e:
        _export(cfg, tmp_path / "hf")
    assert e.value.code == 85
    err = capsys.readouterr().err
    assert "model.moe.routerScore must be softmax" in err and "model.moe.topK 1" in err
    assert not (tmp_path / "hf").exists()


def test_a_hugging_face_folder_of_another_shape_is_refused_naming_the_fields(dense, dense_hf):
    from pretrain_trainer.hf import load_hf
    from pretrain_trainer.model import ModelArgs, Transformer
    from pretrain_trainer.train import load_spec
    spec = load_spec(str(dense))
    spec.model.ffnDim = 128
    with pytest.raises(ValueError, match=r"model.ffnDim: 128 vs 192"):
        load_hf(Transformer(ModelArgs.from_spec(spec.model)), dense_hf)


def test_a_hugging_face_folder_of_the_same_shapes_but_another_model_is_refused_naming_what_differs(tmp_path, dense, dense_hf):
    # Llama 3's rotary base is 500000: a Meta-Llama-3-8B folder loaded into a 10000-base model
    # without a word, and a bias tensor was dropped without one. Each made another model.
    from safetensors.torch import load_file, save_file

    from pretrain_trainer.hf import load_hf
    from pretrain_trainer.model import ModelArgs, Transformer
    from pretrain_trainer.train import load_spec
    spec = load_spec(str(dense))

    def variant(name: str, config: dict, extra_tensor: str | None = None) -> Path:
        d = tmp_path / name
        shutil.copytree(dense_hf, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
        if extra_tensor:
            sd = load_file(str(d / "model.safetensors"))
            sd[extra_tensor] = torch.zeros(spec.model.resolved()["dim"])
            save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    def refused(folder: Path, match: str):
        with pytest.raises(ValueError, match=match):
            load_hf(Transformer(ModelArgs.from_spec(spec.model)), folder)

    rope = variant("rope", {"rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    refused(rope, r"model.ropeTheta: 10000 vs 500000")
    spec.model.ropeTheta = 500000.0  # the job says so: the folder loads
    load_hf(Transformer(ModelArgs.from_spec(spec.model)), rope)
    spec.model.ropeTheta = None
    refused(variant("scaled", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), r"rope scaling 'llama3': this trainer has none")
    refused(variant("eps", {"rms_norm_eps": 1e-6}), r"rms_norm_eps: 1e-05 \(this trainer's\) vs 1e-06")
    refused(variant("bias", {}, "model.layers.0.self_attn.o_proj.bias"), r"tensor model.layers.0.self_attn.o_proj.bias has no place")
    # A tensor of another shape under a config that matches (an edited or another model's file):
    # a RuntimeError from deep in the copy, a traceback and exit 1 from `eval`, naming no tensor.
    cut = variant("cut", {})
    sd = load_file(str(cut / "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"][:, :-2].contiguous()
    sd["model.layers.1.self_attn.q_proj.weight"] = sd["model.layers.1.self_attn.q_proj.weight"][:-3].contiguous()
    save_file(sd, str(cut / "model.safetensors"), metadata={"format": "pt"})
    refused(cut, r"tensor model.layers.1.self_attn.q_proj.weight has shape \(\d+, \d+\), which this model's attention heads do not fit")
    del sd["model.layers.1.self_attn.q_proj.weight"]
    sd["model.layers.1.self_attn.q_proj.weight"] = load_file(str(dense_hf / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    save_file(sd, str(cut / "model.safetensors"), metadata={"format": "pt"})
    refused(cut, r"holds weights of other shapes than the job's model: model.layers.0.mlp.down_proj.weight is \(\d+, \d+\), "
                 r"the model's layers.0.feed_forward.w2.weight \(\d+, \d+\)")


def test_an_export_over_an_earlier_one_leaves_only_its_own_files_and_a_cut_file_is_exit_85_naming_it(tmp_path, dense):
    # The earlier export's shards and index stayed beside the new model.safetensors: the trainer
    # read the index (the old weights), transformers the single file. A file cut short (a copy
    # interrupted) was safetensors' traceback, exit 1, retried until the failure budget ran out.
    out = tmp_path / "hf"
    _export(dense, out, max_shard_gb=0.0005)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    _export(dense, out)
    assert sorted(f.name for f in out.glob("model*")) == ["model.safetensors"]
    assert torch.equal(_logits(_ours(dense, str(out))), _logits(_ours(dense)))
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(dense), "--checkpoint", str(out)],
                       capture_output=True, text=True, env=env())
    assert r.returncode == 85 and f"{out / 'model.safetensors'} cannot be read as safetensors" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_mixtral_folder_seeds_a_bias_balanced_model_with_its_selection_bias_at_zero(tmp_path, moe):
    # Aux-loss-free balancing's selection bias is a buffer (zero at the start) that no Mixtral
    # folder holds: the import refused the folder as lacking it.
    from pretrain_trainer.hf import load_hf
    from pretrain_trainer.model import ModelArgs, Transformer, init_weights
    from pretrain_trainer.train import load_spec
    hf = _export(moe, tmp_path / "hf")
    (tmp_path / "run").mkdir()
    cfg = write_config(tmp_path / "run", steps=1, interval=100, extra={"model": {
        "preset": "tiny", "initFrom": str(hf), "moe": {"experts": 4, "topK": 2, "loadBalancing": "bias"}}})
    model = Transformer(ModelArgs.from_spec(load_spec(str(cfg)).model))
    init_weights(model, 12345)
    load_hf(model, hf)
    want, got = _ours(moe).state_dict(), model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    biases = [t for k, t in got.items() if k.endswith(".expert_bias")]
    assert biases and all(not b.any() for b in biases)
    r = run(cfg, 1, tmp_path / "run" / "losses.txt")
    assert f"initial weights from {hf}" in r.stderr
