"""`train.build` makes the model on the meta device, shards it, and only then gives each rank its
pieces (`to_empty`, then `init_sharded`): the parameters gathered back (`full_tensor()`) are bit
for bit today's init of the whole unsharded model (the formulas below are copied from before the
change) under FSDP2, tensor parallel, expert parallel, pipeline stages, LoRA, activation
checkpointing and compile; and a rank's host memory grows by about its shard, not the whole model.

    .venv/bin/python -m pytest tests/test_trainer_build.py -q
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.trainer_util import TORCHRUN, env, free_port

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

EQUAL_PROBE = '''
import math, sys, zlib
import torch
import torch.distributed as dist
from pretrain_trainer import train
from pretrain_trainer.lora import LoRALinear, _targets
from pretrain_trainer.model import Transformer, init_weights, rope_cache
from pretrain_trainer.moe import MoE


def todays_init(model, seed):  # model.init_weights before the meta-device build, verbatim
    std_base = 0.02
    with torch.no_grad():
        for fqn, p in model.named_parameters():
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))
            if fqn.endswith("norm.weight") or fqn == "norm.weight":
                p.fill_(1.0)
            elif fqn.endswith(("wo.weight", "w2.weight")):
                layers = getattr(model, "args").layers
                p.copy_(torch.randn(p.shape, generator=g) * (std_base / math.sqrt(2 * layers)))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std_base)


def todays_lora(model, spec, seed):  # lora.apply_lora's adapters before the change, verbatim
    for name in _targets(model, spec.targetModules):
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        wrapped = LoRALinear(getattr(parent, leaf), spec.rank, spec.alpha, spec.dropout)
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}.lora_A.weight".encode())) % (2**63))
        with torch.no_grad():
            bound = 1 / math.sqrt(wrapped.lora_A.in_features)
            wrapped.lora_A.weight.copy_(torch.rand(wrapped.lora_A.weight.shape, generator=g) * 2 * bound - bound)
            wrapped.lora_B.weight.zero_()
        setattr(parent, leaf, wrapped)


rank, world, _, device = train.setup_distributed()
for cfg in sys.argv[1:]:
    spec = train.load_spec(cfg)
    args, model, optim, mesh, schedule = train.build(spec, device, world)
    ref = Transformer(args)
    todays_init(ref, spec.training.seed)
    again = Transformer(args)
    init_weights(again, spec.training.seed)  # the refactored init_weights: the same values
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), again.parameters()))
    if spec.lora:
        todays_lora(ref, spec.lora, spec.training.seed)
    want = dict(ref.named_parameters())
    n = dtensors = 0
    bad = []
    for name, p in model.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        dtensors += hasattr(p, "full_tensor")
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        n += 1
        if clean not in want or full.device.type == "meta" or not torch.equal(full.detach().cpu(), want[clean].detach()):
            bad.append(clean)
    parts = [model] if schedule is None else [st.submod for st in getattr(schedule, "_stages", None) or [schedule._stage]]
    rope = [m.rope for part in parts for m in part.modules() if hasattr(m, "rope")]
    assert rope and all(torch.equal(r.cpu(), rope_cache(args)) for r in rope), "rope"
    for m in model.modules():
        if isinstance(m, MoE):
            assert all(not b.is_meta and not b.any() for b in m.buffers(recurse=False)), "MoE buffers"
    print(f"rank {rank} {cfg.rsplit('/', 1)[-1]}: {n} tensors ({dtensors} DTensors) equal to the whole model's init, "
          f"{len(bad)} differ {bad[:3]}", flush=True)
    del model, optim
dist.destroy_process_group()
'''

MEMORY_PROBE = '''
import resource, sys
import torch.distributed as dist
from pretrain_trainer import train
from pretrain_trainer.model import num_params

rank, world, _, device = train.setup_distributed()
spec = train.load_spec(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
args, model, optim, mesh, schedule = train.build(spec, device, world)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
print(f"rank {rank}: model {num_params(args) * 4} bytes, this rank's shard {local} bytes, peak RSS growth "
      f"{after - before} bytes", flush=True)
dist.destroy_process_group()
'''


def _spec(d, name: str, nproc: int, parallelism: dict, model: dict | None = None, **extra) -> str:
    spec = {"nodes": 1, "nprocPerNode": nproc, "parallelism": parallelism, "model": model or {"preset": "tiny"},
            "data": {"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 1},
            "training": {"steps": 4, "seed": 4321, **extra.pop("training", {})},
            "optimizer": {"warmupSteps": 1}, "checkpoint": {"path": str(d / "ckpt")}, **extra}
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def _torchrun(d, nproc: int, script: str, *argv: str, timeout: float = 120) -> str:
    probe = d / "probe.py"
    probe.write_text(script)
    r = subprocess.run([TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", free_port(),
                        str(probe), *argv], env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


MOE = {"preset": "tiny", "moe": {"experts": 4, "topK": 2, "sharedExpert": True, "loadBalancing": "bias"}}
LORA = {"rank": 4, "targetModules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}


def test_two_ranks_build_exactly_the_whole_models_init_in_every_layout(tmp_path):
    cfgs = [_spec(tmp_path, "dense-fsdp2-ac-compile", 2, {"data": 2},
                  training={"activationCheckpointing": "full", "compile": True}),
            _spec(tmp_path, "dense-tp2-selective", 2, {"tensor": 2}, training={"activationCheckpointing": "selective"}),
            _spec(tmp_path, "dense-pp2-interleaved", 2, {"pipeline": 2, "pipelineSchedule": "Interleaved1F1B"}),
            _spec(tmp_path, "moe-dp2-ep2", 2, {"data": 2, "expert": 2}, model=MOE),
            _spec(tmp_path, "moe-tp2", 2, {"tensor": 2}, model=MOE),
            _spec(tmp_path, "lora-dp2", 2, {"data": 2}, lora=LORA),
            _spec(tmp_path, "lora-tp2", 2, {"tensor": 2}, lora=LORA)]
    out = _torchrun(tmp_path, 2, EQUAL_PROBE, *cfgs)
    lines = re.findall(r"rank \d (\S+): (\d+) tensors \((\d+) DTensors\) equal to the whole model's init, (\d+) differ", out)
    assert len(lines) == 2 * len(cfgs), out
    for name, n, dtensors, differ in lines:
        assert int(n) > 0 and differ == "0", (name, out)
        if "pp2" not in name:  # every parameter sharded (or, MoE under ep with edp 1, its experts whole)
            assert int(dtensors) > 0, (name, out)


def test_four_ranks_fsdp2_over_tensor_parallel_and_over_expert_pairs_build_exactly_the_whole_models_init(tmp_path):
    # FSDP2 over tensor-parallel weights shards dim 0 twice (a _StridedShard placement); with data 4
    # and expert 2 each expert pair is sharded by FSDP2 over its own 2-rank mesh (edp).
    cfgs = [_spec(tmp_path, "dense-dp2-tp2", 4, {"data": 2, "tensor": 2}),
            _spec(tmp_path, "lora-dp2-tp2", 4, {"data": 2, "tensor": 2}, lora=LORA),
            _spec(tmp_path, "moe-dp4-ep2", 4, {"data": 4, "expert": 2}, model=MOE)]
    out = _torchrun(tmp_path, 4, EQUAL_PROBE, *cfgs)
    lines = re.findall(r"rank \d (\S+): (\d+) tensors \((\d+) DTensors\) equal to the whole model's init, (\d+) differ", out)
    assert len(lines) == 4 * len(cfgs), out
    assert all(int(n) > 0 and differ == "0" for _, n, _, differ in lines), out


def test_a_rank_under_data_parallel_2_never_holds_the_whole_model(tmp_path):
    # 404M parameters (1.6 GB in fp32) in 24 layers, none larger than 16 MiB: before, each rank
    # made and initialised the whole model, then sharded it (peak RSS growth above 1.6 GB); now
    # about its half and one tensor at a time.
    model = {"preset": "custom", "dim": 1024, "layers": 24, "heads": 16, "kvHeads": 16, "vocabSize": 512,
             "ffnDim": 4096, "maxSeqLen": 64}
    cfg = _spec(tmp_path, "big", 2, {"data": 2}, model=model)
    out = _torchrun(tmp_path, 2, MEMORY_PROBE, cfg, timeout=180)
    rows = re.findall(r"rank \d: model (\d+) bytes, this rank's shard (\d+) bytes, peak RSS growth (-?\d+) bytes", out)
    assert len(rows) == 2, out
    for whole, shard, growth in map(lambda r: tuple(map(int, r)), rows):
        assert whole > 1.5e9 and shard <= whole // 2 + 2**20, out
        assert growth < 0.7 * whole, out
