"""Data parallelism (the "dp" dimension): FSDP2 `fully_shard` (ZeRO-3), applied last, per block
and at the root, as torchtitan does; with expert parallelism the experts are sharded over "edp",
the ranks that hold the same experts.
"""

from __future__ import annotations

import logging

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

log = logging.getLogger("pretrain_trainer.data_parallel")


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
    log.info("FSDP2 over %d data-parallel rank(s): %d decoder block(s) here, parameters %s", dp_mesh.size(),
             len(model.layers), "resharded after forward" if reshard_after_forward else
             "kept gathered from forward to backward (parallelism.reshardAfterForward false)")
