"""The PretrainJob API, defined once: these pydantic models generate the CRD (`crds/`, see
`crdgen.py`), the operator reads specs with them, and the trainer reads its configuration with
the very same models (`PretrainJobSpec`). Importable without torch or kopf.

    python -m pretrain_operator.crdgen > crds/pretrain.dev_pretrainjobs.yaml

Field names are the API's (camelCase); every default lives here and lands in the CRD schema, so
`kubectl get -o yaml` shows the defaulted spec. Rules that span fields are CEL rules attached to
the models (`x-kubernetes-validations`), each with a message naming the fields.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import contract as c

GROUP = "pretrain.dev"
VERSION = "v1alpha1"
KIND = "PretrainJob"
PLURAL = "pretrainjobs"
SINGULAR = "pretrainjob"
SHORT_NAMES = ["ptj"]

# Model shapes by preset name; the trainer builds them, the CRD's CEL rules read their layer and
# head counts (so `layers divisible by pipeline` holds for presets too).
PRESETS: dict[str, dict[str, int | float]] = {
    "tiny": dict(dim=64, layers=4, heads=4, kvHeads=2, vocabSize=512, ffnDim=192, maxSeqLen=128, ropeTheta=10000.0),
    "small": dict(dim=256, layers=8, heads=8, kvHeads=4, vocabSize=4096, ffnDim=768, maxSeqLen=512, ropeTheta=10000.0),
    # Llama 3's rotary base is 500000 (Meta's params.json, Hugging Face's rope_theta).
    "llama3-1b": dict(dim=2048, layers=16, heads=32, kvHeads=8, vocabSize=128256, ffnDim=8192, maxSeqLen=8192, ropeTheta=500000.0),
    "llama3-8b": dict(dim=4096, layers=32, heads=32, kvHeads=8, vocabSize=128256, ffnDim=14336, maxSeqLen=8192, ropeTheta=500000.0),
    "llama3-70b": dict(dim=8192, layers=80, heads=64, kvHeads=8, vocabSize=128256, ffnDim=28672, maxSeqLen=8192, ropeTheta=500000.0),
}

# Taints that announce a node's imminent reclaim, watched by default. Two are advisory
# (ADVISORY_NOTICE_TAINTS: a raised risk of interruption, a scale-down candidate): they ask for a
# checkpoint too, but a crash on such a node is still a failure, since the node may stay for hours.
DEFAULT_NOTICE_TAINTS = [
    "cloud.google.com/impending-node-termination",
    "aws-node-termination-handler/spot-itn",
    "aws-node-termination-handler/rebalance-recommendation",
    "karpenter.sh/disrupted",
    "karpenter.sh/disruption",
    "DeletionCandidateOfClusterAutoscaler",
    "ToBeDeletedByClusterAutoscaler",
]
ADVISORY_NOTICE_TAINTS = ("aws-node-termination-handler/rebalance-recommendation", "DeletionCandidateOfClusterAutoscaler")


def _rules(*rules: tuple[str, str, str | None]) -> dict:
    """CEL rules as `(rule, message, fieldPath)` for `x-kubernetes-validations`."""
    out = []
    for rule, message, path in rules:
        r = {"rule": rule, "message": message}
        if path:
            r["fieldPath"] = path
        out.append(r)
    return {"x-kubernetes-validations": out}


def _model(field: str, custom: int = 1) -> str:
    """CEL for the model's `field` as the trainer builds it: as given, else the preset's (`custom`
    where the preset is 'custom', which must give every field)."""
    table = ", ".join(f"'{name}': {shape[field]}" for name, shape in PRESETS.items())
    return (f"(has(self.model.{field}) ? self.model.{field} : "
            f"(self.model.preset == 'custom' ? {custom} : {{{table}}}[self.model.preset]))")


# The pipeline's microbatches a step: parallelism.microbatches, else the per-rank batch over
# data.microBatchSize (pipeline.microbatch_count in the trainer).
_MICRO = ("(self.parallelism.microbatches > 0 ? self.parallelism.microbatches : "
          "self.data.globalBatchSize / (self.parallelism.data * self.data.microBatchSize))")
# An absolute path with no empty, '.' or '..' part and no trailing '/': the kubelet makes a
# relative mountPath absolute while the trainer reads it from its working folder, and
# '/etc/pretrain/../x' is the pod's own config to the kubelet but not to rules comparing strings.
_PATH_PART = r"/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+)"  # [.], not \., inside CEL's string literals
ABSOLUTE_PATH = rf"^({_PATH_PART})+$"
# A mountPath as the pod API takes it: also with one trailing '/' (the rules below allow for it).
MOUNT_PATH = rf"^({_PATH_PART})+/?$"
# A container image reference (docker's grammar: lowercase repository path, an optional registry
# host[:port], tag and digest); the kubelet refuses others (InvalidImageName), a gang that never starts.
_DOMAIN = r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*(:[0-9]+)?"
_PATH = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
IMAGE = (rf"^({_DOMAIN}/)?{_PATH}(/{_PATH})*(:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
         r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A label or annotation key (a qualified name: an optional DNS-subdomain prefix and '/', then a
# name of at most 63 characters) and a label value, as the API server checks them on a pod.
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
DNS_SUBDOMAIN_OR_EMPTY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"
LABEL_KEY_OR_EMPTY = "^(" + LABEL_KEY[1:-1] + ")?$"
# Device resources a rank each: nprocPerNode must not exceed a pod's count.
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Parallelism(Model):
    """How the world of nodes x nprocPerNode ranks is split. data x tensor x pipeline must equal
    the world size; expert parallelism shards MoE experts over groups of `expert` data-parallel
    ranks (it borrows from data parallelism: data = expert x the rest, as torchtitan does)."""

    data: int = Field(1, ge=1, le=65536, description="Data-parallel degree (FSDP2 shards parameters, gradients and optimizer state over it).")
    tensor: int = Field(1, ge=1, le=64, description="Tensor-parallel degree (DTensor; splits attention heads and MLP columns/rows). Keep it within a node.")
    pipeline: int = Field(1, ge=1, le=256, description="Pipeline-parallel stages (torch.distributed.pipelining); layers are split evenly over them.")
    expert: int = Field(1, ge=1, le=1024, description="Expert-parallel degree for MoE layers: experts are split over groups of this many data-parallel ranks (tokens travel by all-to-all). Must divide parallelism.data and model.moe.experts.")
    pipelineSchedule: Literal["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
                              "DualPipeV"] = Field(
        "1F1B", description=("Pipeline schedule. All but GPipe and 1F1B put two virtual stages on each pipeline rank: "
                             "looped (rank r: stages r and r + pipeline) or V-shaped for ZBVZeroBubble and DualPipeV "
                             "(rank r: stages r and 2 pipeline - 1 - r); the zero-bubble ones split each backward into "
                             "input and weight gradients to fill the bubbles."))
    microbatches: int = Field(0, ge=0, le=4096, description="Pipeline microbatches per step; 0 means one per microBatchSize slice of the rank's batch.")
    reshardAfterForward: bool = Field(True, description="FSDP2: free the gathered parameters after each block's forward (ZeRO-3; less memory) or keep them for the backward (ZeRO-2-like; less communication).")


class MoE(Model):
    """Mixture-of-Experts feed-forward blocks (absent: a dense model)."""

    experts: int = Field(8, ge=1, le=1024, description="Routed experts per MoE layer.")
    topK: int = Field(2, ge=1, le=64, description="Experts each token is routed to (1 is Switch Transformer routing).")
    everyKLayers: int = Field(1, ge=1, le=1000, description="MoE in every k-th layer, dense feed-forward elsewhere.")
    loadBalancing: Literal["auxLoss", "bias", "none"] = Field("auxLoss", description="auxLoss: Switch-style auxiliary loss; bias: aux-loss-free bias update; none.")
    auxLossCoef: float = Field(0.01, ge=0, le=1, description="Weight of the auxiliary load-balancing loss.")
    sharedExpert: bool = Field(False, description="Add one always-on shared expert.")
    capacityFactor: float = Field(0.0, ge=0, le=64, description="Token capacity per expert as a multiple of the even share; 0 disables dropping.")
    routerScore: Literal["softmax", "sigmoid"] = Field("softmax", description="Router scoring function (computed in fp32).")
    biasUpdateRate: float = Field(0.001, ge=0, le=1, description="loadBalancing bias: how far each expert's selection bias moves per step towards even load.")


class ModelSpec(Model):
    """The decoder: a preset, or explicit sizes (explicit sizes override the preset's)."""

    preset: Literal["tiny", "small", "llama3-1b", "llama3-8b", "llama3-70b", "custom"] = Field(
        "tiny", description="A Llama-style shape: tiny and small run on CPU; llama3-* are the Llama 3 shapes. 'custom' needs every size below.")
    dim: int | None = Field(None, ge=8, le=65536, description="Model width.")
    layers: int | None = Field(None, ge=1, le=1024, description="Decoder layers.")
    heads: int | None = Field(None, ge=1, le=1024, description="Attention heads.")
    kvHeads: int | None = Field(None, ge=1, le=1024, description="Key/value heads (grouped-query attention); divides heads.")
    vocabSize: int | None = Field(None, ge=2, le=1048576, description="Vocabulary size.")
    ffnDim: int | None = Field(None, ge=8, le=262144, description="Feed-forward hidden size (SwiGLU).")
    maxSeqLen: int | None = Field(None, ge=8, le=1048576, description="Longest sequence (rotary embedding table).")
    ropeTheta: float | None = Field(None, gt=0, le=1e9, description="Rotary embedding base (theta); the presets': 500000 for Llama 3, 10000 for tiny and small (and custom, unless given).")
    moe: MoE | None = Field(None, description="Mixture-of-Experts blocks; absent for a dense model.")
    initFrom: str = Field("", max_length=4096, description="Initial weights for a fresh run (continual pretraining): a checkpoint folder of this trainer (one step-N folder, or a run's checkpoint.path: its newest step whose model files verify) or a Hugging Face Llama/Mixtral folder (config.json and safetensors); empty means the random init of the seed. A run that has its own checkpoints resumes from them instead.")

    def resolved(self) -> dict[str, int | float]:
        """Preset sizes overridden by explicit ones."""
        base = dict(PRESETS.get(self.preset, {}))
        for k in ("dim", "layers", "heads", "kvHeads", "vocabSize", "ffnDim", "maxSeqLen", "ropeTheta"):
            v = getattr(self, k)
            if v is not None:
                base[k] = v
        return base


class LoRA(Model):
    """Low-rank adapters: base weights frozen, only adapters trained and checkpointed."""

    rank: int = Field(8, ge=1, le=1024, description="Adapter rank r.")
    alpha: float = Field(16.0, gt=0, le=4096, description="Scaling numerator: adapters are scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    targetModules: list[str] = Field(default_factory=lambda: ["wq", "wk", "wv", "wo"], max_length=32,
                                     min_length=1, description="Name patterns of the linear layers to adapt (attention: wq wk wv wo; MLP: w1 w2 w3).")
    baseCheckpoint: str = Field("", max_length=4096, description="Base weights: a checkpoint folder of this trainer (one step-N folder, or a run's checkpoint.path: its newest step whose model files verify) or a Hugging Face model folder; empty means the random init of the seed.")


class DataSource(Model):
    path: str = Field(min_length=1, max_length=4096, description="A prepared folder (`python -m pretrain_trainer prepare`).")
    weight: float = Field(1.0, gt=0, le=1_000_000, description="Its share of the training samples, relative to the other sources' weights.")


class Data(Model):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra=_rules(
        ("!has(self.path) || self.path == '' || !has(self.sources) || size(self.sources) == 0",
         "data.path and data.sources are exclusive: one prepared folder in path, or a blend of them in sources", ".sources"),
    ))

    path: str = Field("", max_length=4096, description="A prepared folder of token shards (`python -m pretrain_trainer prepare`); empty (and no sources) means a small synthetic corpus (65,536 tokens, more when seqLen and globalBatchSize need them).")
    sources: list[DataSource] = Field(default_factory=list, max_length=64, description=(
        "A blend of prepared folders tokenized with the same tokenizer, instead of path: each training sample comes "
        "from the source furthest below its weight's share so far (Megatron's blending), so the shares are exact "
        "at every step; each source's own order is shuffled by the seed and its last 5% held out."))
    seqLen: int = Field(128, ge=8, le=1048576, description="Tokens per sample.")
    globalBatchSize: int = Field(8, ge=1, le=1048576, description="Samples per optimizer step over all data-parallel ranks.")
    microBatchSize: int = Field(1, ge=1, le=65536, description="Samples per forward pass on one rank; gradient accumulation makes up the rest.")


    def folders(self) -> list[tuple[str, str, float]]:
        """(field name, path, weight) of each source: data.path alone, or data.sources[i]; [] for synthetic data."""
        if self.sources:
            return [(f"data.sources[{i}]", s.path, s.weight) for i, s in enumerate(self.sources)]
        return [("data.path", self.path, 1.0)] if self.path else []


