"""Pipeline parallelism with torch.distributed.pipelining: the decoder's layers split evenly into
stages (each a `Transformer` holding its slice of the global layer ids, so names match the whole
model's), GPipe, 1F1B or Interleaved1F1B (two virtual stages per rank, looped placement: rank r
holds stages r and r + pp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleLoopedBFS,
                                          ScheduleZBVZeroBubble)

from .model import ModelArgs, Transformer

SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B,
             "LoopedBFS": ScheduleLoopedBFS, "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
             "ZBVZeroBubble": ScheduleZBVZeroBubble, "DualPipeV": ScheduleDualPipeV}
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")  # rank r holds stages r and 2 pp - 1 - r


def stages_per_rank(schedule: str) -> int:
    return 1 if schedule in ("GPipe", "1F1B") else 2


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(stages_per_rank(schedule))]


def microbatch_count(spec) -> int:
    """How many microbatches a pipelined step splits each rank's batch into: parallelism.microbatches,
    else the per-rank batch over data.microBatchSize."""
    p = spec.parallelism
    return p.microbatches or spec.data.globalBatchSize // p.data // spec.data.microBatchSize


def rows_per_forward(spec) -> int:
    """How many rows one forward of training (and validation, and eval) holds on a rank: its
    microbatch (under pipeline parallel, the per-rank batch over `microbatch_count`)."""
    if spec.parallelism.pipeline > 1:
        return spec.data.globalBatchSize // spec.parallelism.data // microbatch_count(spec)
    return spec.data.microBatchSize


def stage_layers(args: ModelArgs, stage: int, n_stages: int) -> list[int]:
    per = args.layers // n_stages
    return list(range(stage * per, (stage + 1) * per))


def build_parts(args: ModelArgs, pp_rank: int, pp: int, schedule: str) -> tuple[list[int], list[Transformer]]:
    n = pp * stages_per_rank(schedule)
    ids = stage_ids(pp_rank, pp, schedule)
    return ids, [Transformer(args, stage_layers(args, s, n), first=s == 0, last=s == n - 1) for s in ids]


class Parts(nn.Module):
    """This rank's stages seen as one module with the whole model's names (for checkpoints and
    the optimizer): `layers.<global id>`, and `tok_embeddings` / `norm` / `output` where held."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict({k: v for p in parts for k, v in p.layers.items()})
        for name in ("tok_embeddings", "norm", "output"):
            mod = next((getattr(p, name) for p in parts if getattr(p, name, None) is not None), None)
            if mod is not None:
                setattr(self, name, mod)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.flatten(0, 1).float(), target.flatten())


def build_schedule(parts: list[nn.Module], ids: list[int], pp: int, schedule: str, n_micro: int, device, group):
    n = pp * stages_per_rank(schedule)
    stages = [PipelineStage(p, s, n, torch.device(device), group=group) for p, s in zip(parts, ids)]
    cls = SCHEDULES[schedule]
    if stages_per_rank(schedule) == 2:
        return cls(stages, n_microbatches=n_micro, loss_fn=loss_fn), stages
    return cls(stages[0], n_microbatches=n_micro, loss_fn=loss_fn), stages


def run(schedule, x: torch.Tensor, y: torch.Tensor, forward_only: bool = False) -> torch.Tensor | None:
    """One pass of the schedule over this rank's batch (`step`, or the forward-only `eval`): the
    first stage feeds `x`, the last computes the loss against `y`. Returns the loss of each
    microbatch (float64, on the CPU) on the rank holding the last stage, None elsewhere."""
    stages = schedule._stages if hasattr(schedule, "_stages") else [schedule._stage]
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    losses: list = []
    (schedule.eval if forward_only else schedule.step)(*([x] if first else []), target=y if last else None,
                                                        losses=losses if last else None)
    return torch.stack([lo.detach().double().cpu() for lo in losses]) if last and losses else None
