"""The training loop.

    torchrun --nproc_per_node 2 -m pretrain_trainer train --config job.yaml
    python -m pretrain_trainer train --config job.yaml          # one process

`--config` takes a PretrainJobSpec (the operator's rendered config) or a whole PretrainJob
manifest. CPU runs use gloo, GPU runs NCCL (bf16 autocast when training.precision is bf16; fp32
master weights and reductions). Each step: microbatches with gradient accumulation (derived from
globalBatchSize, microBatchSize and the data-parallel degree), clipping over the whole mesh,
AdamW with linear warm-up and cosine decay. Preemption: SIGTERM sets a flag that is all-reduced
every step, so every rank stops at the same step, saves, and exits 83. A checkpoint request in the
pod's annotations file saves at the next step without stopping.

MoE (`model.moe`, moe.py) with expert parallelism (`parallelism.expert`, borrowed from data
parallelism; expert_parallel.py) and LoRA (`lora`, lora.py) run under the same loop; weights can start
from a trainer checkpoint or a Hugging Face folder (`model.initFrom`, `lora.baseCheckpoint`; hf.py).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from pretrain_operator import api, cel, contract as c

from . import moe as moe_mod
from . import data_parallel, expert_parallel, parallel, pipeline, tensor_parallel
from . import lora, profiling, report, validation
from .checkpoint import (Checkpointer, NoneVerifies, OtherModel, agreed_weights_source, committed_steps, load_weights, pinned_base,
                         shapes_of)
from .data import Blend, DataError, Loader, TokenSource, synthetic_size
from .fence import Fence, InUse
from .metrics import GRACE, Metrics, peak_memory_bytes
from .model import ModelArgs, Transformer, flops_per_token, init_weights

log = logging.getLogger("pretrain_trainer")


class ConfigError(SystemExit):
    def __init__(self, msg: str):
        print(f"pretrain_trainer: {msg}", file=sys.stderr)
        super().__init__(c.EXIT_PERMANENT)
        self.msg = msg


def load_spec(path: str) -> api.PretrainJobSpec:
    """The job's spec from --config: a spec alone, or a manifest as `kubectl apply` takes it (a
    PretrainJob, possibly among other documents such as its PersistentVolumeClaim)."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e}")
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}")
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == api.KIND]
    if len(jobs) > 1:
        names = ", ".join(str((j.get("metadata") or {}).get("name", "?")) for j in jobs)
        raise ConfigError(f"--config {path} holds {len(jobs)} {api.KIND}s ({names}): give a file with one")
    if jobs:
        doc = jobs[0].get("spec") or {}
    elif len(docs) > 1:
        kinds = ", ".join(str(d.get("kind", "?")) if isinstance(d, dict) else type(d).__name__ for d in docs)
        raise ConfigError(f"--config {path} holds {len(docs)} documents ({kinds}) and no {api.KIND}")
    else:
        doc = docs[0] if docs else {}
    try:
        spec = api.PretrainJobSpec.model_validate(doc)
    except Exception as e:  # noqa: BLE001  (pydantic's message names the field)
        raise ConfigError(f"invalid config {path}: {e}")
    broken = cel.violations(spec)  # the rules across fields, as the API server would check them
    if broken:
        raise ConfigError(f"invalid config {path}: " + "; ".join(broken))
    return spec


def open_data(spec: api.PretrainJobSpec, vocab_size: int) -> Blend:
    """The training data (data.path, data.sources, or the synthetic corpus); data that cannot be
    used is a permanent error (exit 85), not a crash to retry."""
    folders = spec.data.folders() or [("the synthetic corpus (data.path empty)", "", 1.0)]
    size = synthetic_size(spec.data.seqLen, spec.data.globalBatchSize, validation.windows(spec))
    try:
        return Blend([TokenSource(path, vocab_size, spec.training.seed, synthetic_tokens=size, field=name) for name, path, _ in folders],
                     [w for _, _, w in folders], spec.data.seqLen, [name for name, _, _ in folders])
    except DataError as e:
        raise ConfigError(str(e)) from e


def check_layout(spec: api.PretrainJobSpec, world: int) -> None:
    """What only the run itself can check: the world torchrun gave it. The rules across fields
    (layers over pipeline stages, expert degree, batch sizes...) are the CRD's, checked by
    `load_spec` as the API server does."""
    p = spec.parallelism
    if p.data * p.tensor * p.pipeline != world:
        raise ConfigError(f"parallelism.data x tensor x pipeline = {p.data * p.tensor * p.pipeline} but the world has "
                          f"{world} ranks (nodes x nprocPerNode under torchrun)")