class Optimizer(Model):
    lr: float = Field(3e-4, gt=0, le=10, description="Peak learning rate (AdamW).")
    minLr: float = Field(3e-5, ge=0, le=10, description="Learning rate at the end of the cosine decay.")
    warmupSteps: int = Field(10, ge=0, le=10_000_000, description="Linear warm-up steps.")
    decayType: Literal["cosine", "linear", "sqrt"] = Field("cosine", description="The shape of the decay from lr to minLr.")
    decayFraction: float | None = Field(None, gt=0, le=1, description=(
        "Absent: decay over every step after the warm-up. A fraction: hold lr until the last decayFraction of "
        "training.steps, then decay (warmup-stable-decay, WSD: a run can be extended from a checkpoint of its stable phase)."))
    weightDecay: float = Field(0.1, ge=0, le=10, description="AdamW weight decay.")
    gradClip: float = Field(1.0, ge=0, le=1000, description="Gradient-norm clipping; 0 disables it.")


class Profile(Model):
    """torch.profiler traces of a few steps (torchtitan's [profiling])."""

    startStep: int = Field(10, ge=1, le=100_000_000, description="The first profiled step (the step before it warms the profiler up).")
    steps: int = Field(3, ge=1, le=100, description="Steps profiled.")
    folder: str = Field("", max_length=1024, description="Where each rank writes steps-<first>-<last>/rank-<N>.json (Chrome trace format); empty: <checkpoint.path>/profiles.")


