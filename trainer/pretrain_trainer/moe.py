"""Mixture-of-Experts feed-forward blocks with expert parallelism.

    model: {preset: tiny, moe: {experts: 8, topK: 2}}     # in a PretrainJob spec; see docs/trainer.md

A router in fp32 scores every token (softmax, or sigmoid with the aux-loss-free bias of
DeepSeek-V3), picks its `topK` experts (top-1 is the Switch Transformer; for topK > 1 the chosen
weights are renormalised to sum to one, as Mixtral does) and the token's output is the weighted
sum of those experts' SwiGLU outputs, plus an optional always-on shared expert. Load balancing is
the Switch auxiliary loss (its gradient is injected in the backward at this layer, so it works
under pipeline parallelism with no change to the loss function) or a per-expert selection bias
nudged after every step towards even load. With `capacityFactor > 0` each expert takes at most
ceil(factor x assignments / experts) of a rank's assignments (first come first served in token
order) and the rest are dropped (the residual carries the token); 0, the default, drops nothing.

Experts are keyed by their global index (`feed_forward.experts.<id>.w1.weight`), so checkpoint
names do not depend on how experts are spread. Expert parallelism (`shard_experts`) keeps a
contiguous block of experts on each rank of the expert-parallel group: tokens go to the rank that
holds their expert with one all-to-all and come back with another (`_AllToAll`, differentiable).
The local experts run as one grouped matmul (`torch.nn.functional.grouped_mm`) where the build
has it for the device and the shapes suit it (rows 16-byte aligned), otherwise as a loop over
experts; `PRETRAIN_MOE_IMPL=loop|grouped` forces one (tests, benchmarks). Both give the same result.

Limits: experts are not split by tensor parallelism (each tensor-parallel rank holds its experts
whole and computes them on the same tokens); capacity is applied per rank before dispatch.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def grouped_mm_available(x: torch.Tensor, *shapes: int) -> bool:
    """The torch build has a grouped matmul for this device and dtype (CPU: fp32; CUDA: bf16 on
    compute capability 9.0 or newer, untested here) and the row sizes are 16-byte aligned (its
    stride rule)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok = x.dtype == torch.float32
    elif x.device.type == "cuda":
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    else:
        ok = False
    return ok and all((s * x.element_size()) % 16 == 0 for s in shapes)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


