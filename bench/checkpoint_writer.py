"""The trainer's checkpoint writer (checkpoint.Writer: no zip CRC32s, one zlib CRC32 per file)
against DCP's own FileSystemWriter, saving the same model + AdamW state; and what the file CRC32s
cost: the same writer without them, and a resume's check of them (reading the files back).

    .venv/bin/python bench/checkpoint_writer.py [--rounds 7] [--model '{"dim": 1024, "layers": 8, ...}']

One CPU process (gloo, world size 1), two writer threads each as the trainer uses on a CPU; the two
writers alternate, the folder is removed and the page cache flushed (`sync`) before each save, and
the median of `--rounds` is printed, so a disk whose speed drifts during the run (this project's
machine: 489 MiB/s to 1.5 GB/s within minutes) affects both alike. Limits: the save alone (no
marker, no RNG files, no async staging); bench/trainer.py measures the trainer's whole save. The
check reads what the page cache still holds from the save (a resume on another node reads the disk).
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
    from torch.distributed.checkpoint.filesystem import FileSystem

    from pretrain_trainer.checkpoint import Writer, file_crc

    class NoFileCrc(Writer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fs = FileSystem()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one process: no port
    try:
        state = model_state(json.loads(a.model))
        writers = {"FileSystemWriter": FileSystemWriter, "checkpoint.Writer": Writer, "no file CRC32": NoFileCrc}
        times: dict[str, list[float]] = {k: [] for k in (*writers, "check")}
        with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
            d = Path(tmp) / "ckpt"
            for _ in range(a.rounds):
                for name, cls in writers.items():
                    shutil.rmtree(d, ignore_errors=True)
                    os.sync()
                    t0 = time.monotonic()
                    dcp.save(state, storage_writer=cls(str(d), thread_count=2, sync_files=True))
                    times[name].append(time.monotonic() - t0)
                    if name == "checkpoint.Writer":
                        t0 = time.monotonic()
                        for f in d.glob("*.distcp"):
                            assert file_crc(f) == int(Path(f"{f}.crc32").read_text())
                        times["check"].append(time.monotonic() - t0)
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    finally:
        dist.destroy_process_group()
    base, ours, bare, check = (statistics.median(times[k]) for k in (*writers, "check"))
    mib = size / 2**20
    print(f"one save of {mib:.0f} MiB (model + AdamW), median of {a.rounds}:")
    print(f"  DCP's FileSystemWriter               {base:6.3f} s  {mib / base:6.0f} MiB/s")
    print(f"  checkpoint.Writer                    {ours:6.3f} s  {mib / ours:6.0f} MiB/s   {base / ours:4.2f}x faster")
    print(f"  checkpoint.Writer without file CRCs  {bare:6.3f} s  {mib / bare:6.0f} MiB/s   the CRCs cost {ours / bare:4.2f}x")
    print(f"  a resume's check of the file CRCs    {check:6.3f} s  {mib / check:6.0f} MiB/s   {check / ours:4.2f}x a save")
    return {"bytes": size, "filesystemwriter_s": base, "writer_s": ours, "writer_no_file_crc_s": bare, "check_s": check}


if __name__ == "__main__":
    main(sys.argv[1:])