class Training(Model):
    steps: int = Field(100, ge=1, le=100_000_000, description="Optimizer steps in all.")
    seed: int = Field(1234, ge=0, le=2**31 - 1, description="Seed for weight init and data order (the same for any layout).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 mixed precision keeps fp32 master weights and reductions; CPU runs use fp32.")
    logEverySteps: int = Field(1, ge=1, le=1_000_000, description="Log and update metrics every N steps.")
    activationCheckpointing: Literal["none", "full", "selective"] = Field("none", description=(
        "full: recompute each decoder block's activations in the backward pass (less memory, about a third more compute). "
        "selective: keep the outputs of the matrix products, attention and tensor-parallel collectives and recompute "
        "the rest (torchtitan's op-level selective AC: most of full's saving of the cheap activations, little recompute)."))
    profile: Profile | None = Field(None, description="Profile a few steps with torch.profiler; absent: no profiling.")
    maxSkippedSteps: int = Field(5, ge=0, le=1_000_000, description=(
        "Steps in a row whose gradients are not finite (NaN or inf) that are skipped: no optimizer update, "
        "the weights (and so the next checkpoints) stay as they were. One more stops the run with exit 85, "
        "a permanent failure (a restart would replay the same steps); 0 stops at the first."))
    compile: bool = Field(False, description=(
        "torch.compile each decoder block (inductor, as torchtitan does): faster steps after a one-off compile when the "
        "ranks start (about 20 s for the tiny model on CPU, which needs a C++ compiler). The weights, their names and "
        "the checkpoints are the same as without; the losses agree to float rounding, not bit for bit."))


class Validation(Model):
    """Held-out loss during training (Megatron's --eval-interval / --eval-iters, torchtitan's
    [validation]): the loss of the current weights on the held-out data, the last 5% of the token
    stream, which training never reads."""

    everySteps: int = Field(100, ge=1, le=100_000_000, description="Validate every N steps, and at the last step.")
    batches: int = Field(1, ge=1, le=100_000, description=(
        "Held-out global batches (data.globalBatchSize windows of data.seqLen each) per validation; "
        "the held-out data must hold that many windows."))


