"""training.activationCheckpointing none, full and selective: the memory a step's forward and backward
take, and the step time, each mode in a fresh process, against `none` measured in the same run.

    .venv/bin/python bench/activation_checkpointing.py [--batch 8] [--seq 512]      # CPU, model 'small'
    python bench/activation_checkpointing.py --preset llama3-1b --model '{"layers": 4}' --bf16 --batch 4 --seq 2048

Model --preset (`small`) with --model's sizes over it, its rotary table (maxSeqLen) raised to --seq
when that is above the model's. --bf16: under bf16 autocast, as training.precision bf16 on a GPU.
A model as small as `small` on a GPU is bound by kernel launches, where selective's per-operation
policy costs more than it saves (an H200: selective 1.45x none's step, full 1.26x).

Memory: on a GPU the peak allocated during the steps; on the CPU the growth of the process's peak
resident size over the steps (parameters, gradients and logits included in both, so the ratios
understate the saving on activations alone). Time: the fastest of 3 steps. Limits: one process, no
optimizer step; on the CPU the recomputed elementwise operations cost relatively more than on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_MODE = r'''
import json, resource, sys, time
sys.path[:0] = ["{root}/trainer", "{root}/operator"]
import torch, torch.nn.functional as F
from pretrain_operator.api import ModelSpec
from pretrain_trainer import parallel
from pretrain_trainer.model import ModelArgs, Transformer, init_weights
mode, batch, seq, preset, sizes, bf16 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]), sys.argv[6] == "1"
cuda = torch.cuda.is_available()
table = ModelArgs.from_spec(ModelSpec(preset=preset, **sizes)).maxSeqLen
args = ModelArgs.from_spec(ModelSpec(preset=preset, **{{**sizes, "maxSeqLen": max(table, seq)}}))  # the rotary table
model = Transformer(args).to("cuda" if cuda else "cpu")
init_weights(model, 0)
parallel.apply_activation_checkpointing(model, mode)
x = torch.randint(0, args.vocabSize, (batch, seq + 1), device="cuda" if cuda else "cpu")
base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
times = []
for _ in range(3):
    t0 = time.monotonic()
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    times.append(time.monotonic() - t0)
    model.zero_grad(set_to_none=True)
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"mib": (peak - base) / 2**20, "step_s": min(times)}}))
'''


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", default="{}", help='sizes over the preset, as JSON: {"layers": 4}')
    ap.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    ap.add_argument("--logs", help="write each mode's stdout and stderr into this folder")
    a = ap.parse_args(argv or [])
    out = {}
    for mode in ("none", "full", "selective"):
        r = subprocess.run([sys.executable, "-c", ONE_MODE.format(root=ROOT), mode, str(a.batch), str(a.seq), a.preset, a.model,
                            "1" if a.bf16 else "0"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if a.logs:
            Path(a.logs).mkdir(parents=True, exist_ok=True)
            (Path(a.logs) / f"{mode}.stdout.txt").write_text(r.stdout)
            (Path(a.logs) / f"{mode}.stderr.txt").write_text(r.stderr)
        if r.returncode != 0:  # the child's own error, not only "non-zero exit status"
            raise RuntimeError(f"activation checkpointing {mode}: exit {r.returncode}: {r.stderr[-2000:]}")
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    base = out["none"]
    print(f"activation checkpointing, model {a.preset} {a.model if a.model != '{}' else ''}{' bf16' if a.bf16 else ''}, "
          f"batch {a.batch} x seq {a.seq}, one step's forward and backward:")
    for mode, v in out.items():
        print(f"  {mode:9s}  memory {v['mib']:7.0f} MiB ({v['mib'] / base['mib']:4.2f}x none)   "
              f"step {v['step_s']:.3f} s ({v['step_s'] / base['step_s']:4.2f}x none)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
