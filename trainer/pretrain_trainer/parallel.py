"""The DeviceMesh ("pp", "dp", "tp") and what spans its dimensions: building it (and the expert
mesh), activation checkpointing, torch.compile, the all-reduced stop flag and gradient clipping
over the whole mesh. Each dimension is applied by its own module, in this order (torchtitan's):
expert_parallel.py, tensor_parallel.py, then activation checkpointing and compile (here), then
data_parallel.py (FSDP2); pipeline stages are built in pipeline.py.

Expert parallelism borrows from data parallelism (dp = edp x ep, as torchtitan's dp_shard = ep x
rest): a second mesh ("pp", "edp", "ep", "tp") over the same ranks splits each data-parallel group
into groups of `ep` consecutive ranks.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger("pretrain_trainer.parallel")


def build_mesh(device: str, pp: int, dp: int, tp: int) -> DeviceMesh:
    return init_device_mesh(device, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def build_expert_mesh(device: str, pp: int, dp: int, tp: int, ep: int) -> DeviceMesh:
    """The same ranks as build_mesh's, with dp split into (edp, ep), ep the faster-varying."""
    return init_device_mesh(device, (pp, dp // ep, ep, tp), mesh_dim_names=("pp", "edp", "ep", "tp"))


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
        # A block that draws random numbers (LoRA's dropout) must draw the same ones when it is
        # recomputed, or its gradients are not those of its forward pass: the RNG state is kept
        # for those only (a copy of the generator's state per block and step).
        random = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in block.modules())
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=random, **kwargs)
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

    from .tensor_parallel import replicate_partial_grads
    params = list(params)
    replicate_partial_grads(params)  # the sequence-parallel weights' gradients, made whole
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
