"""Tensor parallelism (the "tp" dimension): DTensor, Megatron-style with sequence parallel, as
torchtitan's apply_tp. Applied first, before activation checkpointing, compile and FSDP2.
"""

from __future__ import annotations

import logging

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               PrepareModuleOutput, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

log = logging.getLogger("pretrain_trainer.tensor_parallel")


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
