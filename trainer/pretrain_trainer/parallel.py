"""Parallelism over one DeviceMesh ("dp", "tp"): tensor parallel with DTensor, then FSDP2 over
data parallel, applied per block and at the root, as torchtitan does; expert parallel for MoE.

The mesh is ("pp", "dp", "tp"); pipeline stages are built in pipeline.py. Expert parallelism
borrows from data parallelism (dp = edp x ep, as torchtitan's dp_shard = ep x rest): a second
mesh ("pp", "edp", "ep", "tp") over the same ranks splits each data-parallel group into groups of
`ep` consecutive ranks. Each MoE layer keeps experts/ep experts per ep rank and exchanges tokens
over "ep" (moe.py); FSDP2 shards those experts over "edp" (the ranks that hold the same experts)
and everything else over "dp" as for a dense model. Expert gradients arrive summed over the ep
ranks whose tokens they saw and averaged over edp by FSDP, so `scale_expert_grads` divides them by
ep: the result is the mean over all dp ranks, the same as a dense parameter's.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               PrepareModuleOutput, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

log = logging.getLogger("pretrain_trainer.parallel")


def build_mesh(device: str, pp: int, dp: int, tp: int) -> DeviceMesh:
    return init_device_mesh(device, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def build_expert_mesh(device: str, pp: int, dp: int, tp: int, ep: int) -> DeviceMesh:
    """The same ranks as build_mesh's, with dp split into (edp, ep), ep the faster-varying."""
    return init_device_mesh(device, (pp, dp // ep, ep, tp), mesh_dim_names=("pp", "edp", "ep", "tp"))


def apply_expert_parallel(model, ep_mesh: DeviceMesh) -> None:
    """Keep this ep rank's block of experts in every MoE layer (after weight init)."""
    from .moe import moe_layers
    for m in moe_layers(model).values():
        m.shard_experts(ep_mesh.get_local_rank(), ep_mesh.size(), ep_mesh.get_group() if ep_mesh.size() > 1 else None)


def scale_expert_grads(model, ep: int) -> None:
    if ep == 1:
        return
    from .moe import expert_parameters
    for p in expert_parameters(model):
        if p.grad is not None:
            p.grad.div_(ep)


def apply_tensor_parallel(model, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallel with sequence parallel (torchtitan's apply_tp): q/k/v and
    w1/w3 column-wise, wo and w2 row-wise (heads split over tp). Between them the residual stream
    and the RMSNorms hold each tensor rank's slice of the sequence (Shard(1)): the norms run on it
    (SequenceParallel, their weights replicated DTensors whose gradients are summed over tp), the
    attention and feed-forward inputs are all-gathered to the whole sequence (as plain tensors, so
    LoRA adapters and MoE routers see what they see without tensor parallel) and wo / w2 end in a
    reduce-scatter to the slice instead of an all-reduce. The embedding's output is split into the
    slices, the output layer's input gathered back: logits (and the loss) as without it. Parameter
    names and global shapes are unchanged (checkpoints load across layouts); a pipeline stage sends
    and receives its rank's slice. data.seqLen must be divisible by the tensor degree (a CRD rule)."""
    if tp_mesh.size() == 1:
        return
    from .moe import MoE
    # SequenceParallel replaces a module's weights by replicated DTensors that require gradients:
    # frozen weights (LoRA's base norms) stay frozen.
    frozen = {n for n, q in model.named_parameters() if not q.requires_grad}
    seq = Shard(1)
    gather_in = dict(input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True)
    for block in model.layers.values():
        plan = {"attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(seq, None), desired_input_layouts=(Replicate(), None),
                                                use_local_output=True),
                "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=seq),
                "ffn_norm": SequenceParallel()}
        if isinstance(block.feed_forward, MoE):
            # The router and the routed experts stay whole on each tensor rank, on the whole sequence:
            # the input gathered, the output cut back to this rank's slice. A shared expert is split
            # like a dense feed-forward, its output all-reduced (the MoE adds it to the routed sum).
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(seq,), use_local_output=True)
            if block.feed_forward.shared is not None:
                plan.update({"feed_forward.shared.w1": ColwiseParallel(), "feed_forward.shared.w3": ColwiseParallel(),
                             "feed_forward.shared.w2": RowwiseParallel()})
        else:
            plan.update({"feed_forward": PrepareModuleInput(**gather_in), "feed_forward.w1": ColwiseParallel(),
                         "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(output_layouts=seq)})
        parallelize_module(block, tp_mesh, _with_lora(block, plan))
    # The embeddings and the output layer keep their whole weights on each tensor rank.
    top = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(seq,),
                                                    use_local_output=True)
    if getattr(model, "norm", None) is not None:
        top["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        top["output"] = PrepareModuleInput(**gather_in)
    if top:
        parallelize_module(model, tp_mesh, top)
    for n, q in model.named_parameters():
        if n in frozen:
            q.requires_grad_(False)
    log.info("tensor parallel %d with sequence parallel: norms and residual stream on 1/%d of each sequence",
             tp_mesh.size(), tp_mesh.size())


def _with_lora(block, plan: dict) -> dict:
    """LoRA-wrapped layers: the base as planned; lora_B column-wise under a column-wise base,
    lora_A row-wise under a row-wise one (the other adapter matrix stays whole). Under a row-wise
    base whose output is the sequence slice, lora_A's output is that slice too and lora_B runs on
    it with its weight replicated (sequence parallel: its gradient summed over tp)."""
    from .lora import LoRALinear
    out = {}
    for name, style in plan.items():
        mod = block.get_submodule(name)
        if isinstance(mod, LoRALinear):
            out[f"{name}.base"] = style
            if isinstance(style, ColwiseParallel):
                out[f"{name}.lora_B"] = ColwiseParallel()
            else:
                out[f"{name}.lora_A"] = RowwiseParallel(output_layouts=style.output_layouts[0])
                if isinstance(style.output_layouts[0], Shard):
                    out[f"{name}.lora_B"] = SequenceParallel(use_local_output=True)
        else:
            out[name] = style
    return out


def replicate_partial_grads(params) -> None:
    """Sequence-parallel weights (norms; lora_B under a row-wise layer) are replicated over tp but
    each rank's gradient covers its slice of the sequence only (a Partial DTensor): sum them. FSDP2
    does it when it shards the weights; without it, here, before the norm and the optimizer."""
    for p in params:
        g = p.grad
        if g is not None and isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(placements=p.placements)


def apply_activation_checkpointing(model, mode: str) -> None:
    """full: each decoder block recomputes its activations during the backward pass. selective
    (torchtitan's op-level selective AC): the block keeps what is costly to recompute, the outputs
    of its matrix products, attention and tensor-parallel collectives, and recomputes the rest
    (norms, rotary embeddings, the SwiGLU activation, residual sums)."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _keep_costly)} if mode == "selective" else {}
    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
    log.info("activation checkpointing (%s): %d decoder block(s) here", mode, len(model.layers))


def _costly_ops() -> set:
    ops = torch.ops.aten
    names = [(ops, "mm"), (ops, "bmm"), (ops, "addmm"), (ops, "_scaled_dot_product_flash_attention"),
             (ops, "_scaled_dot_product_efficient_attention"), (ops, "_scaled_dot_product_cudnn_attention"),
             (ops, "_scaled_dot_product_flash_attention_for_cpu"), (ops, "_grouped_mm"),
             (torch.ops._c10d_functional, "reduce_scatter_tensor"), (torch.ops._c10d_functional, "all_reduce"),
             (torch.ops._c10d_functional, "all_gather_into_tensor"),
             (torch.ops._c10d_functional, "all_to_all_single")]
    return {getattr(ns, name).default for ns, name in names if hasattr(ns, name)}


_COSTLY = _costly_ops()


def _keep_costly(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if op in _COSTLY else CheckpointPolicy.PREFER_RECOMPUTE


def apply_compile(model, enabled: bool) -> None:
    """torch.compile each decoder block's forward, after tensor parallel and activation
    checkpointing and before FSDP (torchtitan's order): FSDP's hooks, on the block itself, stay
    outside the compiled code, and no wrapper module renames the weights (`_orig_mod`), so
    checkpoints, LoRA and the Hugging Face export see the same names. A mixture-of-experts block
    routes a data-dependent number of tokens to each expert: compiled with graph breaks there."""
    if not enabled:
        return
    from .moe import moe_layers
    moe = set(moe_layers(model))
    for key, block in model.layers.items():
        block.forward = torch.compile(block.forward, fullgraph=key not in moe)
    log.info("torch.compile: %d decoder block(s) here, compiled at their first step", len(model.layers))


def apply_data_parallel(model, dp_mesh: DeviceMesh, reshard_after_forward: bool = True,
                        edp_mesh: DeviceMesh | None = None) -> None:
    """FSDP2 (ZeRO-3): each block is a unit, then the root (embeddings, norm, output). Nothing to
    shard over a single data-parallel rank: its hooks would only cost time. With expert
    parallelism (`edp_mesh` given) the experts of each MoE layer are their own unit over edp, or
    left out of FSDP when edp is 1 (each expert then lives on one rank of the group)."""
    if dp_mesh.size() == 1:
        return
    from .moe import expert_parameters, moe_layers
    ignored: set = set()
    if edp_mesh is not None:
        for m in moe_layers(model).values():
            if edp_mesh.size() > 1:
                fully_shard(m.experts, mesh=edp_mesh, reshard_after_forward=reshard_after_forward)
        if edp_mesh.size() == 1:
            ignored = set(expert_parameters(model))
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (one all-reduce; every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def clip_grad_norm_(params, max_norm: float, pp_group=None, expert_params=(), ep_group=None) -> float:
    """Gradient-norm clipping over the whole mesh. Parameters live on different meshes (2-D for
    tensor-parallel weights, data-parallel only for norms and embeddings): the norm is computed per
    mesh, made whole, then combined. Expert parameters (each ep rank holds different experts) are
    summed over the expert-parallel group."""
    expert_ids = {id(p) for p in expert_params}

    def squares(ps) -> float:
        by_mesh: dict = {}
        for p in ps:
            if p.grad is not None:
                key = getattr(p.grad, "device_mesh", None)
                by_mesh.setdefault(id(key) if key is not None else None, []).append(p.grad)
        sq = 0.0
        for grads in by_mesh.values():
            n = torch.nn.utils.get_total_norm(grads, foreach=False)
            if hasattr(n, "full_tensor"):
                n = n.full_tensor()
            sq += float(n) ** 2
        return sq

    params = list(params)
    replicate_partial_grads(params)
    sq = squares([p for p in params if id(p) not in expert_ids])
    if expert_ids:
        t = torch.tensor([squares([p for p in params if id(p) in expert_ids])], dtype=torch.float64)
        if ep_group is not None:
            torch.distributed.all_reduce(t, group=ep_group)
        sq += float(t)
    grads_all = [p.grad for p in params if p.grad is not None]
    if pp_group is not None:  # each pipeline rank holds only its stages' parameters
        t = torch.tensor([sq], dtype=torch.float64)
        torch.distributed.all_reduce(t, group=pp_group)
        sq = float(t)
    norm = sq ** 0.5
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads_all:
            g.mul_(coef)
    return norm
