"""The trainer's checkpoint writer (checkpoint.Writer: no zip CRC32s) against DCP's own
FileSystemWriter, saving the same model + AdamW state.

    .venv/bin/python bench/checkpoint_writer.py [--rounds 7] [--model '{"dim": 1024, "layers": 8, ...}']

One CPU process (gloo, world size 1), two writer threads each as the trainer uses on a CPU; the two
writers alternate, the folder is removed and the page cache flushed (`sync`) before each save, and
the median of `--rounds` is printed, so a disk whose speed drifts during the run (this project's
machine: 489 MiB/s to 1.5 GB/s within minutes) affects both alike. Limits: the save alone (no
marker, no RNG files, no async staging); bench/trainer.py measures the trainer's whole save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_state(sizes: dict, shard=None) -> dict:
    """The model `small` (sizes over it) and its AdamW state after one step, as a checkpoint holds
    them; `shard(model)` (FSDP2, say) is applied before the optimizer is made."""
    sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "operator")]
    import torch
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from pretrain_operator.api import ModelSpec
    from pretrain_trainer.model import ModelArgs, Transformer, init_weights

    args = ModelArgs.from_spec(ModelSpec(preset="small", **sizes))
    model = Transformer(args)
    init_weights(model, 0)
    if shard:
        shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, args.vocabSize, (1, 33))
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optim.step()  # AdamW's state exists after a step
    msd, osd = get_state_dict(model, optim)
    osd.pop("param_groups")
    return {"model": msd, "optim": osd}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default="{}", help='sizes over the preset "small", as JSON')
    a = ap.parse_args(argv or [])
    sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "operator")]
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from pretrain_trainer.checkpoint import Writer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one process: no port
    try:
        state = model_state(json.loads(a.model))
        times: dict[str, list[float]] = {"FileSystemWriter": [], "checkpoint.Writer": []}
        with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
            d = Path(tmp) / "ckpt"
            for _ in range(a.rounds):
                for name, cls in (("FileSystemWriter", FileSystemWriter), ("checkpoint.Writer", Writer)):
                    shutil.rmtree(d, ignore_errors=True)
                    os.sync()
                    t0 = time.monotonic()
                    dcp.save(state, storage_writer=cls(str(d), thread_count=2, sync_files=True))
                    times[name].append(time.monotonic() - t0)
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    finally:
        dist.destroy_process_group()
    base, ours = (statistics.median(times[k]) for k in ("FileSystemWriter", "checkpoint.Writer"))
    print(f"one save of {size / 2**20:.0f} MiB (model + AdamW), median of {a.rounds}:")
    print(f"  DCP's FileSystemWriter      {base:6.3f} s  {size / 2**20 / base:6.0f} MiB/s")
    print(f"  checkpoint.Writer (no CRC)  {ours:6.3f} s  {size / 2**20 / ours:6.0f} MiB/s   {base / ours:4.2f}x faster")
    return {"bytes": size, "filesystemwriter_s": base, "writer_s": ours}


if __name__ == "__main__":
    main(sys.argv[1:])
