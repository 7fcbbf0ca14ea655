"""The trainer: step overhead against a plain PyTorch loop, checkpoint save throughput against
the disk's sequential write speed, and training time blocked by async against sync saves.

    .venv/bin/python bench/trainer.py [--steps 30]

Per-step times come from two runs of different lengths (their difference cancels start-up).
Baselines, measured in the same run: a minimal loop (same model, batch, AdamW; no loader state,
no metrics, no collectives) and `dd` writing the same number of bytes with fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PLAIN = r'''
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, "{root}/trainer")
from pretrain_operator.api import ModelSpec
from pretrain_trainer.model import ModelArgs, Transformer, init_weights
steps = int(sys.argv[1])
args = ModelArgs.from_spec(ModelSpec(preset="small"))
torch.manual_seed(0)
m = Transformer(args); init_weights(m, 0)
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, foreach=False)
x = torch.randint(0, args.vocabSize, (8, 129))
for _ in range(steps):
    for i in range(0, 8, 4):
        loss = F.cross_entropy(m(x[i:i+4, :-1]).flatten(0, 1), x[i:i+4, 1:].flatten()) / 2
        loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
'''


def config(d: Path, steps: int, interval: int = 100000, async_save: bool = False) -> Path:
    spec = {"model": {"preset": "small"}, "data": {"seqLen": 128, "globalBatchSize": 8, "microBatchSize": 4},
            "training": {"steps": steps, "logEverySteps": 1000}, "optimizer": {"warmupSteps": 0},
            "checkpoint": {"path": str(d / "ckpt"), "intervalSteps": interval, "keep": 2, "async": async_save}}
    p = d / f"job-{steps}-{interval}-{async_save}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def timed(argv: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return time.monotonic() - t0, r.stderr


def trainer_run(d: Path, steps: int, **kw) -> tuple[float, str]:
    import shutil
    shutil.rmtree(d / "ckpt", ignore_errors=True)
    env = dict(os.environ, PRETRAIN_METRICS_PORT="0")
    return timed([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(config(d, steps, **kw))], env)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args(argv or [])
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-trainer-", dir=str(root / ".local-cluster") if (root / ".local-cluster").exists() else None) as tmp:
        d = Path(tmp)
        s1, s2 = 5, 5 + a.steps
        plain = d / "plain.py"
        plain.write_text(PLAIN.replace("{root}", str(root)))
        p1, _ = timed([sys.executable, str(plain), str(s1)])
        p2, _ = timed([sys.executable, str(plain), str(s2)])
        t1, _ = trainer_run(d, s1)
        t2, _ = trainer_run(d, s2)
        plain_step, trainer_step = (p2 - p1) / a.steps, (t2 - t1) / a.steps
        print(f"step time, model 'small' (seq 128, batch 8, 2 microbatches), 1 process on CPU:")
        print(f"  plain PyTorch loop   {plain_step * 1000:8.1f} ms")
        print(f"  pretrain_trainer     {trainer_step * 1000:8.1f} ms   ratio {trainer_step / plain_step:5.2f}x (goal <= 1.05)")

        # Checkpoint throughput: one save of model + AdamW state.
        _, err = trainer_run(d, 2, interval=1)
        save_s = float(re.findall(r"checkpoint step 2 committed in ([0-9.]+) s", err)[-1])
        size = sum(f.stat().st_size for f in (d / "ckpt" / "step-00000002").rglob("*") if f.is_file())
        t0 = time.monotonic()
        subprocess.run(["dd", "if=/dev/zero", f"of={d / 'dd.bin'}", "bs=1M", f"count={max(size >> 20, 1)}", "conv=fsync"],
                       check=True, capture_output=True)
        dd_s = time.monotonic() - t0
        print(f"checkpoint save of {size / 2**20:.0f} MiB (model + optimizer):")
        print(f"  dd (sequential, fsync)  {size / 2**20 / dd_s:8.0f} MiB/s")
        print(f"  DCP save + commit       {size / 2**20 / save_s:8.0f} MiB/s   {100 * dd_s / save_s:5.0f} % of dd (goal >= 80 %)")

        # Blocked time: a save every 5 steps, sync against async, against no saves.
        n = a.steps
        none, _ = trainer_run(d, n)
        sync, _ = trainer_run(d, n, interval=5)
        asy, _ = trainer_run(d, n, interval=5, async_save=True)
        print(f"{n} steps with a save every 5 (wall time over a run without saves):")
        print(f"  sync saves    +{sync - none:6.2f} s  ({100 * (sync - none) / none:5.1f} %)")
        print(f"  async saves   +{asy - none:6.2f} s  ({100 * (asy - none) / none:5.1f} %)   (goal <= 5 %)")


if __name__ == "__main__":
    main(sys.argv[1:])
