"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; with
`model.moe`, Mixture-of-Experts feed-forward blocks (moe.py) in every k-th layer.

Layers live in a ModuleDict keyed by their global index ("0", "1", ...), so parameter names (FQNs)
do not depend on the parallel layout: a pipeline stage holds a subset of the same keys, and a
checkpoint saved under one layout loads under another. Weight init is seeded per parameter from
(seed, FQN), so every layout gets the same weights.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moe import FeedForward, MoE


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    layers: int
    heads: int
    kvHeads: int
    vocabSize: int
    ffnDim: int
    maxSeqLen: int
    normEps: float = 1e-5
    ropeTheta: float = 10000.0
    moe: object = None  # api.MoE, or None for a dense model

    @classmethod
    def from_spec(cls, model_spec) -> "ModelArgs":
        return cls(**model_spec.resolved(), moe=model_spec.moe)

    def is_moe_layer(self, i: int) -> bool:
        """MoE in every k-th layer (the k-th, 2k-th, ...), dense elsewhere."""
        return self.moe is not None and (i + 1) % self.moe.everyKLayers == 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(args: ModelArgs) -> torch.Tensor:
    hd = args.dim // args.heads
    freqs = 1.0 / (args.ropeTheta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    t = torch.arange(args.maxSeqLen, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (seq, hd/2, 2)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    # x: (b, s, h, hd)
    s = x.shape[1]
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = cache[:s, :, 0][None, :, None, :], cache[:s, :, 1][None, :, None, :]
    out = torch.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 0] * sin + xr[..., 1] * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads, self.kv_heads = args.heads, args.kvHeads
        self.head_dim = args.dim // args.heads
        self.wq = nn.Linear(args.dim, args.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kvHeads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kvHeads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 instead of the head counts: under tensor parallelism each rank holds a slice of heads.
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        rep = q.shape[2] // k.shape[2]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.normEps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.normEps)
        if args.is_moe_layer(layer_id):
            self.feed_forward = MoE(args.dim, args.ffnDim, args.moe)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffnDim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """`tok_embeddings` and `output`/`norm` are None on pipeline stages that do not own them."""

    def __init__(self, args: ModelArgs, layer_ids: list[int] | None = None, first: bool = True, last: bool = True):
        super().__init__()
        self.args = args
        ids = list(range(args.layers)) if layer_ids is None else layer_ids
        self.tok_embeddings = nn.Embedding(args.vocabSize, args.dim) if first else None
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in ids})
        self.norm = RMSNorm(args.dim, args.normEps) if last else None
        self.output = nn.Linear(args.dim, args.vocabSize, bias=False) if last else None
        self.register_buffer("rope", rope_cache(args), persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The rotary table again (after `to_empty` from the meta device), computed on the CPU as
        in __init__."""
        self.rope.copy_(rope_cache(self.args))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h, self.rope)
        if self.output is None:
            return h
        return self.output(self.norm(h)).float()


def param_init(fqn: str, shape: tuple[int, ...], seed: int, layers: int) -> torch.Tensor:
    """The initial value of the whole parameter named `fqn` (its name in an unwrapped model: no
    LoRA `.base`, no checkpoint wrapper), generated on the CPU from a generator seeded by (seed,
    FQN): norms 1, wo / w2 normal with std 0.02 / sqrt(2 layers), the rest normal with std 0.02."""
    std_base = 0.02
    if fqn.endswith("norm.weight") or fqn == "norm.weight":
        return torch.ones(shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))
    if fqn.endswith(("wo.weight", "w2.weight")):
        return torch.randn(shape, generator=g) * (std_base / math.sqrt(2 * layers))
    return torch.randn(shape, generator=g) * std_base


def init_weights(model: nn.Module, seed: int) -> None:
    """Per-parameter init seeded by (seed, FQN): identical whatever the layout or stage split.
    Call before any sharding (on full tensors); train.build's meta-device path gives each rank
    its piece of the same values (`param_init`)."""
    layers = getattr(model, "args").layers
    with torch.no_grad():
        for fqn, p in model.named_parameters():
            p.copy_(param_init(fqn, tuple(p.shape), seed, layers))


def num_params(args: ModelArgs, active: bool = False) -> int:
    """Parameters of the whole model, or (active=True) those one token uses (its topK experts)."""
    hd = args.dim // args.heads
    attn = args.dim * hd * (2 * args.heads + 2 * args.kvHeads)
    dense = 3 * args.dim * args.ffnDim
    total = 0
    for i in range(args.layers):
        ffn = dense
        if args.is_moe_layer(i):
            m = args.moe
            ffn = dense * ((m.topK if active else m.experts) + int(m.sharedExpert)) + args.dim * m.experts
        total += attn + ffn + 2 * args.dim
    return total + 2 * args.vocabSize * args.dim + args.dim


def flops_per_token(args: ModelArgs, seq: int, adapters: int | None = None) -> float:
    """Training FLOPs per token, as torchtitan's MFU estimate: 6N over the parameters that do
    matrix work for a token (the active experts of an MoE; not the input embedding, a lookup) plus
    12 x layers x dim x seq for attention. With LoRA (`adapters`: the adapters' parameters) the
    frozen base does 4N (forward, and the backward's gradient of its input, none of its weights)
    and the adapters 6N: 6N over all of it overstated a LoRA run's MFU by half."""
    base = num_params(args, active=True) - args.vocabSize * args.dim
    matmul = 6 * base if adapters is None else 4 * base + 6 * adapters
    return matmul + 12 * args.layers * args.dim * seq