"""Validation during training (`spec.validation`): the held-out loss of the current weights, every
`everySteps` steps and at the last step, under whatever layout trains.

    validation: {everySteps: 100, batches: 1}      # in the PretrainJob spec (or --config file)

Each validation reads the same windows: the first `batches x data.globalBatchSize` windows of the
held-out data (the last 5% of the token stream, which training never reads, of each source in a
blend in its share; `data.Blend.heldout_rows`), each data-parallel rank its slice of each global
batch, in the training's microbatches (through the pipeline schedule's forward-only `eval` under
pipeline parallel). Forward only: no gradients, no
random numbers drawn, the MoE router statistics (and so its bias balancing) untouched, so a run
trains exactly as it would without validation. The loss is the mean over those windows of each
window's mean token loss: `python -m pretrain_trainer eval` of a checkpoint of the same step
prints the same number (it reads the same windows when the config has `validation`).

Limits: the windows are fixed (the same ones every time, not a sample). Validation is skipped at a
step that stops for a preemption, and a stop requested while it runs ends it between two batches
(no held-out loss for that step): the checkpoint goes first. The next attempt validates that step
before its first step (train.py), so only a run that never resumes loses it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain_operator import api

from . import parallel, pipeline
from .data import Blend, DataError


def windows(spec: api.PretrainJobSpec) -> int:
    """How many held-out windows a validation reads."""
    return spec.validation.batches * spec.data.globalBatchSize if spec.validation else 0


class Validator:
    def __init__(self, spec: api.PretrainJobSpec, blend: Blend, dp_rank: int, dp_size: int, device: str):
        """Raises data.DataError when the held-out data is too short."""
        self.every, self.n = spec.validation.everySteps, windows(spec)
        self.micro, self.device = spec.data.microBatchSize, device
        gbs = spec.data.globalBatchSize
        per_rank = gbs // dp_size
        try:  # this rank's slice of each global batch only: the batches of training's layout, one per call
            rows = blend.heldout_rows(self.n, keep=lambda i: i % gbs // per_rank == dp_rank)
        except DataError as e:
            raise DataError(f"validation.batches ({spec.validation.batches}) x data.globalBatchSize "
                            f"({gbs}): {e}; lower validation.batches or give more data") from e
        self.batches = list(rows.split(per_rank))

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def loss(self, model, schedule, mesh, autocast, stop: Callable[[], bool] = lambda: False) -> float | None:
        """The mean held-out loss; every rank calls it at the same step (it runs the model's
        collectives) and gets the same number. None when `stop()` (a SIGTERM) became true on any
        rank during it: the ranks agree before each batch, so a termination notice's checkpoint
        waits for one batch, not for the whole validation."""
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64)
        try:
            with torch.no_grad(), autocast:
                for batch in self.batches:
                    if parallel.any_rank(stop()):
                        return None
                    x, y = batch[:, :-1].to(self.device), batch[:, 1:].to(self.device)
                    total += self._pipelined(schedule, x, y) if schedule is not None else self._direct(model, x, y)
        finally:
            model.train(was_training)
        if schedule is not None:  # only the last stage has the loss; the others add 0
            dist.all_reduce(total, group=mesh["pp"].get_group())
        dist.all_reduce(total, group=mesh["dp"].get_group())
        return float(total) / self.n

    def _direct(self, model, x, y) -> torch.Tensor:
        """The sum over these rows of each row's mean token loss, a microbatch at a time."""
        out = torch.zeros((), dtype=torch.float64)
        for i in range(0, len(x), self.micro):
            logits = model(x[i:i + self.micro])
            per_token = F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + self.micro].flatten(), reduction="none")
            out += per_token.view(len(logits), -1).mean(1).sum().double().cpu()
        return out

    @staticmethod
    def _pipelined(schedule, x, y) -> torch.Tensor:
        """The same through the pipeline: its loss per microbatch is the mean over the microbatch's
        rows (all of one length), so times the rows it had."""
        losses = pipeline.run(schedule, x, y, forward_only=True)
        return losses.sum() * (len(x) / len(losses)) if losses is not None else torch.zeros((), dtype=torch.float64)