class Checkpoint(Model):
    path: str = Field("/checkpoints", max_length=1024, pattern=ABSOLUTE_PATH,
                      description="Checkpoint folder inside the pod, an absolute path (also used as-is under plain torchrun).")
    claimName: str = Field("", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY, description="A PersistentVolumeClaim mounted at path; empty means an emptyDir (lost with the pods: use a claim on real clusters).")
    intervalSteps: int = Field(50, ge=1, le=100_000_000, description="Checkpoint every N steps.")
    keep: int = Field(3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted after a newer one is committed.")
    asyncSave: bool = Field(False, alias="async", description=(
        "Save in the background while training continues: the state is copied during the next step's forward and "
        "backward, written by a separate process, and committed as soon as it is written. The last step's save and "
        "a preemption's are synchronous."))


class FailurePolicy(Model):
    maxFailures: int = Field(3, ge=0, le=10000, description="Failed attempts (a non-zero exit without a disruption, OOMKilled) before the job fails for good.")
    maxPreemptions: int | None = Field(None, ge=0, le=1_000_000, description="Preemptions before the job fails; unbounded when absent.")
    retryableExitCodes: list[int] = Field(default_factory=list, max_length=64, description="Exit codes that restart the gang without counting as failures.")
    nonRetryableExitCodes: list[int] = Field(default_factory=lambda: [85], max_length=64, description="Exit codes that fail the job at once (85: the trainer's permanent error, e.g. a bad config).")
    failureSettleSeconds: int = Field(5, ge=0, le=600, description="After a rank fails, how long to look for a disruption signal (node loss, eviction) that makes it a preemption instead.")
    progressDeadlineSeconds: int | None = Field(None, ge=10, le=604800, description=(
        "A Running attempt whose step has not moved for this long (counted from its last step, or from the gang's "
        "Running) is restarted as a failure, reason ProgressDeadlineExceeded: a hang (a collective waiting on a peer "
        "that will never answer, a deadlock) that no pod's state shows. Judged only while the operator reads rank "
        "0's metrics; not at the last step (the final save). Set it above the start (import, checkpoint load, "
        "compile) and the slowest step, validation and checkpoint save. Absent: never."))


class Preemption(Model):
    noticeTaints: list[str] = Field(default_factory=lambda: list(DEFAULT_NOTICE_TAINTS), max_length=64,
                                    description="Node taint keys announcing an imminent reclaim (GKE, AWS node-termination-handler, Karpenter, cluster-autoscaler).")
    checkpointOnNotice: bool = Field(True, description="Ask the trainer for a checkpoint as soon as a node running the job gets a notice taint.")


# What every trainer pod already has (render.pod takes its volume names from here):
# template.volumes and volumeMounts must not reuse these names and paths (the API server would
# refuse every pod: duplicate names or mount points). /dev/shm may be mounted over: a volume of the
# user's own there replaces the operator's.
RESERVED_VOLUMES = ("config", "podinfo", "checkpoints", "pretrain-shm")
RESERVED_MOUNT_PATHS = (c.CONFIG_DIR, c.PODINFO_DIR)
# A Kubernetes resource quantity (apimachinery's), e.g. 8, 500m, 64Gi, 1e3.
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


class Toleration(Model):
    """A core/v1 Toleration, with the pod API's own rules (refused there, every pod would be)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        ("self.key != '' || self.operator == 'Exists'", "a toleration with an empty key needs operator Exists (it then tolerates every taint)", ".key"),
        ("self.operator != 'Exists' || self.value == ''", "a toleration with operator Exists takes no value", ".value"),
        ("!has(self.tolerationSeconds) || self.effect == 'NoExecute'", "tolerationSeconds needs effect NoExecute", ".tolerationSeconds"),
    ))

    key: str = Field("", max_length=316, pattern=LABEL_KEY_OR_EMPTY)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str = Field("", max_length=63, pattern=LABEL_VALUE)
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    tolerationSeconds: int | None = None


class Scheduling(Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        (f"!has(self.nodeSelector) || self.nodeSelector.all(k, k.matches('{LABEL_KEY}'))",
         "scheduling.nodeSelector: each key must be a label key (an optional DNS-subdomain prefix and '/', then at most "
         "63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)", ".nodeSelector")))

    nodeSelector: dict[str, Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]] = Field(
        default_factory=dict, max_length=64, description="Node labels every pod must match.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Tolerations, e.g. for tainted spot nodes.")
    affinity: dict | None = Field(None, description="A pod affinity (core/v1 Affinity), passed through as-is.",
                                  json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    priorityClassName: str = Field("", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY)
    schedulerName: str = Field("", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY, description="Empty: the default scheduler.")
    queueName: str = Field("", max_length=63, pattern=LABEL_VALUE, description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label, and makes each attempt's pods one Kueue pod group (kueue.x-k8s.io/pod-group-name, pod-group-total-count: nodes), admitted all together. Kueue holds the pods (a scheduling gate) until it admits them: that wait is not counted by startTimeoutSeconds.")
    startTimeoutSeconds: int = Field(600, ge=1, le=86400, description="All pods of an attempt must be running within this, counted from its first pod create (status.attemptStartTime), or from their admission when scheduling gates held them (Kueue's); otherwise the attempt is torn down and retried (no partial gang holds accelerators).")


# Pod label and annotation keys the operator sets itself: the job's own (its children are found by
# them) and Kueue's, which follow scheduling.queueName (a queue label set by hand would make Kueue
# admit each pod on its own: no gang).
OPERATOR_KEY_PREFIX = "pretrain.dev/"
KUEUE_KEYS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/pod-group-name", "kueue.x-k8s.io/pod-group-total-count")
# Environment variables the operator sets in every trainer container (render.pod): torchrun's and
# the contract's. template.env may not set them again (the pod would carry two values). Those it
# sets unless template.env does (OPERATOR_ENV_DEFAULTS) are the user's to override.
OPERATOR_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_RDZV_BACKEND", "PET_RDZV_ENDPOINT",
                "PET_RDZV_ID", "PET_MAX_RESTARTS", "PET_SHUTDOWN_TIMEOUT", c.ENV_CONFIG, c.ENV_ATTEMPT,
                c.ENV_JOB_NAME, c.ENV_JOB_UID, c.ENV_CHECKPOINT_DIR, c.ENV_METRICS_PORT, c.ENV_PODINFO,
                c.ENV_TERMINATION_MESSAGE, "PYTHONUNBUFFERED")
OPERATOR_ENV_DEFAULTS = ("PET_RDZV_CONF",)


def _exactly_one(*fields: str) -> str:
    return "[" + ", ".join(f"has(self.{f})" for f in fields) + "].filter(x, x).size() == 1"


class KeyRef(Model):
    """A key of a Secret or ConfigMap in the job's namespace (core/v1 SecretKeySelector)."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)
    optional: bool | None = Field(None, description="true: the variable is left unset when the key is missing.")


class FieldRef(Model):
    fieldPath: str = Field(min_length=1, max_length=256, description="e.g. metadata.name, status.podIP, spec.nodeName.")
    apiVersion: str | None = Field(None, max_length=64)


class ResourceFieldRef(Model):
    resource: str = Field(min_length=1, max_length=256, description="e.g. limits.memory, requests.cpu.")
    containerName: str | None = Field(None, max_length=63)
    divisor: str | None = Field(None, pattern=QUANTITY, max_length=64)


class EnvVarSource(Model):
    """Where a variable's value comes from (core/v1 EnvVarSource): exactly one of these."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        (_exactly_one("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef"),
         "template.env[].valueFrom takes exactly one of secretKeyRef, configMapKeyRef, fieldRef and resourceFieldRef", None),
    ))

    secretKeyRef: KeyRef | None = Field(None, description="A key of a Secret (e.g. WANDB_API_KEY, HF_TOKEN).")
    configMapKeyRef: KeyRef | None = None
    fieldRef: FieldRef | None = Field(None, description="A field of the pod (downward API).")
    resourceFieldRef: ResourceFieldRef | None = Field(None, description="A resource of the container (downward API).")


class EnvVar(Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        ("!has(self.valueFrom) || self.value == ''", "template.env[] takes value or valueFrom, not both", ".valueFrom"),
        (f"!(self.name in {list(OPERATOR_ENV)})",
         "template.env[].name must not be one the operator sets itself (torchrun's PET_NNODES, PET_NODE_RANK, "
         "PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID, PET_MAX_RESTARTS, PET_SHUTDOWN_TIMEOUT, PET_NPROC_PER_NODE, the contract's PRETRAIN_* "
         "variables and PYTHONUNBUFFERED): they follow the spec", ".name"),
    ))

    name: str = Field(min_length=1, max_length=256)
    value: str = Field("", max_length=32768)
    valueFrom: EnvVarSource | None = Field(None, description="The value from a Secret, ConfigMap or the pod itself, instead of value.")


class LocalObjectReference(Model):
    name: str = Field(min_length=1, max_length=253)


class SourceRef(Model):
    name: str = Field(min_length=1, max_length=253)
    optional: bool | None = Field(None, description="true: the pod starts without it when it is missing.")


class EnvFromSource(Model):
    """Every key of a Secret or ConfigMap as a variable (core/v1 EnvFromSource): exactly one of them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        (_exactly_one("secretRef", "configMapRef"), "template.envFrom[] takes exactly one of secretRef and configMapRef", None),
    ))

    prefix: str = Field("", max_length=256, description="Put before each key's name.")
    secretRef: SourceRef | None = None
    configMapRef: SourceRef | None = None


