"""DCP's plan cache (the trainer's checkpoint._planner: DefaultSavePlanner(enable_plan_caching=True),
as torchtitan) against planning every save anew, on several ranks.

    .venv/bin/python bench/checkpoint_plan.py [--ranks 2 4] [--rounds 9]

Each rank holds its FSDP2 shard of the model `small` and its AdamW state (97 MiB in all); the two
planners alternate, save after save, into one folder removed before each, with the trainer's writer
(checkpoint.Writer: two threads, fsync). Printed: the median save time of each (the first save of
each left out: it plans in both cases) and their ratio. Limits: gloo on one machine's CPU, so the
plan exchange is cheap next to a real cluster's; the save alone (no marker, no RNG files).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(rank: int, world: int, rounds: int, folder: str, port: int, out: dict) -> None:
    sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "operator"), str(ROOT / "bench")]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from checkpoint_writer import model_state
    from pretrain_trainer.checkpoint import Writer

    def shard(model) -> None:
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state = model_state({}, shard)
        times: dict[str, list[float]] = {"planned anew": [], "plan cache": []}
        for _ in range(rounds):
            for name in times:
                if rank == 0:
                    shutil.rmtree(folder, ignore_errors=True)
                dist.barrier()
                t0 = time.monotonic()
                dcp.save(state, storage_writer=Writer(folder, thread_count=2, sync_files=True),
                         planner=DefaultSavePlanner(enable_plan_caching=name == "plan cache"))
                dist.barrier()
                times[name].append(time.monotonic() - t0)
        if rank == 0:
            out.update({k: statistics.median(v[1:]) for k, v in times.items()})
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args(argv or [])
    import torch.multiprocessing as mp
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-plan-", dir=ROOT) as tmp:
        for world in a.ranks:
            out = mp.Manager().dict()
            mp.spawn(rank_main, args=(world, a.rounds, str(Path(tmp) / "ckpt"), 29650 + world, out), nprocs=world)
            base, cached = out["planned anew"], out["plan cache"]
            results[world] = {"planned_anew_s": base, "plan_cache_s": cached}
            print(f"{world} ranks, a 97 MiB save (median of {a.rounds - 1}): planned anew {1000 * base:6.1f} ms, "
                  f"plan cache {1000 * cached:6.1f} ms: {cached / base:4.2f}x the time")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
