"""Parallelism over one DeviceMesh ("dp", "tp"): tensor parallel with DTensor, then FSDP2 over
data parallel, applied per block and at the root, as torchtitan does.

The mesh is ("pp", "dp", "tp"); pipeline stages are built in pipeline.py.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def build_mesh(device: str, pp: int, dp: int, tp: int) -> DeviceMesh:
    return init_device_mesh(device, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def apply_tensor_parallel(model, tp_mesh: DeviceMesh) -> None:
    """Megatron-style: q/k/v and w1/w3 column-wise, wo and w2 row-wise (heads split over tp)."""
    if tp_mesh.size() == 1:
        return
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        })


def apply_activation_checkpointing(model, mode: str) -> None:
    """full: each decoder block recomputes its activations during the backward pass."""
    if mode != "full":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_data_parallel(model, dp_mesh: DeviceMesh, reshard_after_forward: bool = True) -> None:
    """FSDP2 (ZeRO-3): each block is a unit, then the root (embeddings, norm, output). Nothing to
    shard over a single data-parallel rank: its hooks would only cost time."""
    if dp_mesh.size() == 1:
        return
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)


def clip_grad_norm_(params, max_norm: float, pp_group=None) -> float:
    """Gradient-norm clipping over the whole mesh. Parameters live on different meshes (2-D for
    tensor-parallel weights, data-parallel only for norms and embeddings): the norm is computed per
    mesh, made whole, then combined."""
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            key = getattr(p.grad, "device_mesh", None)
            by_mesh.setdefault(id(key) if key is not None else None, []).append(p.grad)
    sq = 0.0
    for grads in by_mesh.values():
        n = torch.nn.utils.get_total_norm(grads, foreach=False)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        sq += float(n) ** 2
    if pp_group is not None:  # each pipeline rank holds only its stages' parameters
        t = torch.tensor([sq], dtype=torch.float64)
        torch.distributed.all_reduce(t, group=pp_group)
        sq = float(t)
    norm = sq ** 0.5
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for grads in by_mesh.values():
            for g in grads:
                g.mul_(coef)
    return norm