class InitContainer(Model):
    """A core/v1 Container, passed through as-is, except its securityContext: the trainer's
    (no privilege escalation, every capability dropped, non-root; the restricted Pod Security
    level's) under the keys it leaves out."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field(min_length=1, max_length=1024, pattern=IMAGE)


class Template(Model):
    """What of the trainer pods the job sets itself: their command, environment, metadata, identity
    and extra volumes (the rest follows the spec)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        *[(f"!has(self.{f}) || self.{f}.all(k, k.matches('{LABEL_KEY}'))",
           f"template.{f}: each key must be a qualified name (an optional DNS-subdomain prefix and '/', then at most "
           "63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)", f".{f}") for f in ("labels", "annotations")],
        *[(f"!has(self.{f}) || self.{f}.all(k, !k.startsWith('{OPERATOR_KEY_PREFIX}') && !(k in {list(KUEUE_KEYS)}))",
           f"template.{f} must not set the operator's own keys ({OPERATOR_KEY_PREFIX}*, and Kueue's: use "
           "scheduling.queueName)", f".{f}") for f in ("labels", "annotations")],
        ("!has(self.initContainers) || self.initContainers.all(i, i.name != 'trainer' && "
         "self.initContainers.exists_one(j, j.name == i.name))",
         "template.initContainers[].name must be unique and not 'trainer' (the trainer's container)", ".initContainers"),
        (f"!has(self.volumes) || self.volumes.all(v, !(v.name in {list(RESERVED_VOLUMES)}))",
         f"template.volumes must not use the names of the pod's own volumes ({', '.join(RESERVED_VOLUMES)})", ".volumes"),
        (f"!has(self.volumeMounts) || self.volumeMounts.all(m, !{list(RESERVED_MOUNT_PATHS)}.exists(p, m.mountPath == p "
         "|| m.mountPath.startsWith(p + '/')))",
         f"template.volumeMounts must not mount over the pod's own {' or '.join(RESERVED_MOUNT_PATHS)}, nor under them", ".volumeMounts"),
        # Rules, not patterns, for these items (free-form core/v1 objects to the models): the trainer's
        # check of the spec refuses them too.
        (f"!has(self.volumes) || self.volumes.all(v, v.name.matches('{DNS_LABEL}'))",
         "template.volumes[].name must be a DNS label (lowercase letters, digits and '-', starting and ending "
         "with a letter or digit)", ".volumes"),
        (f"!has(self.volumeMounts) || self.volumeMounts.all(m, m.mountPath.matches('{MOUNT_PATH}'))",
         "template.volumeMounts[].mountPath must be an absolute path without an empty, '.' or '..' part", ".volumeMounts"),
    ))

    labels: dict[str, Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]] = Field(
        default_factory=dict, max_length=64,
        description="Extra labels of each trainer pod (cost allocation, network policies, a mesh's opt-out). "
                    "Keys under pretrain.dev/ and Kueue's are the operator's. Changes apply from the next attempt.")
    annotations: dict[str, Annotated[str, Field(max_length=65536)]] = Field(
        default_factory=dict, max_length=64,
        description="Extra annotations of each trainer pod, e.g. sidecar.istio.io/inject: 'false' (a mesh's sidecar "
                    "would keep a finished pod running) or karpenter.sh/do-not-disrupt: 'true'. Keys under "
                    "pretrain.dev/ and Kueue's are the operator's. Changes apply from the next attempt.")
    serviceAccountName: str = Field("", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY,
        description="The pods' ServiceAccount (in the job's namespace), e.g. for a cloud's workload identity to reach "
                    "object storage. Empty: the namespace's default, with no API token mounted; set: its token is "
                    "mounted as the ServiceAccount's automountServiceAccountToken says. Until it exists the gang "
                    "is refused and retried (status.message says so).")
    imagePullSecrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16,
                                                         description="Secrets to pull a private trainer image with.")
    command: list[str] = Field(default_factory=list, max_length=256, description="Overrides the container command (default: torchrun with the trainer).")
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description=(
        "Extra environment variables. A value written here is also in the job's ConfigMap (the trainer's config is the "
        "whole spec): take secrets from a Secret with valueFrom or envFrom."))
    envFrom: list[EnvFromSource] = Field(default_factory=list, max_length=64,
                                         description="Every key of these Secrets or ConfigMaps as an environment variable.")
    initContainers: list[InitContainer] = Field(
        default_factory=list, max_length=16,
        description="Containers that run to completion, in order, before the trainer of every pod of every attempt, "
                    "e.g. to stage data on a node's local disk. They see the pod's volumes by name (checkpoints, "
                    "config, podinfo and template.volumes) and run as the pod's user (uid 1000). One that fails fails "
                    "the attempt (spending failurePolicy.maxFailures); their time counts towards "
                    "scheduling.startTimeoutSeconds.")
    volumes: list[dict] = Field(default_factory=list, max_length=64, description="Extra pod volumes (core/v1 Volume).",
                                json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "required": ["name"],
                                                             "properties": {"name": {"type": "string", "maxLength": 63}}}})
    volumeMounts: list[dict] = Field(default_factory=list, max_length=64, description="Extra container volume mounts (core/v1 VolumeMount).",
                                     json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                                                  "required": ["name", "mountPath"],
                                                                  "properties": {"name": {"type": "string", "maxLength": 63},
                                                                                 "mountPath": {"type": "string", "maxLength": 4096}}}})
    terminationGracePeriodSeconds: int = Field(60, ge=0, le=3600, description="Time for an emergency checkpoint after SIGTERM.")
    shmSize: str = Field("", max_length=32, pattern=r"^([0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?)?$", description=(
        "Size limit of the memory-backed /dev/shm each trainer pod gets (an emptyDir with medium Memory), "
        "where NCCL and async checkpoint staging put their buffers; a container runtime's own /dev/shm is "
        "64 MiB. Empty: no limit of its own (the pod's memory limit bounds it). A volumeMount of your own at "
        "/dev/shm replaces it."))