def lr_at(step: int, o: api.Optimizer, total: int) -> float:
    """Linear warm-up to lr, then (with decayFraction) lr held until the decay's start, then a decay
    of decayType to minLr at the last step."""
    if o.warmupSteps and step <= o.warmupSteps:
        return o.lr * step / o.warmupSteps
    start = o.warmupSteps if o.decayFraction is None else max(total - round(o.decayFraction * total), o.warmupSteps)
    frac = min(max(step - start, 0) / max(total - start, 1), 1.0)
    if o.decayType == "cosine":
        return o.minLr + 0.5 * (o.lr - o.minLr) * (1 + math.cos(math.pi * frac))
    return o.lr - (o.lr - o.minLr) * (frac if o.decayType == "linear" else math.sqrt(frac))


class Stop:
    """SIGTERM (a deletion, an eviction, torchrun forwarding one) asks every rank to stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, *_):
        self.requested = True


def claim_folder(ckpt: Checkpointer, rank: int, world: int) -> str | None:
    """Rank 0 claims the checkpoint folder for this attempt (fence.py); every rank gets the verdict:
    why this attempt is stale, or None. A live trainer of another job holding the folder is a
    ConfigError (exit 85): two jobs on one folder would fence each other off for ever."""
    verdict = [None, None]  # (stale, in use)
    if rank == 0:
        try:
            verdict[0] = ckpt.fence.claim()
        except InUse as e:
            verdict[1] = str(e)
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[1]:
        raise ConfigError(verdict[1])
    return verdict[0]


def checkpoint_request(podinfo: str) -> str | None:
    try:
        for line in (Path(podinfo) / "annotations").read_text().splitlines():
            if line.startswith(c.ANN_CHECKPOINT_REQUEST + "="):
                return line.split("=", 1)[1]
    except OSError:
        pass
    return None


def setup_distributed() -> tuple[int, int, int, str]:
    if "RANK" not in os.environ:  # one process, no torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=dt.timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size(), local, "cuda" if cuda else "cpu"


def init_sharded(part: torch.nn.Module, names: dict, seed: int, layers: int) -> None:
    """A part built on the meta device, sharded, then `to_empty`: every parameter gets the value
    init_weights / lora.apply_lora give it on the whole model, each generated whole on the CPU
    from its (seed, name) generator, one at a time, and this rank's piece of it copied in (no
    communication: every rank generates the same tensor); the buffers recomputed. `names` maps
    each module to its name before any wrapper (LoRA's `.base`, the checkpoint wrapper): the name
    that seeds its parameters. Host memory: the largest single tensor (twice, while scaled), not
    the model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from .model import param_init
    with torch.no_grad():
        for mod in part.modules():
            for pname, param in mod.named_parameters(recurse=False):
                if mod not in names:
                    raise RuntimeError(f"no initial name for {type(mod).__name__}.{pname}: a module made after the build's "
                                       f"naming pass")
                fqn = f"{names[mod]}.{pname}" if names[mod] else pname
                shape = tuple(param.shape)
                full = lora.adapter_init(fqn, shape, seed)
                if full is None:
                    full = param_init(fqn, shape, seed, layers)
                if isinstance(param, DTensor):
                    param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements,
                                                             src_data_rank=None).to_local())
                else:
                    param.copy_(full)
                del full
            if hasattr(mod, "init_buffers"):
                mod.init_buffers()


def adamw_impl(params: list[torch.Tensor], device: str) -> dict:
    """AdamW's implementation. CPU: the per-parameter loop (bit-for-bit the reference runs of the
    tests); GPU: the fused kernel, where every parameter is a DTensor of one mesh or none is. One
    fused call over a mix (tensor parallel leaves the embedding and output plain at data 1, FSDP
    over data = expert leaves the experts plain, LoRA's adapters under tensor parallel) failed the
    first step ("got mixed torch.Tensor and DTensor"): such a run takes the per-parameter loop."""
    if device != "cuda":
        return {"foreach": False}
    from torch.distributed.tensor import DTensor
    meshes = {p.device_mesh if isinstance(p, DTensor) else None for p in params}
    if len(meshes) <= 1:
        return {"fused": True}
    log.info("AdamW: its parameters mix plain tensors and DTensors (or meshes): the per-parameter loop, not the fused kernel")
    return {"foreach": False}


