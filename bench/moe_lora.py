"""MoE and LoRA in the trainer: MoE step time with the grouped matmul against the loop over
experts; LoRA step time and checkpoint size against full training of the same model.

    .venv/bin/python bench/moe_lora.py [--steps 10]

Model `small` (seq 128), one CPU process. MoE: forward and backward of the whole model, the two
expert implementations interleaved in one process, median of `--steps` rounds (robust to a busy
machine). LoRA: one trainer run each (batch 8, 2 microbatches, 5 + 5 x (--steps // 5) steps),
timed inside the process as bench/trainer.py does: the mean seconds per step of the trainer's log
windows (a line every 5 steps), the first window (warm-up) left out, so start-up, the base
checkpoint's load and the final save stay out of the figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer import step_seconds, timed  # noqa: E402  (bench/trainer.py)

SEQ, BATCH = 128, 8


def run(d: Path, name: str, steps: int, extra: dict, env: dict | None = None) -> str:
    """One trainer run of `steps` steps, logging every 5: its output."""
    spec = {"model": {"preset": "small"}, "data": {"seqLen": SEQ, "globalBatchSize": BATCH, "microBatchSize": 4},
            "training": {"steps": steps, "logEverySteps": 5}, "optimizer": {"warmupSteps": 0},
            "checkpoint": {"path": str(d / name / "ckpt"), "intervalSteps": 100000, "keep": 1}}
    for k, v in extra.items():
        spec[k] = {**spec.get(k, {}), **v}
    shutil.rmtree(d / name, ignore_errors=True)
    (d / name).mkdir(parents=True)
    cfg = d / name / "job.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    _, text = timed([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)],
                    dict(os.environ, PRETRAIN_METRICS_PORT="0", **(env or {})))
    return text


def step_time(d: Path, name: str, steps: int, extra: dict, env: dict | None = None) -> float:
    """Mean step time after five warm-up steps, from the trainer's own log (bench/trainer.py's
    step_seconds). The run ends with its final checkpoint: LoRA's base and the size figures use it."""
    n = 5 + 5 * max(steps // 5, 1)
    return step_seconds(run(d, name, n, extra, env), BATCH * SEQ)


def moe_step_times(rounds: int) -> dict[str, float]:
    """Median forward + backward time of the `small` model with 8 experts, top-2, per implementation."""
    import statistics
    import time

    import torch
    from pretrain_operator import api
    from pretrain_trainer.model import ModelArgs, Transformer, init_weights
    args = ModelArgs.from_spec(api.ModelSpec(preset="small", moe=api.MoE(experts=8, topK=2)))
    model = Transformer(args)
    init_weights(model, 0)
    x = torch.randint(0, args.vocabSize, (4, 128), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"grouped": [], "loop": []}
    for r in range(rounds + 1):
        for impl in times:
            os.environ["PRETRAIN_MOE_IMPL"] = impl
            t0 = time.perf_counter()
            model(x).sum().backward()
            if r:  # the first round warms up
                times[impl].append(time.perf_counter() - t0)
    os.environ.pop("PRETRAIN_MOE_IMPL")
    return {k: statistics.median(v) for k, v in times.items()}


def size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="bench-moe-lora-") as tmp:
        d = Path(tmp)
        t = moe_step_times(a.steps)
        grouped, loop = t["grouped"], t["loop"]
        print("MoE forward + backward, model 'small' with 8 experts, top-2, batch 4 x 128, 1 process on CPU:")
        print(f"  loop over experts  {loop * 1000:8.1f} ms")
        print(f"  grouped matmul     {grouped * 1000:8.1f} ms   ratio {grouped / loop:5.2f}x")
        full = step_time(d, "full", a.steps, {})
        base = d / "full" / "ckpt"
        lora = {"lora": {"rank": 8, "alpha": 16, "targetModules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                         "baseCheckpoint": str(d / "base")}}
        shutil.copytree(base, d / "base")
        adapters = step_time(d, "lora", a.steps, lora)
        full_size = size(next((d / "base").glob("step-*")))
        lora_size = size(next((d / "lora" / "ckpt").glob("step-*")))
        print("LoRA (rank 8 on every projection) against full training, model 'small':")
        print(f"  step time   full {full * 1000:8.1f} ms   LoRA {adapters * 1000:8.1f} ms   ratio {adapters / full:5.2f}x")
        print(f"  checkpoint  full {full_size / 2**20:8.1f} MiB  LoRA {lora_size / 2**20:8.1f} MiB  ratio {lora_size / full_size:5.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