class Elastic(Model):
    """Run on fewer nodes when capacity is short (spot), instead of waiting for the whole gang."""

    minNodes: int = Field(ge=1, le=10000, description=(
        "The fewest nodes the job may run on. When an attempt's gang is not all running within "
        "scheduling.startTimeoutSeconds, the next attempt runs on as many nodes as were placed (at least "
        "minNodes, at most one fewer than the attempt had), the largest such count that gives a whole layout: "
        "parallelism.data shrinks with it (tensor and pipeline stay), data.globalBatchSize stays (gradient "
        "accumulation makes up the rest), so the run continues from its checkpoint on the same loss curve, "
        "only slower and with more memory a rank (FSDP2 shards over fewer ranks). Every later attempt (after a "
        "preemption, a failure, a resume) tries all nodes again. status.nodes shows the current attempt's count "
        "(docs/operations.md: which counts fit)."))
    regrowAfterSeconds: int | None = Field(None, ge=60, le=604800, description=(
        "An attempt running on fewer nodes than the spec's tries all of them again once it has run this long: "
        "it trains on while capacity probes (placeholder pods shaped like its pods, one per missing node; pending, "
        "an autoscaler's cue to add nodes) wait for room, in rounds of scheduling.startTimeoutSeconds, and is "
        "restarted on all nodes once the scheduler has placed every probe of a round (restart kind Regrow: no "
        "budget spent; its pods' SIGTERM checkpoint keeps the steps). Jobs in a Kueue queue, and operators without "
        "a probe image, restart without probing: keep it well above scheduling.startTimeoutSeconds there (should "
        "the capacity still be short, the start timeout shrinks the job again). Absent: a shrunk job grows back "
        "only at its next restart (a preemption, a failure, a resume)."))


class Resources(Model):
    requests: dict[str, Annotated[str, Field(pattern=QUANTITY, max_length=64)]] = Field(
        default_factory=dict, description="Per pod, e.g. {cpu: '8', memory: 64Gi, nvidia.com/gpu: '8'}. An extended resource "
                                         "(nvidia.com/gpu, vpc.amazonaws.com/efa) requested without a limit gets its request as its limit "
                                         "(the pod API allows no other).")
    limits: dict[str, Annotated[str, Field(pattern=QUANTITY, max_length=64)]] = Field(default_factory=dict)