def lora_base_spec(spec: api.PretrainJobSpec) -> str | None:
    """Where a LoRA run's frozen base comes from, as the spec says (lora.baseCheckpoint, else
    model.initFrom), or None: not LoRA, or on the seed's random init."""
    return (spec.lora.baseCheckpoint or spec.model.initFrom or None) if spec.lora else None


def build(spec: api.PretrainJobSpec, device: str, world: int, pinned: str | None = None, resuming: bool = False):
    """The model on this rank (the whole model, or its pipeline stages), sharded; the optimizer;
    the mesh; and the pipeline schedule (None without pipeline parallelism).

    Without initial weights to load, as torchtitan: the parts are made on the meta device (no
    memory), every parallelism applied to them, then `to_empty` allocates this rank's shards only
    and `init_sharded` fills them with the values the whole model's init gives (the same in every
    layout, bit for bit). With `model.initFrom` / `lora.baseCheckpoint` each rank still makes its
    parts whole on the CPU, initialises and loads them (load_weights reads into an unsharded
    model), then shards them: that start needs the whole model (or stage) in host memory. `pinned`:
    the LoRA base the run's checkpoints were trained on (checkpoint.pinned_base), instead of
    resolving lora.baseCheckpoint again; the model's `lora_base` says which was loaded, for them.
    `resuming`: the run has checkpoints of its own, which hold every weight: model.initFrom is not
    read (a LoRA base is: the checkpoints hold only the adapters)."""
    p = spec.parallelism
    args = ModelArgs.from_spec(spec.model)
    torch.manual_seed(spec.training.seed)
    mesh = parallel.build_mesh(device, p.pipeline, p.data, p.tensor)
    emesh = parallel.build_expert_mesh(device, p.pipeline, p.data, p.tensor, p.expert) if p.expert > 1 else None
    field, initial = (("lora.baseCheckpoint", spec.lora.baseCheckpoint) if spec.lora and spec.lora.baseCheckpoint
                      else ("model.initFrom", spec.model.initFrom))
    if initial and resuming and not spec.lora:
        log.info("model.initFrom %s not read: the run resumes from its own checkpoints", initial)
        initial = ""
    meta = not initial
    if pinned:
        log.info("LoRA base %s: the one the checkpoints' adapters were trained on (%s %s)", pinned, field, initial)
        field, initial = f"{field} {initial}, as its checkpoints were trained on", pinned
    if initial:  # one source for every rank, checked once
        try:
            initial = agreed_weights_source(initial)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the initial weights ({field}) from {initial}: {e}")
    with torch.device("meta" if meta else "cpu"):
        if p.pipeline > 1:
            ids, parts = pipeline.build_parts(args, mesh["pp"].get_local_rank(), p.pipeline, p.pipelineSchedule)
        else:
            ids, parts = [0], [Transformer(args)]
    whole = None
    if initial and p.pipeline > 1:  # a stage's part: a checkpoint must hold the whole model (no memory taken)
        with torch.device("meta"):
            whole = shapes_of(Transformer(args).state_dict())
    adapted = 0  # LoRA-wrapped layers on this rank (a pipeline stage may have none)
    for part in parts:
        names = {m: n for n, m in part.named_modules()}  # before any wrapper: the names that seed the init
        if not meta:
            init_weights(part, spec.training.seed)  # per-name seeds: the same weights as the whole model
        if initial:
            try:
                src = load_weights(part, initial, whole, verified=True)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise ConfigError(f"cannot load the initial weights ({field}) from {initial}: {e}")
            log.info("initial weights from %s", src)
        if spec.lora:
            adapted += lora.apply_lora(part, spec.lora, spec.training.seed)
            names.update({m: n for n, m in part.named_modules() if m not in names})  # the adapters
        if not meta:
            part.to(device)
        if emesh is not None:
            expert_parallel.apply_expert_parallel(part, emesh["ep"])
        tensor_parallel.apply_tensor_parallel(part, mesh["tp"])
        parallel.apply_activation_checkpointing(part, spec.training.activationCheckpointing)
        parallel.apply_compile(part, spec.training.compile)
        data_parallel.apply_data_parallel(part, mesh["dp"], p.reshardAfterForward, emesh["edp"] if emesh is not None else None)
        if meta:
            part.to_empty(device=device)
            init_sharded(part, names, spec.training.seed, args.layers)
    model = parts[0] if p.pipeline == 1 else pipeline.Parts(parts)
    model.expert_mesh = emesh
    model.lora_base = {"spec": lora_base_spec(spec), "source": initial} if lora_base_spec(spec) else None
    if spec.lora:
        total = torch.tensor([adapted])
        dist.all_reduce(total)
        if not total.item():  # every weight frozen: nothing would train
            raise ConfigError(f"lora.targetModules {spec.lora.targetModules} match no linear layer of the model: its names are "
                              "wq wk wv wo (attention) and w1 w2 w3 (MLP), or paths such as layers.0.attention.wq")
    trainable = [q for q in model.parameters() if q.requires_grad]
    o = spec.optimizer
    impl = adamw_impl(trainable, device)
    # One group, empty on a pipeline stage that LoRA leaves frozen (a path pattern of another
    # stage's layer): a bare empty list is refused by the optimizer.
    optim = torch.optim.AdamW([{"params": trainable}], lr=o.lr, weight_decay=o.weightDecay, betas=(0.9, 0.95), **impl)
    schedule = None
    if p.pipeline > 1:
        per_rank = spec.data.globalBatchSize // p.data
        n_micro = pipeline.microbatch_count(spec)
        if per_rank % n_micro:
            raise ConfigError(f"parallelism.microbatches ({n_micro}) must divide the per-rank batch ({per_rank})")
        try:
            schedule, _ = pipeline.build_schedule(parts, ids, p.pipeline, p.pipelineSchedule, n_micro, device,
                                                  mesh["pp"].get_group())
        except ValueError as e:  # a schedule's own rule on the layout (DualPipeV: microbatches >= stages)
            raise ConfigError(f"parallelism.pipelineSchedule {p.pipelineSchedule} with {n_micro} microbatches "
                              f"(parallelism.microbatches, else the per-rank batch / data.microBatchSize): {e}") from e
    return args, model, optim, mesh, schedule


