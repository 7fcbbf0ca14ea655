"""The trainer's final report: one JSON object in the container's termination message, at the
path in contract.ENV_TERMINATION_MESSAGE (the operator sets it; unset under plain torchrun, and
then nothing is written). The operator reads it from the pod's state.terminated.message.

- Exit 0 or 83 (preempted): global rank 0 writes the last step, loss, tokens seen, the step of
  the last committed checkpoint, and the last validation's step and held-out loss (`validation`).
- A rank that fails writes the error that ended it (`{"error": "rank 3: ValueError: ..."}`), unless
  another rank of the pod wrote first: the first failure is the cause; the ones after it are
  mostly the collectives it broke.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os

from pretrain_operator import contract as c

log = logging.getLogger("pretrain_trainer.report")
MAX_ERROR = 2000  # the whole message is kept up to 4096 bytes


def progress(step: int, total_steps: int, loss: float | None, tokens_seen: int, checkpoint_step: int,
             validated: tuple[int, float] | None = None) -> None:
    doc = {"step": step, "totalSteps": total_steps, "tokensSeen": tokens_seen, "checkpointStep": checkpoint_step}
    if loss is not None and math.isfinite(loss):
        doc["loss"] = loss
    if validated and math.isfinite(validated[1]):
        doc["validationStep"], doc["validationLoss"] = validated
    _write(doc, first_only=False)


def error(e: BaseException) -> None:
    """Report what ends this rank, if it is a failure (not an exit 0, not a preemption's exit)."""
    if isinstance(e, SystemExit):
        if e.code in (None, 0, c.EXIT_PREEMPTED):
            return
        text = getattr(e, "msg", None) or (e.code if isinstance(e.code, str) else f"exit {e.code}")
    else:
        text = f"{type(e).__name__}: {e}"
    _write({"error": f"rank {os.environ.get('RANK', '0')}: {text}"[:MAX_ERROR]}, first_only=True)


def _write(doc: dict, first_only: bool) -> None:
    path = os.environ.get(c.ENV_TERMINATION_MESSAGE)
    if not path:
        return
    try:
        with open(path, "a+") as f:  # every rank of the pod shares the file: one at a time
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            if first_only and f.read(1):
                return
            f.truncate(0)
            f.write(json.dumps(doc))
    except OSError as e:
        log.warning("final report not written to %s: %s", path, e)