_SPEC_RULES = _rules(
    ("self.parallelism.data * self.parallelism.tensor * self.parallelism.pipeline == self.nodes * self.nprocPerNode",
     "parallelism.data x parallelism.tensor x parallelism.pipeline must equal nodes x nprocPerNode", ".parallelism"),
    (f"{_model('layers')} % (self.parallelism.pipelineSchedule in ['GPipe', '1F1B'] ? self.parallelism.pipeline : 2 * self.parallelism.pipeline) == 0",
     "model.layers must be divisible by parallelism.pipeline (times 2 for the schedules with two stages per rank)", ".model"),
    (f"{_model('heads')} % self.parallelism.tensor == 0",
     "model.heads must be divisible by parallelism.tensor", ".model"),
    (f"{_model('kvHeads')} % self.parallelism.tensor == 0",
     "model.kvHeads must be divisible by parallelism.tensor", ".model"),
    (f"{_model('heads')} % {_model('kvHeads')} == 0",
     "model.heads must be divisible by model.kvHeads (each as given, else the preset's)", ".model"),
    (f"{_model('dim', 2)} % {_model('heads')} == 0 && ({_model('dim', 2)} / {_model('heads')}) % 2 == 0",
     "model.dim must be divisible by model.heads into an even head size (dim / heads: the rotary embedding turns "
     "pairs), each as given, else the preset's", ".model"),
    (f"!has(self.model.moe) || self.model.moe.everyKLayers <= {_model('layers')}",
     "model.moe.everyKLayers must not exceed model.layers (no layer would be MoE)", ".model.moe.everyKLayers"),
    ("self.model.preset != 'custom' || (has(self.model.dim) && has(self.model.layers) && has(self.model.heads) && "
     "has(self.model.kvHeads) && has(self.model.vocabSize) && has(self.model.ffnDim) && has(self.model.maxSeqLen))",
     "model.preset 'custom' needs model.dim, layers, heads, kvHeads, vocabSize, ffnDim and maxSeqLen", ".model"),
    ("!has(self.model.moe) || self.model.moe.experts % self.parallelism.expert == 0",
     "model.moe.experts must be divisible by parallelism.expert", ".parallelism.expert"),
    ("self.parallelism.expert == 1 || (has(self.model.moe) && self.parallelism.data % self.parallelism.expert == 0)",
     "parallelism.expert needs model.moe and must divide parallelism.data", ".parallelism.expert"),
    ("!has(self.model.moe) || self.model.moe.topK <= self.model.moe.experts",
     "model.moe.topK must not exceed model.moe.experts", ".model.moe.topK"),
    ("self.data.seqLen % self.parallelism.tensor == 0",
     "data.seqLen must be divisible by parallelism.tensor (sequence parallel splits each sequence over the tensor ranks)",
     ".data.seqLen"),
    ("!has(self.lora) || !has(self.model.moe)",
     "lora with model.moe is not supported: LoRA adapts dense attention and MLP projections only", ".lora"),
    ("self.data.globalBatchSize % (self.parallelism.data * self.data.microBatchSize) == 0",
     "data.globalBatchSize must be divisible by parallelism.data x data.microBatchSize", ".data.globalBatchSize"),
    ("self.optimizer.minLr <= self.optimizer.lr", "optimizer.minLr must not exceed optimizer.lr", ".optimizer.minLr"),
    ("self.optimizer.warmupSteps <= self.training.steps", "optimizer.warmupSteps must not exceed training.steps", ".optimizer.warmupSteps"),
    (f"self.data.seqLen <= {_model('maxSeqLen', 1048576)}",
     "data.seqLen must not exceed model.maxSeqLen", ".data.seqLen"),
    ("self.parallelism.pipeline > 1 || self.parallelism.microbatches == 0",
     "parallelism.microbatches is the pipeline's: set it only with a pipeline (parallelism.pipeline of 2 or more; without one, "
     "data.microBatchSize sets the gradient accumulation)", ".parallelism.microbatches"),
    ("self.parallelism.pipeline == 1 || self.parallelism.microbatches == 0 || "
     "(self.data.globalBatchSize / self.parallelism.data) % self.parallelism.microbatches == 0",
     "parallelism.microbatches must divide the per-rank batch (data.globalBatchSize / parallelism.data)",
     ".parallelism.microbatches"),
    (f"self.parallelism.pipeline == 1 || self.parallelism.pipelineSchedule != '1F1B' || {_MICRO} >= self.parallelism.pipeline",
     "1F1B needs at least parallelism.pipeline microbatches (parallelism.microbatches, else "
     "data.globalBatchSize / (parallelism.data x data.microBatchSize))", ".parallelism.microbatches"),
    ("self.parallelism.pipeline == 1 || !(self.parallelism.pipelineSchedule in ['Interleaved1F1B', 'InterleavedZeroBubble']) || "
     f"{_MICRO} % ({_MICRO} / self.parallelism.pipeline >= 1 ? {_MICRO} / self.parallelism.pipeline : 1) == 0",
     "the interleaved schedules need a whole number of rounds: the microbatches (parallelism.microbatches, else "
     "data.globalBatchSize / (parallelism.data x data.microBatchSize)) divisible by microbatches / parallelism.pipeline",
     ".parallelism.microbatches"),
    (f"self.parallelism.pipeline == 1 || self.parallelism.pipelineSchedule != 'DualPipeV' || {_MICRO} "
     ">= 2 * self.parallelism.pipeline",
     "DualPipeV needs at least 2 x parallelism.pipeline microbatches (parallelism.microbatches, else "
     "data.globalBatchSize / (parallelism.data x data.microBatchSize))", ".parallelism.microbatches"),
    ("!has(self.validation) || self.parallelism.pipeline == 1 || !(self.parallelism.pipelineSchedule in ['ZBVZeroBubble', 'DualPipeV'])",
     "validation does not run under parallelism.pipelineSchedule ZBVZeroBubble or DualPipeV (torch's forward-only "
     "pipeline eval needs their backward): use InterleavedZeroBubble", ".validation"),
    (f"!(self.checkpoint.path in {[*RESERVED_MOUNT_PATHS, c.SHM_DIR]}) && "
     f"!{[*RESERVED_MOUNT_PATHS, c.SHM_DIR]}.exists(p, self.checkpoint.path.startsWith(p + '/')) && "
     "!(has(self.template.volumeMounts) && self.template.volumeMounts.exists(m, m.mountPath in [self.checkpoint.path, self.checkpoint.path + '/']))",
     f"checkpoint.path must not be a mount point of the pod's own ({', '.join([*RESERVED_MOUNT_PATHS, c.SHM_DIR])}), nor under one, "
     "nor one of template.volumeMounts", ".checkpoint.path"),
    ("!has(self.elastic) || self.elastic.minNodes <= self.nodes", "elastic.minNodes must not exceed nodes", ".elastic.minNodes"),
    ("!has(self.elastic) || ((self.elastic.minNodes * self.nprocPerNode) % (self.parallelism.tensor * self.parallelism.pipeline) == 0 "
     "&& self.data.globalBatchSize % (self.elastic.minNodes * self.nprocPerNode / (self.parallelism.tensor * self.parallelism.pipeline) "
     "* self.data.microBatchSize) == 0 && (self.elastic.minNodes * self.nprocPerNode / (self.parallelism.tensor * self.parallelism.pipeline)) "
     "% self.parallelism.expert == 0)",
     "elastic.minNodes must give a whole layout: minNodes x nprocPerNode divisible by parallelism.tensor x pipeline, and the "
     "data degree that leaves, d = minNodes x nprocPerNode / (tensor x pipeline), divisible by parallelism.expert, and "
     "data.globalBatchSize by d x data.microBatchSize", ".elastic.minNodes"),
    *[(f"!({lim} || {req}) || ({n}.matches('^[0-9]+$') && int({n}) >= self.nprocPerNode)",
       f"nprocPerNode must not exceed the {g} of each pod (resources.limits, else requests; a whole number): one "
       "process a device", ".nprocPerNode")
      for g in GPU_RESOURCES
      for lim, req in [(f"(has(self.resources.limits) && '{g}' in self.resources.limits)",
                        f"(has(self.resources.requests) && '{g}' in self.resources.requests)")]
      for n in [f"({lim} ? self.resources.limits['{g}'] : self.resources.requests['{g}'])"]],
    ("!self.failurePolicy.retryableExitCodes.exists(c, c in self.failurePolicy.nonRetryableExitCodes)",
     "failurePolicy.retryableExitCodes and nonRetryableExitCodes must not share a code", ".failurePolicy"),
)

# Training fields are fixed while the job runs; change them once the operator has seen it
# suspended (phase Suspended: its pods removed) or before it first acted on it. On the whole object,
# not on spec: a rule on spec alone, reading oldSelf.suspend, let a user suspend, change the model,
# and resume before the operator looked (it was down, or backing off): the running gang went on
# with the old model, and the next attempt loaded its checkpoints into the new one.
_IMMUTABLE = ["image", "nodes", "nprocPerNode", "parallelism", "model", "data", "optimizer", "training", "checkpoint"]
_IMMUTABLE_OPTIONAL = ["lora", "validation"]  # absent or present alike
ROOT_RULES = [
    {"rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$')",
     "message": "metadata.name must be a DNS-1035 label of at most 40 characters (pod names add -a<attempt>-n<rank>)"},
    {"rule": "!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase in ['Pending', 'Suspended'] || (" + " && ".join(
        [f"self.spec.{f} == oldSelf.spec.{f}" for f in _IMMUTABLE]
        + [f"has(self.spec.{f}) == has(oldSelf.spec.{f}) && (!has(self.spec.{f}) || self.spec.{f} == oldSelf.spec.{f})"
           for f in _IMMUTABLE_OPTIONAL]) + ")",
     "fieldPath": ".spec",
     "message": "spec.image, nodes, nprocPerNode, parallelism, model, lora, data, optimizer, training, validation and checkpoint "
                "are immutable while the job runs; set spec.suspend: true, wait for status.phase Suspended, then change them"},
]


