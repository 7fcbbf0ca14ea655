"""LoRA: low-rank adapters on frozen base weights.

    lora: {rank: 8, alpha: 16, targetModules: [wq, wk, wv, wo, w1, w2, w3], baseCheckpoint: DIR}

`apply_lora` replaces each targeted linear layer of the decoder blocks (a pattern matches the
layer's own name, `wq`, or its path, `layers.0.attention.wq`; shell wildcards allowed) by a
`LoRALinear`: y = base(x) + (alpha / rank) * lora_B(lora_A(dropout(x))), with lora_A initialised
as PEFT does (Kaiming-uniform, seeded per name like every other weight) and lora_B zero, so
training starts from the base model exactly. Every other parameter is frozen: the optimizer sees
the adapters only, and checkpoints hold only them (and their optimizer state), so they are small;
the base comes from `lora.baseCheckpoint` (a trainer checkpoint or a Hugging Face folder) on every
start. Under tensor parallelism the adapter follows its base layer: for a column-wise layer lora_B
is split by rows like the base weight, for a row-wise one lora_A is split by columns (its output
reduce-scattered to the rank's slice of the sequence, as the base's: sequence parallel) and lora_B
runs on that slice. FSDP2 shards adapters and frozen weights alike.

Limits: MoE experts are not adapted (lora with model.moe is refused); dropout > 0 under tensor
parallelism draws its mask per rank.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
import zlib

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A (full tensors)."""
        def full(t):
            return t.full_tensor() if hasattr(t, "full_tensor") else t
        return full(self.base.weight) + self.scale * (full(self.lora_B.weight) @ full(self.lora_A.weight))


def _targets(model: nn.Module, patterns: list[str]) -> list[str]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("layers."):
            leaf = name.rsplit(".", 1)[-1]
            if any(fnmatch.fnmatchcase(leaf, p) or fnmatch.fnmatchcase(name, p) for p in patterns):
                out.append(name)
    return out


def adapter_init(fqn: str, shape: tuple[int, ...], seed: int) -> torch.Tensor | None:
    """The initial value of an adapter weight (`<layer>.lora_A.weight`: Kaiming-uniform seeded by
    (seed, its name), as nn.Linear and PEFT; `<layer>.lora_B.weight`: zero), None for any other
    name."""
    if fqn.endswith(".lora_A.weight"):
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))
        bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) over in_features, as nn.Linear and PEFT
        return torch.rand(shape, generator=g) * 2 * bound - bound
    if fqn.endswith(".lora_B.weight"):
        return torch.zeros(shape)
    return None


def apply_lora(model: nn.Module, spec, seed: int) -> int:
    """Wrap the targeted layers (after the base weights are in place, before any sharding) and
    freeze everything else. Returns the number of wrapped layers. On a meta-device model the
    adapters are made on the meta device too, without values (train.build fills them in with
    `adapter_init` after sharding)."""
    names = _targets(model, spec.targetModules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        with torch.device("meta") if base.weight.is_meta else contextlib.nullcontext():
            wrapped = LoRALinear(base, spec.rank, spec.alpha, spec.dropout)
        if not base.weight.is_meta:
            with torch.no_grad():
                for n in ("lora_A", "lora_B"):
                    w = getattr(wrapped, n).weight
                    w.copy_(adapter_init(f"{name}.{n}.weight", tuple(w.shape), seed))
            wrapped.to(base.weight.device)
        setattr(parent, leaf, wrapped)
    return len(names)


def adapter_params(args, spec) -> int:
    """The adapters' parameters in the whole model (of `ModelArgs` args; counted on the meta
    device, whatever the layout): every one works for every token (experts take none)."""
    from .model import Transformer
    with torch.device("meta"):
        model = Transformer(args)
    apply_lora(model, spec, 0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def frozen_digest(model: nn.Module) -> str:
    """sha256 over this rank's pieces of every frozen parameter (to prove the base did not move)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            t = p.to_local() if hasattr(p, "to_local") else p
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
