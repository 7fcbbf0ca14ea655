"""Elastic gangs: how many nodes an attempt runs on, and the spec it runs with (pure functions).

    resized(spec, 2)                      # the spec a 2-node attempt runs with (parallelism.data shrunk)
    shrink_to(spec, current=4, placed=3)  # after a start timeout: 2 (3 gives no whole layout), or None

Only the data-parallel degree changes with the node count; tensor and pipeline degrees, the model,
the global batch (gradient accumulation makes up for fewer data ranks) and the data order stay, so a
shrunk attempt resumes from the same checkpoint (resharded on load) and follows the same loss curve.
Limits: a shrink is decided only at a start timeout, from the pods the scheduler placed; growing back
happens at the next attempt, which tries every node again, or after elastic.regrowAfterSeconds of
running shrunk, which tries blindly (nothing here asks the scheduler whether the nodes are back).
"""

from __future__ import annotations

import datetime as dt

from . import api


def data_degree(spec: api.PretrainJobSpec, nodes: int) -> int | None:
    """parallelism.data on `nodes` nodes, None when tensor x pipeline does not divide the ranks."""
    per_replica = spec.parallelism.tensor * spec.parallelism.pipeline
    ranks = nodes * spec.nprocPerNode
    return ranks // per_replica if ranks % per_replica == 0 else None


def fits(spec: api.PretrainJobSpec, nodes: int) -> bool:
    """Whether the job can run on `nodes` nodes: the CRD's rules that involve the data degree (the
    batch, the expert degree, DualPipeV's microbatches) and the trainer's own (explicit pipeline
    microbatches dividing the per-rank batch), for the degree `nodes` gives."""
    p, d = spec.parallelism, data_degree(spec, nodes)
    if not 1 <= nodes <= spec.nodes or d is None:
        return False
    gbs, micro = spec.data.globalBatchSize, spec.data.microBatchSize
    if gbs % (d * micro) or d % p.expert:
        return False
    if p.pipeline > 1:
        n_micro = p.microbatches or gbs // (d * micro)
        if (gbs // d) % n_micro or (p.pipelineSchedule == "DualPipeV" and n_micro < 2 * p.pipeline):
            return False
    return True


def resized(spec: api.PretrainJobSpec, nodes: int) -> api.PretrainJobSpec:
    """The spec an attempt of `nodes` nodes runs with (its pods and the trainer's config); the spec
    itself for its own node count, or for one it cannot run on (a count recorded before the spec
    changed, while suspended). A shrunk one leaves `elastic` out: the trainer does not use it, and
    a minNodes raised since the shrink would make its config one the trainer refuses."""
    if nodes == spec.nodes or not fits(spec, nodes):
        return spec
    return spec.model_copy(update={"nodes": nodes, "elastic": None, "parallelism": spec.parallelism.model_copy(
        update={"data": data_degree(spec, nodes)})})


def shrink_to(spec: api.PretrainJobSpec, current: int, placed: int) -> int | None:
    """The node count of the next attempt after one of `current` nodes did not start, `placed` of
    its pods having been given a node: the largest count from elastic.minNodes up to the pods placed
    (minNodes when fewer were placed) that is below `current` and fits. None: no shrink (not elastic,
    every pod was placed so capacity is not what is missing, or no smaller count fits)."""
    if spec.elastic is None or placed >= current:
        return None
    low = spec.elastic.minNodes
    return next((n for n in range(min(max(placed, low), current - 1), low - 1, -1) if fits(spec, n)), None)


def regrow_due(spec: api.PretrainJobSpec, nodes: int, running_since: dt.datetime | None, now: dt.datetime,
               step: int) -> str:
    """Why an attempt of `nodes` nodes, Running since `running_since` and at `step`, is to be
    restarted on all of the spec's nodes now, or "": not shrunk, no elastic.regrowAfterSeconds, not
    run that long yet, or at its last step (it ends by itself)."""
    after = spec.elastic.regrowAfterSeconds if spec.elastic else None
    if nodes >= spec.nodes or after is None or running_since is None or step >= spec.training.steps:
        return ""
    ran = (now - running_since).total_seconds()
    if ran < after:
        return ""
    return (f"ran on {nodes} of {spec.nodes} node(s) for {int(ran)} s (elastic.regrowAfterSeconds {after}): "
            f"trying all {spec.nodes} again")
