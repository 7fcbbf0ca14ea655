"""`python -m pretrain_trainer eval --config job.yaml [--checkpoint DIR]`: the mean loss of a
checkpoint's model on the held-out data (the last 5% of the token stream, never trained on), so
checkpoints and layouts can be compared. One process; loads the model part of any checkpoint,
whatever layout saved it. Without --checkpoint: the newest good one under checkpoint.path."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .checkpoint import committed_steps, step_dir, verify
from .data import TokenSource, eval_batches, split_holdout
from .model import ModelArgs, Transformer, init_weights
from .train import ConfigError, load_spec, setup_distributed


def evaluate(config: str, checkpoint: str | None = None) -> float:
    spec = load_spec(config)
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    setup_distributed()  # DCP loads through a (one-process) group
    args = ModelArgs.from_spec(spec.model)
    model = Transformer(args)
    init_weights(model, spec.training.seed)
    if checkpoint:
        d = Path(checkpoint)
    else:
        root = Path(spec.checkpoint.path)
        good = [s for s in committed_steps(root)[::-1] if verify(step_dir(root, s)) is None]
        if not good:
            raise ConfigError(f"no committed checkpoint under {root}")
        d = step_dir(root, good[0])
    problem = verify(d)
    if problem:
        raise ConfigError(f"checkpoint {d} does not verify: {problem}")
    sd = {"model": get_model_state_dict(model)}
    dcp.load(sd, checkpoint_id=str(d))
    set_model_state_dict(model, sd["model"])
    model.eval()
    _, held = split_holdout(TokenSource(spec.data.path, args.vocabSize, spec.training.seed).tokens, spec.data.seqLen)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(held, spec.data.seqLen):
            total += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
            n += 1
    dist.destroy_process_group()
    loss = total / max(n, 1)
    print(f"eval {d.name}: held-out loss {loss:.6f} over {n} windows of {spec.data.seqLen}")
    return loss