def model_settings(spec: api.PretrainJobSpec) -> dict:
    """The model's settings as a checkpoint records them: its sizes (the preset's, overridden) and
    its MoE's. A resume compares them (`changed_settings`): names and shapes are checked by the load,
    but a rotary base, a router's scoring or its balancing loads into the same tensors unsaid."""
    moe = spec.model.moe.model_dump(mode="json") if spec.model.moe else {}
    return {**spec.model.resolved(), **{f"moe.{k}": v for k, v in moe.items()}}


def changed_settings(saved: dict | None, now: dict) -> list[str]:
    """`model.KEY old -> new` for each setting that differs (none for a checkpoint from before they
    were recorded)."""
    if saved is None:
        return []
    return [f"model.{k} {saved.get(k)} -> {now.get(k)}" for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]


def check_frozen_base(model, digest: str) -> None:
    """LoRA: every rank's pieces of the frozen base are byte-for-byte what they were at the start."""
    changed = torch.tensor([0 if lora.frozen_digest(model) == digest else 1])
    dist.all_reduce(changed)
    if int(changed):
        log.error("LoRA: the frozen base weights changed on %d rank(s)", int(changed))
    else:
        log.info("LoRA: frozen base weights bit-identical after training on every rank (%d adapted layers here)",
                 len(lora.lora_layers(model)))


def skip_step(step: int, grad_norm: float, in_row: int, allowed: int, ckpt: Checkpointer) -> None:
    """A step whose gradients are not finite updates nothing (its NaN would reach every weight, then
    every checkpoint kept); too many in a row stop the run for good: resuming would replay them."""
    if in_row <= allowed:
        log.warning("step %d: the gradient norm is %s: optimizer step skipped, the weights kept (%d in a row; "
                    "training.maxSkippedSteps %d)", step, grad_norm, in_row, allowed)
        return
    ckpt.close()  # an async save of an earlier step still commits
    raise ConfigError(f"step {step}: the gradients were not finite (norm {grad_norm}) for {in_row} steps in a row, more than "
                      f"training.maxSkippedSteps ({allowed}); the weights are those of step {step - in_row} (last checkpoint: "
                      f"step {ckpt.last_step}). Lower optimizer.lr, or check the data and the initial weights")


def log_nothing_to_train(step: int, steps: int) -> None:
    """A resume whose checkpoint is at or past training.steps (the run had finished, or the
    config lowered training.steps since) trains nothing: said, instead of a silent exit 0. The
    final report stays the checkpoint's: its step, loss, tokens and validation."""
    log.info("checkpoint step %d is at or past training.steps %d: nothing to train%s", step, steps,
             "" if step == steps else " (training.steps was lowered since it was saved; raise it to train on)")