class Experts(nn.ModuleDict):
    """This rank's routed experts, keyed by global expert id; `forward` takes rows sorted by
    expert (ascending id, `counts[i]` rows for the i-th local expert)."""

    def __init__(self, dim: int, hidden: int, ids: list[int]):
        super().__init__({str(i): FeedForward(dim, hidden) for i in ids})
        self.dim, self.hidden = dim, hidden

    def forward(self, x: torch.Tensor, counts: list[int], impl: str | None = None) -> torch.Tensor:
        impl = impl or os.environ.get("PRETRAIN_MOE_IMPL", "auto")
        experts = list(self.values())
        if torch.is_autocast_enabled(x.device.type):  # what the loop's linear layers would compute in
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if impl == "grouped" or (impl == "auto" and grouped_mm_available(x, self.dim, self.hidden)):
            return self._grouped(x, counts, experts)
        return self._loop(x, counts, experts)

    @staticmethod
    def _loop(x, counts, experts):
        outs, start = [], 0
        for e, n in zip(experts, counts):
            outs.append(e(x[start:start + n]))
            start += n
        return torch.cat(outs) if outs else x[:0]

    @staticmethod
    def _grouped(x, counts, experts):
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)

        def gmm(inp, name):  # (rows, in) x per-expert (out, in) weights -> (rows, out)
            w = torch.stack([getattr(e, name).weight for e in experts]).to(inp.dtype).transpose(-2, -1)
            return _contiguous_grad(F.grouped_mm(inp, w, offs=offs))

        h = F.silu(gmm(x, "w1")) * gmm(x, "w3")
        return gmm(h, "w2")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gi = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(gi, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gi, None, None, None


class _InjectAuxLoss(torch.autograd.Function):
    """Identity on the hidden states whose backward also starts the aux loss's gradient (scaled)."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (aux,) = ctx.saved_tensors
        return g, torch.full_like(aux, ctx.scale), None


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer (see the module docstring)."""

    aux_grad_scale = 0.0  # set by the trainer each step: coef / microbatches backpropagated one by one

    def __init__(self, dim: int, hidden: int, spec):
        super().__init__()
        self.n_experts, self.top_k = spec.experts, spec.topK
        self.score, self.balancing = spec.routerScore, spec.loadBalancing
        self.aux_coef, self.capacity_factor = spec.auxLossCoef, spec.capacityFactor
        self.bias_rate = spec.biasUpdateRate
        self.router = nn.Linear(dim, spec.experts, bias=False)
        self.experts = Experts(dim, hidden, list(range(spec.experts)))
        self.shared = FeedForward(dim, hidden) if spec.sharedExpert else None
        if self.balancing == "bias":
            self.register_buffer("expert_bias", torch.zeros(spec.experts, dtype=torch.float32))
        self.ep_group, self.ep_size, self.ep_rank = None, 1, 0
        # Router statistics since the last read (not part of the state dict).
        self.register_buffer("stat_load", torch.zeros(spec.experts, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_misc", torch.zeros(3, dtype=torch.float64), persistent=False)  # dropped, aux sum, calls
        self.register_buffer("bias_load", torch.zeros(spec.experts, dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The selection bias and the router statistics at their start, zero (after `to_empty` from
        the meta device). The experts and the router are parameters: model.param_init."""
        for b in self.buffers(recurse=False):
            b.zero_()

    def shard_experts(self, ep_rank: int, ep_size: int, group) -> None:
        """Keep only this expert-parallel rank's block of experts (call after weight init)."""
        per = self.n_experts // ep_size
        for i in range(self.n_experts):
            if not ep_rank * per <= i < (ep_rank + 1) * per:
                del self.experts[str(i)]
        self.ep_group, self.ep_size, self.ep_rank = group, ep_size, ep_rank

    def route(self, x: torch.Tensor):
        """Per token: the chosen experts (T, k), their weights (T, k) and the aux loss, in fp32:
        bf16 autocast (the GPU's) cast the router's matmul back to bf16 whatever its inputs, and
        the choice, its weights and the aux loss with it (nearer ties, a bias of 0.001 lost)."""
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x)

    def _route(self, x: torch.Tensor):
        logits = F.linear(x.float(), self.router.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        chooser = scores + self.expert_bias if self.balancing == "bias" else scores
        idx = chooser.topk(self.top_k, dim=-1).indices
        w = scores.gather(-1, idx)
        if self.top_k > 1:
            w = w / w.sum(-1, keepdim=True)
        aux = logits.new_zeros(())
        if self.balancing == "auxLoss" and self.aux_coef > 0:
            probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
            frac = torch.bincount(idx.flatten(), minlength=self.n_experts).float() / idx.numel()
            aux = self.n_experts * (frac * probs.mean(0)).sum()
        return idx, w, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n_tok = xf.shape[0]
        idx, w, aux = self.route(xf)
        flat_e = idx.flatten()
        flat_t = torch.arange(n_tok, device=x.device).repeat_interleave(self.top_k)
        flat_w = w.flatten()
        counts_all = torch.bincount(flat_e, minlength=self.n_experts)
        dropped = 0
        if self.capacity_factor > 0:
            cap = math.ceil(self.capacity_factor * flat_e.numel() / self.n_experts)
            pos = F.one_hot(flat_e, self.n_experts).cumsum(0).gather(1, flat_e[:, None]).squeeze(1)
            keep = pos <= cap
            dropped = (~keep).sum()
            flat_e, flat_t, flat_w = flat_e[keep], flat_t[keep], flat_w[keep]
        order = torch.argsort(flat_e, stable=True)
        tok = flat_t[order]
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        rows = xf[tok]
        if self.ep_size > 1:
            out = self._experts_parallel(rows, counts)
        else:
            out = self.experts(rows, counts.tolist())
        y = xf.new_zeros(xf.shape, dtype=out.dtype).index_add_(0, tok, out * flat_w[order].to(out.dtype)[:, None])
        if self.shared is not None:
            y = y + self.shared(xf)
        if self.training:  # not a validation's forward: it must not move the balancing bias
            with torch.no_grad():
                self.stat_load += counts_all.double()
                self.bias_load += counts_all.double()
                self.stat_misc[0] += dropped
                self.stat_misc[1] += aux.detach().double()
                self.stat_misc[2] += 1
        if self.training and aux.requires_grad and MoE.aux_grad_scale:
            y = _InjectAuxLoss.apply(y, aux, self.aux_coef * MoE.aux_grad_scale)
        return y.view(shape)

    def _experts_parallel(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Send rows to the ranks holding their experts, run the local experts, send results back."""
        ep, per = self.ep_size, self.n_experts // self.ep_size
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)  # [source rank][local expert]
        send = counts.view(ep, per).sum(1).tolist()
        recv_by_src = recv_counts.view(ep, per)
        recv = recv_by_src.sum(1).tolist()
        got = _AllToAll.apply(rows, recv, send, self.ep_group)
        # Received rows are ordered by source rank then expert: regroup them by local expert.
        local_e = torch.arange(per, device=rows.device).repeat(ep).repeat_interleave(recv_by_src.flatten())
        regroup = torch.argsort(local_e, stable=True)
        out_sorted = self.experts(got[regroup], recv_by_src.sum(0).tolist())
        out = torch.empty_like(out_sorted).index_copy_(0, regroup, out_sorted)
        return _AllToAll.apply(out, send, recv, self.ep_group)

    @torch.no_grad()
    def update_bias(self, group=None) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded
        ones (load summed over the data-parallel group, so every replica takes the same step)."""
        if self.balancing != "bias":
            return
        load = self.bias_load.clone()
        if group is not None:
            dist.all_reduce(load, group=group)
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load).float()
        self.bias_load.zero_()


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Global layer id -> its MoE feed-forward, for the layers this rank holds."""
    layers = getattr(model, "layers", {})
    return {k: b.feed_forward for k, b in layers.items() if isinstance(getattr(b, "feed_forward", None), MoE)}


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in moe_layers(model).values() for p in m.experts.parameters()]


def router_stats(model: nn.Module, n_layers: int, n_experts: int) -> dict | None:
    """Load per expert (fraction of assignments), dropped fraction and mean aux loss per MoE layer
    since the last call, summed over every rank (a collective: call on all ranks). None for a
    dense model."""
    layers = moe_layers(model)
    if n_experts == 0:
        return None
    t = torch.zeros(n_layers, n_experts + 3, dtype=torch.float64)
    for k, m in layers.items():
        t[int(k), :n_experts] = m.stat_load.cpu()
        t[int(k), n_experts:] = m.stat_misc.cpu()
        m.stat_load.zero_()
        m.stat_misc.zero_()
    if dist.is_initialized():
        dist.all_reduce(t)
    out = {}
    for layer in range(n_layers):
        row = t[layer]
        total = float(row[:n_experts].sum())
        if total == 0:
            continue
        out[layer] = {"load": (row[:n_experts] / total).tolist(), "dropped": float(row[n_experts]) / total,
                      "aux": float(row[n_experts + 1]) / max(float(row[n_experts + 2]), 1.0)}
    return out
