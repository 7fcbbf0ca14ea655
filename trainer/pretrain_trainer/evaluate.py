"""`python -m pretrain_trainer eval --config job.yaml [--checkpoint DIR]`: the mean loss of a
checkpoint's model on the held-out data (the last 5% of the token stream, never trained on), so
checkpoints and layouts can be compared: its first 32 windows, or with `validation` in the config
the windows a validation during training reads (the same loss as the one logged at that step).
One process; loads the model part of any checkpoint, whatever layout saved it, or a Hugging Face
folder (hf.py). Without --checkpoint: the newest one under checkpoint.path whose model files
verify (checkpoint.weights_source), saying which newer ones it skipped. A LoRA job's checkpoint
is its adapters on `lora.baseCheckpoint`.

Limits: one process on the CPU in fp32, so a bf16 run's validation on a GPU differs from it by
bf16's rounding, and a large model's eval takes the host's memory and time."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import committed_steps, is_hf_folder, load_weights, pinned_base, weights_source
from .data import eval_batches
from .lora import apply_lora
from .model import ModelArgs, Transformer, init_weights
from .pipeline import rows_per_forward
from .train import ConfigError, load_spec, lora_base_spec, open_data, setup_distributed
from .validation import windows


def model_from_checkpoint(spec, checkpoint: str | None) -> tuple[Transformer, Path]:
    """The whole model (one process) with the weights of `checkpoint` (a step folder or a Hugging
    Face folder; default the newest that verifies under checkpoint.path). Needs a process group
    (DCP loads through one): call setup_distributed() first."""
    args = ModelArgs.from_spec(spec.model)
    model = Transformer(args)
    init_weights(model, spec.training.seed)
    target = Path(checkpoint or spec.checkpoint.path)
    if not checkpoint and not committed_steps(target):
        raise ConfigError(f"no committed checkpoint under {spec.checkpoint.path}")
    try:
        verified = False
        if spec.lora and not is_hf_folder(target):
            target, verified = weights_source(target), True  # the step, first: its adapters' base is pinned in it
            # As the training's start (train.build): the base it was trained on, else the seed's random init.
            base = pinned_base(target, lora_base_spec(spec)) or lora_base_spec(spec)
            if base:
                load_weights(model, base)
            apply_lora(model, spec.lora, spec.training.seed)
        d = load_weights(model, str(target), verified=verified)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load {target}: {e}")
    model.eval()
    return model, d


def evaluate(config: str, checkpoint: str | None = None) -> float:
    spec = load_spec(config)
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    setup_distributed()  # DCP loads through a (one-process) group
    args = ModelArgs.from_spec(spec.model)
    model, d = model_from_checkpoint(spec, checkpoint)
    rows = open_data(spec, args.vocabSize).heldout_rows(windows(spec) or 32, strict=False)
    total, n = 0.0, 0
    with torch.no_grad():
        # The rows of each forward are training's (a microbatch): an MoE with a capacity drops
        # tokens by how many one forward routes, and one row at a time differed from validation.
        for x, y in eval_batches(rows, rows_per_forward(spec)):
            per_token = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
            total += float(per_token.view(len(x), -1).mean(1).double().sum())
            n += len(x)
    loss = total / max(n, 1)
    print(f"eval {d.name}: held-out loss {loss:.6f} over {n} windows of {spec.data.seqLen}")
    return loss
