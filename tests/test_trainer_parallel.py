"""Parallel layouts train the same model: data parallel (FSDP2), tensor parallel (DTensor),
pipeline parallel (each schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, the zero-bubble
InterleavedZeroBubble, and the V-shaped ZBVZeroBubble and DualPipeV) and all three at once (2 x 2 x 2 on 8 processes) give the
per-step losses of a single process on the same data, with gradient accumulation, within 1e-5
(reduction order differs, nothing else); so do blocks compiled with torch.compile, whose
checkpoints resume in an eager run."""

from __future__ import annotations

import shutil

import pytest

from tests.trainer_util import losses, run, single_process_losses, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run(write_config(d, steps=5), 1, d / "losses.txt")
    return losses(d / "losses.txt")


LAYOUTS = [  # (processes, data, tensor, pipeline, schedule)
    (2, 2, 1, 1, "1F1B"), (2, 1, 2, 1, "1F1B"), (4, 2, 2, 1, "1F1B"),
    (2, 1, 1, 2, "GPipe"), (2, 1, 1, 2, "1F1B"), (2, 1, 1, 2, "Interleaved1F1B"),
    (2, 1, 1, 2, "LoopedBFS"), (2, 1, 1, 2, "InterleavedZeroBubble"), (2, 1, 1, 2, "ZBVZeroBubble"), (2, 1, 1, 2, "DualPipeV"),
]


@pytest.mark.parametrize("nproc,data,tensor,pipeline,schedule", LAYOUTS,
                         ids=["fsdp2", "tp2", "fsdp2xtp2", "pp2-gpipe", "pp2-1f1b", "pp2-interleaved1f1b", "pp2-loopedbfs",
                              "pp2-interleavedzerobubble", "pp2-zbvzerobubble", "pp2-dualpipev"])
def test_a_parallel_layout_matches_the_single_process_losses(tmp_path, reference, nproc, data, tensor, pipeline, schedule):
    micro = 1 if schedule == "DualPipeV" else 2  # DualPipeV: at least as many microbatches (4) as stages
    run(write_config(tmp_path, nproc=nproc, data=data, tensor=tensor, pipeline=pipeline, schedule=schedule, steps=5, micro=micro),
        nproc, tmp_path / "losses.txt")
    got = losses(tmp_path / "losses.txt")
    assert sorted(got) == sorted(reference) == [1, 2, 3, 4, 5]
    for step, want in reference.items():
        assert abs(got[step] - want) <= TOL, (step, got[step], want)
    assert reference[5] < reference[1]  # and it learns


def test_the_trainer_refuses_a_layout_that_does_not_fit_the_world(tmp_path):
    import subprocess
    import sys
    cfg = write_config(tmp_path, nproc=2, data=2)  # a valid spec (nprocPerNode 2), run without torchrun
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 85
    assert "parallelism.data x tensor x pipeline = 2 but the world has 1 ranks" in r.stderr