def mesh_group(mesh, dim: str):
    """The process group of a mesh dimension, or None when it has one rank (or there is no mesh)."""
    if mesh is None or mesh[dim].size() == 1:
        return None
    return mesh[dim].get_group()


def step_pipeline(schedule, micro, device) -> torch.Tensor:
    """One pipelined step over this rank's whole batch; the loss (mean over microbatches) as known
    on the last stage, 0 elsewhere (the caller sums over the pipeline group)."""
    losses = pipeline.run(schedule, torch.cat([m[0] for m in micro]).to(device), torch.cat([m[1] for m in micro]).to(device))
    return losses.mean() if losses is not None else torch.zeros((), dtype=torch.float64)


def train(config: str, checkpoint_dir: str | None = None, podinfo: str | None = None, losses_out: str | None = None) -> int:
    spec = load_spec(config)
    rank, world, local, device = setup_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s")
    check_layout(spec, world)
    ckpt_root = checkpoint_dir or os.environ.get(c.ENV_CHECKPOINT_DIR) or spec.checkpoint.path
    # Rank 0's reading, for all: the LoRA base the checkpoints were trained on, and whether the run
    # has checkpoints of its own (model.initFrom is then not read: the load replaces every weight,
    # and a source gone since, or failing verification now, exited 85 on a run that could resume).
    known = [pinned_base(Path(ckpt_root), lora_base_spec(spec)) if lora_base_spec(spec) else None,
             bool(committed_steps(Path(ckpt_root)))] if rank == 0 else [None, None]
    if world > 1:
        dist.broadcast_object_list(known, src=0)
    args, model, optim, mesh, schedule = build(spec, device, world, known[0], resuming=known[1])
    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    source = open_data(spec, args.vocabSize)
    validator = None
    try:  # data that cannot serve this run: no retry will change it
        loader = Loader(source, spec.data.seqLen, spec.data.globalBatchSize, spec.data.microBatchSize, dp_rank, dp_size,
                        spec.training.seed)
        if spec.validation:
            validator = validation.Validator(spec, source, dp_rank, dp_size, device)
    except DataError as e:
        raise ConfigError(str(e)) from e
    ckpt = Checkpointer(ckpt_root, spec.checkpoint.keep, rank, world, spec.checkpoint.asyncSave, Fence.from_env(Path(ckpt_root)))
    problem = ckpt.storage_problem()
    if problem:
        raise ConfigError(problem)
    # The folder is this attempt's from now on (fence.py), claimed before the load so that a stale
    # attempt commits nothing this one could miss. A stale attempt itself stops here, and not as a
    # failure: the operator replaced its pods, and should it see this exit, restarts the gang.
    stale = claim_folder(ckpt, rank, world)
    if stale:
        log.warning("%s: stopping before training; exiting %d", stale, c.EXIT_PREEMPTED)
        return c.EXIT_PREEMPTED
    # A checkpoint that verifies but does not load raises checkpoint.LoadFailed, a crash: the next
    # attempt loads it again (the model and optimizer may hold part of it: no training on them).
    try:
        extra = ckpt.load(model, optim)
    except (OtherModel, NoneVerifies) as e:  # resuming would train another model, or start over beside its checkpoints
        raise ConfigError(str(e)) from e
    base_digest = lora.frozen_digest(model) if spec.lora else None
    settings = model_settings(spec)  # recorded with each save, compared on a resume
    step = 0
    tokens_seen = 0
    loss_v = None
    validated = None  # (step, held-out loss) of the last validation
    skipped, skipped_in_row = 0, 0
    if extra:
        step, tokens_seen = extra["step"], extra["tokensSeen"]
        # What the final report and the metrics show until this attempt's first step: its step's
        # (a resume at the last step trains none). Checkpoints from before these were saved lack them.
        loss_v = extra.get("loss")
        validated = tuple(extra["validated"]) if extra.get("validated") else None
        # The skipped steps (non-finite gradients) so far and in a row: maxSkippedSteps counts across
        # a resume as in one run (a preemption in the middle of a run of them reset it).
        skipped, skipped_in_row = extra.get("skipped", 0), extra.get("skippedInRow", 0)
        changed = changed_settings(extra.get("model"), settings)
        if changed and rank == 0:  # deliberate (a longer context's rotary base) or not: said, and trained on
            log.warning("the model's settings changed since the checkpoint of step %d: %s; training goes on with the new ones",
                        step, "; ".join(changed))
        try:
            loader.load_state_dict(extra["data"])
        except DataError as e:  # a checkpoint of other data: resuming it would train on a mix
            raise ConfigError(str(e)) from e
    if step < spec.training.steps - 1:  # a step before the last may save (on a request too): async
        ckpt.start_writer()
    podinfo = podinfo or os.environ.get(c.ENV_PODINFO, c.PODINFO_DIR)
    metrics = Metrics()
    metrics.set(**{c.METRIC_TOTAL_STEPS: spec.training.steps, c.METRIC_STEP: step,
                   c.METRIC_LAST_CHECKPOINT_STEP: ckpt.last_step, c.METRIC_LAST_CHECKPOINT_TIME: ckpt.last_time})
    # Under the operator the pod's grace period bounds a SIGTERM's save: served beside the save time.
    grace = spec.template.terminationGracePeriodSeconds if ckpt.fence.owner else None
    if grace is not None:
        metrics.set(**{GRACE: grace})
    grace_unsaid = grace is not None  # a save outlasting it is logged once
    if loss_v is not None:
        metrics.set(**{c.METRIC_LOSS: loss_v})
    if validated:
        metrics.set(**{c.METRIC_VALIDATION_LOSS: validated[1], c.METRIC_VALIDATION_STEP: validated[0]})
    if local == 0 and os.environ.get(c.ENV_METRICS_PORT, str(c.METRICS_PORT)) != "0":
        try:
            metrics.serve(int(os.environ.get(c.ENV_METRICS_PORT, c.METRICS_PORT)))
        except OSError as e:
            log.warning("metrics not served: %s", e)
    # From here on a SIGTERM is answered (exit 83), before the first step too (`parallel.any_rank` below). Until
    # here (the build, the process group's rendezvous, the checkpoint's load) it keeps its default
    # action, the process ends at once: nothing new to save, and a rank blocked on a lost peer
    # must not hold its pod for the whole grace period.
    stop = Stop()
    # A request already there at the start is this attempt's too (the operator annotates the live
    # pods of the current attempt only, and pods are new each attempt): a termination notice that
    # came while the checkpoint loaded is served after the first step, not ignored all attempt.
    seen_requests: set[str | None] = {None}
    served = 0
    fpt = flops_per_token(args, spec.data.seqLen, lora.adapter_params(args, spec.lora) if spec.lora else None)
    peak = float(os.environ.get("PRETRAIN_PEAK_FLOPS", "989e12" if device == "cuda" else "1e11"))
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=spec.training.precision == "bf16" and device == "cuda")
    losses = open(losses_out, "a") if losses_out and rank == 0 else None
    if step >= spec.training.steps:
        log_nothing_to_train(step, spec.training.steps)
    else:
        log.info("training %s on %d rank(s): pipeline %d (%s) x data %d x tensor %d; steps %d..%d, %d microbatch(es) per step; "
                 "%d CPU thread(s) per rank", spec.model.preset, world, spec.parallelism.pipeline, spec.parallelism.pipelineSchedule,
                 dp_size, spec.parallelism.tensor, step + 1, spec.training.steps, loader.accum, torch.get_num_threads())
    profiler = profiling.Profiler(spec, ckpt_root, rank, step)
    t_log = time.monotonic()
    tokens_at_log = tokens_seen
    moe = spec.model.moe
    ep_group = mesh_group(model.expert_mesh, "ep")
    experts = moe_mod.expert_parameters(model)
    # Microbatches are backpropagated one by one (loss / n) without a pipeline; a pipeline schedule
    # scales the gradients by 1/n itself.
    moe_mod.MoE.aux_grad_scale = 1.0 if schedule is not None else 1.0 / loader.accum
    # What start-up made (torch's modules, the model, the loader) lives for the whole run: out of the
    # collector's sight, a full collection scans only what training allocates. Without this, the
    # first full one (run inside the first checkpoint save, which pauses the collector) took 0.4 s.
    gc.collect()
    gc.freeze()
    grad_norm = 0.0

    def validate(at: int) -> tuple[int, float] | None:
        """Step `at`'s validation: (at, held-out loss), or None when a SIGTERM ended it."""
        held_out = validator.loss(model, schedule, mesh, autocast, lambda: stop.requested)
        if held_out is None:
            log.warning("stop requested (SIGTERM) during the validation of step %d: validation dropped", at)
            return None
        metrics.set(**{c.METRIC_VALIDATION_LOSS: held_out, c.METRIC_VALIDATION_STEP: at})
        log.info("step %d validation loss %.6f over %d held-out windows", at, held_out, validator.n)
        return at, held_out

    def finish(code: int) -> int:
        profiler.close()
        ckpt.close()
        if rank == 0:
            report.progress(step, spec.training.steps, loss_v, tokens_seen, ckpt.last_step, validated)
        return code  # the command line leaves the process group (__main__.leave_process_group)

    def unvalidated(at: int) -> bool:
        """Step `at` is due for validation and has none (every rank agrees: validation's stop is agreed)."""
        return validator is not None and validator.due(at, at == spec.training.steps) and (validated or (0,))[0] != at

    def finished(at: int) -> bool:
        """Step `at` is the last, checkpointed, nothing of it left to do: a SIGTERM now stops nothing
        (exit 83 spent a preemption and a whole gang on an attempt with nothing to train)."""
        return at >= spec.training.steps and not unvalidated(at)

    # A checkpoint of a step due for validation whose validation did not happen (a SIGTERM ended
    # it, or came with that step): it runs now, on the same weights, so no held-out loss is lost,
    # the last step's included (the final report's). It draws no random number: training is unchanged.
    if step and unvalidated(step):
        validated = validate(step) or validated
    # One collective before the first step: a SIGTERM since `Stop()` (on any rank; that validation
    # included) stops every rank here. Nothing new to save: the latest checkpoint stays the one to resume.
    if parallel.any_rank(stop.requested) and not finished(step):
        log.warning("stop requested (SIGTERM) before step %d: no step trained, checkpoint of step %d kept; exiting %d",
                    step + 1, ckpt.last_step, c.EXIT_PREEMPTED)
        return finish(c.EXIT_PREEMPTED)
    while step < spec.training.steps:
        step += 1
        lr = lr_at(step, spec.optimizer, spec.training.steps)
        for g in optim.param_groups:
            g["lr"] = lr
        total = torch.zeros((), dtype=torch.float64, device=device)
        micro = loader.next_batch()
        if schedule is not None:
            with autocast:
                total = step_pipeline(schedule, micro, device)
            dist.all_reduce(total, group=mesh["pp"].get_group())
        else:
            for x, y in micro:
                x, y = x.to(device), y.to(device)
                with autocast:
                    logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                (loss / len(micro)).backward()
                total += loss.detach().double() / len(micro)  # on the device: no sync per microbatch
            total = total.cpu()
        expert_parallel.scale_expert_grads(model, spec.parallelism.expert)
        grad_norm = parallel.clip_grad_norm_(list(model.parameters()), spec.optimizer.gradClip,
                                             mesh["pp"].get_group() if schedule is not None else None, experts, ep_group)
        ckpt.wait_staging(agree=True)  # an async save's copy must be taken before the weights change
        if math.isfinite(grad_norm):  # the norm of the whole mesh: every rank decides alike
            optim.step()
            skipped_in_row = 0
        else:
            skipped_in_row, skipped = skipped_in_row + 1, skipped + 1
            skip_step(step, grad_norm, skipped_in_row, spec.training.maxSkippedSteps, ckpt)
        optim.zero_grad(set_to_none=True)
        for m in moe_mod.moe_layers(model).values():
            m.update_bias(mesh_group(mesh, "dp"))
        tokens_seen += spec.data.globalBatchSize * spec.data.seqLen
        # One collective per step: the mean loss over data parallel, the stop flag, a new
        # checkpoint request and the fence taken (MAX over ranks, so every rank acts on the same step).
        req = checkpoint_request(podinfo)
        taken = ckpt.fence.taken_by() if rank == 0 else None
        flags = torch.tensor([float(total) / dp_size, 1.0 if stop.requested else 0.0,
                              0.0 if req in seen_requests else 1.0, 1.0 if taken else 0.0], dtype=torch.float64)
        dist.all_reduce(flags[:1], op=dist.ReduceOp.SUM, group=mesh["dp"].get_group())
        dist.all_reduce(flags[1:], op=dist.ReduceOp.MAX)
        loss_v = float(flags[0])
        preempt, requested = bool(flags[1]), bool(flags[2])
        if requested:  # each pod's annotations file shows the request at its own time: served once, by all
            ids: list[str | None] = [None] * world
            dist.all_gather_object(ids, req)
            seen_requests.update(ids)
        if losses:
            losses.write(f"{step} {loss_v:.10f}\n")
            losses.flush()
        if flags[3]:  # a stale attempt: its replacement owns the folder; saving now would race it
            log.warning("%s has claimed %s since this attempt started: stopping at step %d without saving; exiting %d",
                        taken or "another attempt", ckpt_root, step, c.EXIT_PREEMPTED)
            return finish(c.EXIT_PREEMPTED)
        if step % spec.training.logEverySteps == 0 or step == spec.training.steps:
            now = time.monotonic()
            tps = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
            t_log, tokens_at_log = now, tokens_seen
            mfu = tps * fpt / (peak * world)
            mem = peak_memory_bytes(device == "cuda")
            metrics.set(**{c.METRIC_LOSS: loss_v, c.METRIC_TOKENS_PER_SECOND: tps, "pretrain_mfu": mfu,
                           "pretrain_grad_norm": grad_norm, "pretrain_memory_peak_bytes": mem})
            log.info("step %d/%d loss %.4f grad norm %.3g lr %.2e tokens/s %.0f mfu %.1f%% peak memory %.2f GiB", step,
                     spec.training.steps, loss_v, grad_norm, lr, tps, 100 * mfu, mem / 2**30)
            if moe is not None:
                stats = moe_mod.router_stats(model, args.layers, moe.experts)
                metrics.set_router_stats(stats)
                log.info("step %d router: %s", step, metrics.router_summary(stats))
        metrics.set(**{c.METRIC_STEP: step, "pretrain_skipped_steps_total": skipped})  # every step: an alert's
        profiler.step()
        # Validation before the save: a preemption's save (no validation then) must not wait for it.
        if validator is not None and not preempt and validator.due(step, step == spec.training.steps):
            v = validate(step)
            preempt = v is None  # a SIGTERM while validating: this step's checkpoint now, not after another step
            validated = v or validated
        if step % spec.checkpoint.intervalSteps == 0 or requested or preempt or step == spec.training.steps:
            committed = ckpt.save(step, model, optim, {"step": step, "tokensSeen": tokens_seen, "data": loader.state_dict(),
                                                       "seed": spec.training.seed, "lr": lr, "loss": loss_v,
                                                       "validated": list(validated) if validated else None,
                                                       "skipped": skipped, "skippedInRow": skipped_in_row,
                                                       "base": model.lora_base, "model": settings},
                                  final=preempt or step == spec.training.steps)
            if not committed:  # the fence taken since its last read (at most a second ago): exit 0 would claim this step saved
                log.warning("%s has claimed %s since this attempt started: checkpoint of step %d not committed; exiting %d",
                            ckpt.fence.taken or "another attempt", ckpt_root, step, c.EXIT_PREEMPTED)
                return finish(c.EXIT_PREEMPTED)
            if requested:
                served += 1
                log.info("checkpoint requested by the operator: saved step %d", step)
        # At every step: an async save is committed in the background whenever its writes end.
        metrics.set(**{c.METRIC_LAST_CHECKPOINT_STEP: ckpt.last_step, c.METRIC_LAST_CHECKPOINT_TIME: ckpt.last_time,
                       c.METRIC_CHECKPOINT_REQUESTS_SERVED: served, "pretrain_checkpoint_save_seconds": ckpt.save_seconds,
                       "pretrain_checkpoint_blocked_seconds_total": ckpt.blocked_seconds})
        if grace_unsaid and ckpt.save_seconds > grace:  # rank 0 commits, so only rank 0 knows
            log.warning("checkpoint step %d took %.1f s to commit, more than spec.template.terminationGracePeriodSeconds "
                        "(%d s): a save on SIGTERM (a preemption) would be killed before it commits, losing the steps since "
                        "the last checkpoint. Raise the grace period, or rely on termination notices (their checkpoint "
                        "comes before the SIGTERM)", ckpt.last_step, ckpt.save_seconds, grace)
            grace_unsaid = False
        if preempt and finished(step):
            log.warning("stop requested (SIGTERM) during the last step: its checkpoint saved, training finished")
        elif preempt:
            log.warning("stop requested (SIGTERM): checkpoint of step %d saved; exiting %d", step, c.EXIT_PREEMPTED)
            return finish(c.EXIT_PREEMPTED)
    if base_digest is not None:
        check_frozen_base(model, base_digest)
    log.info("done: %d steps, %d tokens; checkpoint saves blocked training for %.2f s", step, tokens_seen,
             ckpt.blocked_seconds)
    return finish(c.EXIT_SUCCESS)
