"""Elastic gangs: how many nodes an attempt runs on, and the spec it runs with (pure functions).

    resized(spec, 2)                      # the spec a 2-node attempt runs with (parallelism.data shrunk)
    shrink_to(spec, current=4, placed=3)  # after a start timeout: 2 (3 gives no whole layout), or None

Only the data-parallel degree changes with the node count; tensor and pipeline degrees, the model,
the global batch (gradient accumulation makes up for fewer data ranks) and the data order stay, so a
shrunk attempt resumes from the same checkpoint (resharded on load) and follows the same loss curve.
Limits: a shrink is decided only at a start timeout, from the pods the scheduler placed; growing back
happens at the next attempt, which tries every node again, or after elastic.regrowAfterSeconds of
running shrunk, once capacity probes (render.probe: placeholder pods shaped like the gang's) are all
placed: the scheduler's word that the missing nodes are back, and pending, an autoscaler's cue to
bring them. The probes only show room at one moment: the whole gang may still miss it (another
job's pods, taken in between), and then shrinks again at its start timeout.
"""

from __future__ import annotations

import datetime as dt

from . import api


def data_degree(spec: api.PretrainJobSpec, nodes: int) -> int | None:
    """parallelism.data on `nodes` nodes, None when tensor x pipeline does not divide the ranks."""
    per_replica = spec.parallelism.tensor * spec.parallelism.pipeline
    ranks = nodes * spec.nprocPerNode
    return ranks // per_replica if ranks % per_replica == 0 else None


def microbatches(spec: api.PretrainJobSpec, nodes: int) -> int | None:
    """Pipeline microbatches per step on `nodes` nodes: derived from the per-rank batch as the
    trainer does (parallelism.microbatches 0), or the spec's scaled with the per-rank batch, so
    that each microbatch keeps its samples (and its activations' memory). None: no whole count."""
    p, d, gbs = spec.parallelism, data_degree(spec, nodes), spec.data.globalBatchSize
    if d is None or gbs % d:
        return None
    if not p.microbatches:
        return gbs // d // spec.data.microBatchSize
    per_micro, left = divmod(gbs // p.data, p.microbatches)  # samples per microbatch, as declared
    if left or not per_micro or (gbs // d) % per_micro:
        return None
    return gbs // d // per_micro


def fits(spec: api.PretrainJobSpec, nodes: int) -> bool:
    """Whether the job can run on `nodes` nodes: the CRD's rules that involve the data degree (the
    batch, the expert degree, DualPipeV's microbatches), the trainer's (microbatches dividing the
    per-rank batch) and torch's pipeline schedules' rules on the microbatch count (1F1B: at least
    one per stage; the interleaved ones: a whole number of rounds), for the degree `nodes` gives."""
    p, d = spec.parallelism, data_degree(spec, nodes)
    if not 1 <= nodes <= spec.nodes or d is None:
        return False
    if spec.data.globalBatchSize % (d * spec.data.microBatchSize) or d % p.expert:
        return False
    if p.pipeline > 1:
        n = microbatches(spec, nodes)
        rounds = max(1, (n or 0) // p.pipeline)
        if (n is None or (p.pipelineSchedule == "1F1B" and n < p.pipeline)
                or (p.pipelineSchedule in ("Interleaved1F1B", "InterleavedZeroBubble") and n % rounds)
                or (p.pipelineSchedule == "DualPipeV" and n < 2 * p.pipeline)):
            return False
    return True


def resized(spec: api.PretrainJobSpec, nodes: int) -> api.PretrainJobSpec:
    """The spec an attempt of `nodes` nodes runs with (its pods and the trainer's config); the spec
    itself for its own node count, or for one it cannot run on (a count recorded before the spec
    changed, while suspended)."""
    if nodes == spec.nodes or not fits(spec, nodes):
        return spec
    p = spec.parallelism
    return spec.model_copy(update={"nodes": nodes, "parallelism": p.model_copy(update={
        "data": data_degree(spec, nodes), "microbatches": microbatches(spec, nodes) if p.microbatches else 0})})


def shrink_to(spec: api.PretrainJobSpec, current: int, placed: int) -> int | None:
    """The node count of the next attempt after one of `current` nodes did not start, `placed` of
    its pods having been given a node: the largest count from elastic.minNodes up to the pods placed
    (minNodes when fewer were placed) that is below `current` and fits; `current` again when none
    does and it is a shrunk count already (the spec's whole count would not be placed either).
    None: the spec's count (not elastic; every pod was placed, so capacity is not what is missing;
    no smaller count fits)."""
    if spec.elastic is None or placed >= current:
        return None
    low = spec.elastic.minNodes
    smaller = next((n for n in range(min(max(placed, low), current - 1), low - 1, -1) if fits(spec, n)), None)
    if smaller is None and low <= current < spec.nodes and fits(spec, current):
        return current
    return smaller


def regrow_due(spec: api.PretrainJobSpec, nodes: int, running_since: dt.datetime | None, now: dt.datetime,
               step: int) -> tuple[str, bool]:
    """Why an attempt of `nodes` nodes, Running since `running_since` and at `step`, is to try all of
    the spec's nodes again, or "": not shrunk, no elastic.regrowAfterSeconds, not run that long yet,
    or at its last step (it ends by itself); and whether at once, without asking the scheduler for
    room first (capacity probes): when the spec no longer allows that count (elastic removed, or
    minNodes raised above it, while it ran)."""
    if nodes >= spec.nodes or running_since is None or step >= spec.training.steps:
        return "", False
    if not allows(spec, nodes):
        return (f"running on {nodes} of {spec.nodes} node(s), which spec.elastic no longer allows"
                + (f" (minNodes {spec.elastic.minNodes})" if spec.elastic else " (removed)")), True
    after = spec.elastic.regrowAfterSeconds
    if after is None or (now - running_since).total_seconds() < after:
        return "", False
    return f"ran on {nodes} of {spec.nodes} node(s) for more than elastic.regrowAfterSeconds ({after} s)", False


def allows(spec: api.PretrainJobSpec, nodes: int) -> bool:
    """Whether the spec lets an attempt run on `nodes` nodes (its own count, or an elastic one from minNodes)."""
    return nodes == spec.nodes or (spec.elastic is not None and spec.elastic.minNodes <= nodes < spec.nodes)