def test_a_schedule_that_refuses_the_layout_is_a_permanent_error_naming_the_fields(tmp_path):
    import subprocess
    from tests.trainer_util import cmd, env
    cfg = write_config(tmp_path, nproc=2, pipeline=2, schedule="DualPipeV")  # 2 microbatches for 4 stages
    r = subprocess.run(cmd(cfg, 2, tmp_path / "losses.txt"), env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 85, r.stderr[-3000:]  # the permanent error's code, not a crash to retry
    # The CRD's rule, checked by the trainer's load_spec as the API server would (pretrain_operator.cel).
    assert "DualPipeV needs at least 2 x parallelism.pipeline microbatches (parallelism.microbatches" in r.stderr


def test_pipeline_x_data_x_tensor_2x2x2_on_8_processes_matches_a_single_process(tmp_path):
    want = single_process_losses(tmp_path / "ref", steps=3, global_batch=8)
    d = tmp_path / "3d"
    d.mkdir()
    run(write_config(d, nproc=8, data=2, tensor=2, pipeline=2, steps=3, global_batch=8), 8, d / "losses.txt", timeout=600)
    got = losses(d / "losses.txt")
    assert sorted(got) == [1, 2, 3]
    for s in want:
        assert abs(got[s] - want[s]) <= TOL, (s, got[s], want[s])


@pytest.mark.parametrize("mode,nproc,tensor", [("full", 2, 1), ("selective", 4, 2)], ids=["full-fsdp2", "selective-fsdp2xtp2"])
def test_activation_checkpointing_and_keeping_gathered_parameters_keep_the_losses(tmp_path, reference, mode, nproc, tensor):
    # selective keeps the matrix products', attention's and tensor parallel's collectives' outputs.
    cfg = write_config(tmp_path, nproc=nproc, data=2, tensor=tensor, steps=5,
                       extra={"training": {"steps": 5, "logEverySteps": 1, "activationCheckpointing": mode},
                              "parallelism": {"data": 2, "tensor": tensor, "pipeline": 1, "reshardAfterForward": False}})
    r = run(cfg, nproc, tmp_path / "losses.txt")
    assert f"activation checkpointing ({mode}): 4 decoder block(s) here" in r.stderr
    assert "FSDP2 over 2 data-parallel rank(s): 4 decoder block(s) here, parameters kept gathered" in r.stderr
    got = losses(tmp_path / "losses.txt")
    for step, want in reference.items():
        assert abs(got[step] - want) <= TOL, (step, got[step], want)


def test_compiled_blocks_keep_the_losses_and_their_checkpoints_resume_without_compiling(tmp_path, reference):
    # torch.compile on every block, with FSDP2, tensor parallel and activation checkpointing on 4 processes.
    cfg = write_config(tmp_path, nproc=4, data=2, tensor=2, steps=5,
                       extra={"training": {"steps": 5, "logEverySteps": 1, "compile": True, "activationCheckpointing": "full"}})
    r = run(cfg, 4, tmp_path / "compiled.txt")
    assert "torch.compile: 4 decoder block(s) here" in r.stderr
    got = losses(tmp_path / "compiled.txt")
    for step, want in reference.items():
        assert abs(got[step] - want) <= TOL, (step, got[step], want)
    # The weights keep their names when compiled (no `_orig_mod`): one eager process resumes the
    # compiled run's step-3 checkpoint and continues on the reference's losses.
    shutil.rmtree(tmp_path / "ckpt" / "step-00000005")
    (tmp_path / "ckpt" / "latest").write_text("step-00000003")
    r = run(write_config(tmp_path, steps=5), 1, tmp_path / "eager.txt")
    assert "resumed from" in r.stderr and "step-00000003" in r.stderr
    after = losses(tmp_path / "eager.txt")
    assert sorted(after) == [4, 5]
    for step in after:
        assert abs(after[step] - reference[step]) <= TOL, (step, after[step], reference[step])


SEQUENCE_PROBE = '''
import os
import sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pretrain_trainer import train
from pretrain_trainer.model import RMSNorm, Transformer, init_weights

spec = train.load_spec(sys.argv[1])
rank, world, _, device = train.setup_distributed()
args, model, optim, mesh, schedule = train.build(spec, device, world)
seen = []
for name, mod in model.named_modules():
    if isinstance(mod, RMSNorm):
        mod.register_forward_pre_hook(lambda m, inp: seen.append(tuple(getattr(inp[0], "_local_tensor", inp[0]).shape)))
g = torch.Generator().manual_seed(1)
x, y = (torch.randint(0, args.vocabSize, (2, spec.data.seqLen), generator=g) for _ in range(2))
logits = model(x)
F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
ref = Transformer(args)
init_weights(ref, spec.training.seed)
want = ref(x)
F.cross_entropy(want.flatten(0, 1), y.flatten()).backward()
grad_err = max(float(((p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) - q.grad).abs().max())
               for p, q in zip(model.parameters(), ref.parameters()))
line = (f"rank {rank}: norm inputs {sorted(set(seen))} x {len(seen)}; logits {tuple(logits.shape)} "
        f"error {float((logits - want).abs().max()):.1e}; gradient error {grad_err:.1e}\\n")
os.write(1, line.encode())  # one write: the ranks share the pipe (print's two writes interleaved once)
dist.destroy_process_group()
'''


def test_sequence_parallel_norms_see_sequence_slices_and_keep_the_losses(tmp_path, reference):
    # Under tensor parallel the RMSNorms (and the residual stream) hold each tensor rank's half of
    # the sequence: hooks on the trainer's own build see local inputs of seqLen / 2 tokens, while
    # the logits (whole sequence, as the loss needs) and every gradient match the single model.
    import re
    import subprocess
    from tests.trainer_util import TORCHRUN, env, free_port
    cfg = write_config(tmp_path, nproc=2, tensor=2)
    probe = tmp_path / "probe.py"
    probe.write_text(SEQUENCE_PROBE)
    r = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), str(probe), str(cfg)],
                       env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = re.findall(r"rank \d: norm inputs (.*)", r.stdout)
    assert len(lines) == 2, r.stdout
    for line in lines:  # tiny: dim 64, 4 layers (2 norms each and the final one); seqLen 32 over 2 ranks
        m = re.fullmatch(r"\[\(2, 16, 64\)\] x 9; logits \(2, 32, \d+\) error (\S+); gradient error (\S+)", line)
        assert m, line
        assert float(m[1]) <= TOL and float(m[2]) <= TOL, line
    # And training over the sequence slices, also across pipeline stages (tensor 2 x pipeline 2:
    # each stage boundary carries a rank's slice), gives the single process's losses.
    d = tmp_path / "tp2xpp2"
    d.mkdir()
    r = run(write_config(d, nproc=4, tensor=2, pipeline=2, steps=5), 4, d / "losses.txt")
    assert "tensor parallel 2 with sequence parallel" in r.stderr
    got = losses(d / "losses.txt")
    assert sorted(got) == sorted(reference)
    for step, want in reference.items():
        assert abs(got[step] - want) <= TOL, (step, got[step], want)


def test_adamw_on_a_gpu_fuses_only_parameters_all_dtensors_of_one_mesh_or_all_plain():
    # Tensor parallel at data 1 leaves the embedding and output plain: one fused AdamW call over
    # the mix failed a GPU run's first step. The choice is by the parameters' kinds (checked here
    # with the CPU's fused kernel, which refuses the mix as the GPU's does).
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from pretrain_trainer.train import adamw_impl
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = torch.nn.Parameter(torch.ones(4))
        sharded = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Replicate()]))
        mixed = [plain, sharded]
        for q in mixed:
            q.grad = torch.full_like(q, 0.5)
        with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
            torch.optim.AdamW([{"params": mixed}], lr=0.1, fused=True).step()
        assert adamw_impl(mixed, "cuda") == {"foreach": False}
        torch.optim.AdamW([{"params": mixed}], lr=0.1, **adamw_impl(mixed, "cuda")).step()
        assert plain.detach().lt(1).all() and sharded.full_tensor().lt(1).all()
        assert adamw_impl([plain], "cuda") == adamw_impl([sharded], "cuda") == {"fused": True}
        assert adamw_impl([sharded], "cpu") == {"foreach": False}  # the tests' bit-for-bit references
    finally:
        dist.destroy_process_group()
