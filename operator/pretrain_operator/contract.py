"""The contract between the operator and the trainer, as constants both sides import.
docs/trainer-contract.md explains it; change both together.

A pod of attempt A, node rank R of a job J gets:
- the trainer config (the job's spec as YAML, the PretrainJobSpec model) at CONFIG_PATH;
- torchrun's settings as PET_* environment variables (torchrun reads them as defaults for its
  flags): PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_RDZV_BACKEND=c10d,
  PET_RDZV_ENDPOINT=<J>-n0.<J>:RDZV_PORT (rank 0's stable DNS name), PET_RDZV_ID=<job uid>-a<A>;
- ENV_ATTEMPT, ENV_JOB_NAME, ENV_JOB_UID, ENV_CHECKPOINT_DIR, ENV_METRICS_PORT, ENV_PODINFO (the job's
  uid and the attempt also fence its checkpoint folder against a stale attempt's pods);
- the pod's annotations as a file (downward API) at PODINFO_DIR/annotations: when the operator
  wants a checkpoint now it sets ANN_CHECKPOINT_REQUEST to a request id; the trainer saves at its
  next step boundary and reports the step under METRIC_LAST_CHECKPOINT_STEP.
The trainer serves Prometheus metrics on METRICS_PORT (rank 0 of each pod) and exits with one of
the EXIT_* codes; as it exits 0 or EXIT_PREEMPTED, global rank 0 writes a JSON report to
ENV_TERMINATION_MESSAGE's path (TERMINATION_MESSAGE_PATH), the container's termination message.
"""

from __future__ import annotations

# ---- files and environment --------------------------------------------------------------------
CONFIG_DIR = "/etc/pretrain"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
PODINFO_DIR = "/etc/podinfo"
SHM_DIR = "/dev/shm"  # a memory-backed emptyDir: a runtime's own is 64 MiB, too small for NCCL and async staging
PODINFO_ANNOTATIONS = f"{PODINFO_DIR}/annotations"

ENV_CONFIG = "PRETRAIN_CONFIG"
ENV_ATTEMPT = "PRETRAIN_ATTEMPT"
ENV_JOB_NAME = "PRETRAIN_JOB_NAME"
ENV_JOB_UID = "PRETRAIN_JOB_UID"
ENV_CHECKPOINT_DIR = "PRETRAIN_CHECKPOINT_DIR"
ENV_METRICS_PORT = "PRETRAIN_METRICS_PORT"
ENV_PODINFO = "PRETRAIN_PODINFO_DIR"
ENV_TERMINATION_MESSAGE = "PRETRAIN_TERMINATION_MESSAGE_PATH"
# Where the trainer's rank 0 writes its final report (JSON: step, totalSteps, loss, tokensSeen,
# checkpointStep) as it exits 0 or EXIT_PREEMPTED, and a failing rank {"error": "rank N: ..."};
# the kubelet puts it in the container's state.terminated.message, which outlives the metrics
# server it could be scraped from.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"

RDZV_PORT = 29400
METRICS_PORT = 9400


def url_host(ip: str) -> str:
    """An IP address as a URL's host: an IPv6 one in brackets (`http://fd00::5:9400` names no port)."""
    return f"[{ip}]" if ":" in ip else ip


def metrics_url(pod_ip: str, port: int = METRICS_PORT) -> str:
    """Where a pod's trainer serves its metrics (an IPv6 pod IP in an IPv6-only or IPv6-first
    dual-stack cluster)."""
    return f"http://{url_host(pod_ip)}:{port}/metrics"

# ---- annotations and labels -------------------------------------------------------------------
ANN_CHECKPOINT_REQUEST = "pretrain.dev/checkpoint-request"
LABEL_JOB = "pretrain.dev/job"
LABEL_JOB_UID = "pretrain.dev/job-uid"
LABEL_ATTEMPT = "pretrain.dev/attempt"
LABEL_NODE_RANK = "pretrain.dev/node-rank"
# On a capacity probe (not a rank: no attempt or node-rank label), the attempt it probes for.
LABEL_PROBE = "pretrain.dev/capacity-probe"
# On a capacity probe, a digest of what it was made from (render.probe_digest).
ANN_PROBE_SPEC = "pretrain.dev/probe-spec"

# ---- metrics the trainer serves (Prometheus text format) ---------------------------------------
METRIC_STEP = "pretrain_step"
METRIC_TOTAL_STEPS = "pretrain_total_steps"
METRIC_LOSS = "pretrain_loss"
METRIC_TOKENS_PER_SECOND = "pretrain_tokens_per_second"
METRIC_LAST_CHECKPOINT_STEP = "pretrain_last_checkpoint_step"
METRIC_LAST_CHECKPOINT_TIME = "pretrain_last_checkpoint_timestamp_seconds"
METRIC_CHECKPOINT_REQUESTS_SERVED = "pretrain_checkpoint_requests_served_total"
METRIC_VALIDATION_LOSS = "pretrain_validation_loss"  # spec.validation: the held-out loss ...
METRIC_VALIDATION_STEP = "pretrain_validation_step"  # ... of the weights after this step

# The trainer's container in each pod (its exit code is the rank's; other containers, sidecars, are not).
TRAINER_CONTAINER = "trainer"

# ---- exit codes ---------------------------------------------------------------------------------
EXIT_SUCCESS = 0
# Stopped on a termination notice or SIGTERM after committing a checkpoint: a preemption.
EXIT_PREEMPTED = 83
# A transient error (e.g. a NCCL timeout); counts as a failure unless listed as retryable.
EXIT_RETRYABLE = 84
# Will fail again whatever we do (a bad config, no data): the job fails at once.
EXIT_PERMANENT = 85