class PretrainJobSpec(Model):
    """What to train, on how many pods, and how to survive preemption."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra=_SPEC_RULES)

    suspend: bool = Field(False, description="true: checkpoint, remove the pods, phase Suspended; the training fields (image, nodes, model, data, ...) may change once the phase is Suspended. false again: resume from the latest checkpoint as a new attempt. A job created suspended (a queue such as Kueue admits it by setting false) starts its first attempt then.")
    image: str = Field("ghcr.io/pretrain-operator/trainer:0.1.0", min_length=1, max_length=1024, pattern=IMAGE,
                       description="Trainer image: a reference such as registry.example.com:5000/team/trainer:1.2 (its "
                                   "repository path lowercase), with an optional @sha256 digest.")
    nodes: int = Field(1, ge=1, le=10000, description="Pods in the gang (torchrun nodes), one per machine.")
    nprocPerNode: int = Field(1, ge=1, le=64, description="Processes (ranks) per pod, usually its GPU count.")
    resources: Resources = Field(default_factory=Resources, description="Resources of each pod.")
    parallelism: Parallelism = Field(default_factory=Parallelism)
    model: ModelSpec = Field(default_factory=ModelSpec)
    lora: LoRA | None = Field(None, description="Fine-tune with LoRA adapters; absent for full training.")
    data: Data = Field(default_factory=Data)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    training: Training = Field(default_factory=Training)
    validation: Validation | None = Field(None, description="Held-out loss every few steps (logged, served as a metric, shown in status.progress); absent: none.")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    failurePolicy: FailurePolicy = Field(default_factory=FailurePolicy)
    preemption: Preemption = Field(default_factory=Preemption)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    activeDeadlineSeconds: int | None = Field(
        None, ge=1, le=31_536_000,
        description="Fail the job (reason DeadlineExceeded) once it has been active this long since status.startTime, "
                    "restarts and waits for capacity included: a cap on what a run may cost. Its pods get SIGTERM, so "
                    "the trainer checkpoints first. Resuming from suspension restarts the clock (startTime is reset), "
                    "as for a Kubernetes Job. May be changed while the job runs; absent: no deadline.")
    elastic: Elastic | None = Field(None, description="Shrink to fewer nodes when the whole gang cannot be placed; absent: always all nodes.")
    ttlSecondsAfterFinished: int | None = Field(None, ge=0, le=31_536_000, description="Delete the job this long after it Succeeded or Failed.")
    template: Template = Field(default_factory=Template)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nprocPerNode


# ---- status --------------------------------------------------------------------------------------
Phase = Literal["Pending", "Starting", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class Condition(Model):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str = ""
    observedGeneration: int = 0


class CheckpointRef(Model):
    step: int = 0
    path: str = ""
    time: str = ""


class Progress(Model):
    step: int = 0
    totalSteps: int = 0
    loss: float | None = None
    tokensPerSecond: float | None = None
    validationLoss: float | None = None
    validationStep: int | None = None
    updated: str = ""


class Restart(Model):
    """Intent recorded before acting: which attempt is being replaced, and why."""

    fromAttempt: int = Field(0, description=(
        "The attempt whose gang this restart replaces: the last one whose pods were created (an attempt replaced "
        "before its gang was created, suspended while it waited, passes its own fromAttempt on)."))
    kind: Literal["Preemption", "Failure", "StartTimeout", "Resume", "Retryable", "Regrow"] = "Preemption"
    reason: str = ""
    message: str = ""
    requestedAt: str = ""
    reachedStep: int = Field(0, description=(
        "The furthest step the replaced attempt reported (its progress, then its pods' final reports); when the "
        "next gang is created, the steps past the checkpoint it starts from are added to status.lostSteps."))


class PretrainJobStatus(Model):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    attempt: int = 0
    failures: int = 0
    preemptions: int = 0
    readyNodes: str = "0/0"
    lastCheckpoint: CheckpointRef | None = None
    progress: Progress | None = None
    restart: Restart | None = None
    attemptStartTime: str = ""
    startTime: str = Field("", description="When the job first started, or last resumed from suspension (activeDeadlineSeconds runs from it).")
    completionTime: str = ""
    observedGeneration: int = 0
    checkpointRequestedAt: str = Field("", description="<attempt>@<time> of the last checkpoint request on a termination notice (<attempt>@<time>/advisory when only advisory notices asked for it: a termination notice asks again).")
    gangCreated: bool = Field(False, description="Every pod of the current attempt has been created (a missing one since is a preemption).")
    failureSeenAt: str = Field("", description="When a rank's failure was first seen (failurePolicy.failureSettleSeconds runs from it).")
    admissionWaitSince: str = Field("", description="Since when the current attempt's pods are held by scheduling gates (a queue's admission); cleared at their admission.")
    quickRestarts: int = Field(0, description=(
        "Restarts in a row of attempts that ended within 60 s of their first pod create; from the third, "
        "the next gang waits 10 s, doubling to 5 min (a node that refuses pods, an eviction storm, a trainer "
        "that exits at once with a retryable code), instead of a new gang every few seconds."))
    runningSeconds: int = Field(0, description=(
        "Seconds the job spent Running (every node up) in the attempts before the current one's Running "
        "stretch: with the time since its Running condition's lastTransitionTime, the time the gang was up. "
        "Against the time since creation, what restarts, queueing and starts cost (goodput)."))
    nodes: int = Field(0, description=(
        "Nodes (pods) of the current attempt's gang: spec.nodes, or fewer after an elastic shrink "
        "(spec.elastic); 0 before the first attempt."))
    capacityProbesSince: str = Field("", description=(
        "When the current round of capacity probes of a shrunk elastic attempt began (docs/operations.md: "
        "elastic gangs); a round lasts scheduling.startTimeoutSeconds."))
    lostSteps: int = Field(0, description=(
        "Steps trained and then lost to restarts: for each restart, how far the replaced attempt got (its reported "
        "progress and its pods' final reports) past the checkpoint the next attempt starts from, which trains them "
        "again; added when the next gang is created. A preemption whose notice or SIGTERM checkpoint committed loses none."))
    message: str = ""


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.readyNodes"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes", "priority": 1},  # -o wide: below spec.nodes when shrunk
    {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Held-Out", "type": "number", "jsonPath": ".status.progress.validationLoss", "priority": 1},  # -o wide
    {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.lastCheckpoint.step"},
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions"},
    {"name": "Failures", "type": "integer", "jsonPath": ".status.failures"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
