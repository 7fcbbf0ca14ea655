"""Expert parallelism for MoE layers (the "ep" dimension of parallel.build_expert_mesh): each ep
rank keeps experts/ep of every MoE layer and exchanges tokens with the others by all-to-all
(moe.py). Expert parallelism borrows from data parallelism (dp = edp x ep): expert gradients
arrive summed over the ep ranks whose tokens they saw and averaged over edp by FSDP, so
`scale_expert_grads` divides them by ep, making them the mean over all dp ranks like a dense
parameter's.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh


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
