"""The operator's Prometheus metrics (docs/metrics.md lists them with their labels)."""

from __future__ import annotations

import typing

from prometheus_client import Counter, Gauge, Histogram

from . import api

RECONCILES = Counter("pretrain_operator_reconciles_total", "Reconciles run", ["result"])
RECONCILE_SECONDS = Histogram("pretrain_operator_reconcile_duration_seconds", "Time per reconcile",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
JOBS = Gauge("pretrain_operator_jobs", "PretrainJobs by phase", ["phase"])
RESTARTS = Counter("pretrain_operator_restarts_total", "Gang restarts by kind and reason", ["kind", "reason"])
# The same restarts by kind only, every kind's series there from the start (at 0): a series that
# first appears at 1 hides that restart from increase() and rate(), so alerts and dashboard panels
# that count restarts read this one (reasons are open-ended: the restarts_total series cannot be made ahead).
GANG_RESTARTS = Counter("pretrain_operator_gang_restarts_total", "Gang restarts by kind", ["kind"])
for _kind in typing.get_args(api.Restart.model_fields["kind"].annotation):
    GANG_RESTARTS.labels(_kind)
RECOVERY_SECONDS = Histogram("pretrain_operator_recovery_seconds",
                             "From the end of an attempt (restart recorded) to the new gang running",
                             buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
PODS_CREATED = Counter("pretrain_operator_pods_created_total", "Pods created")
PODS_DELETED = Counter("pretrain_operator_pods_deleted_total", "Pods deleted")
CHECKPOINT_REQUESTS = Counter("pretrain_operator_checkpoint_requests_total", "Checkpoint requests sent to trainers", ["reason"])
for _reason in ("notice", "suspend"):  # series from the start (at 0), for rate() and dashboards
    CHECKPOINT_REQUESTS.labels(_reason)
IS_LEADER = Gauge("pretrain_operator_leader", "1 while this operator holds the leader Lease")
API_WRITES = Counter("pretrain_operator_api_writes_total", "Writes (create, patch, delete) sent to the API server")
API_REQUESTS = Counter("pretrain_operator_api_requests_total", "Requests sent to the API server (watches aside), by HTTP method",
                       ["method"])

# Per job, from its status (as kube-state-metrics would export it), for dashboards and alerts.
JOB_LABELS = ["namespace", "pretrain_job"]  # not "job": Prometheus gives that to the scrape job
JOB_ATTEMPT = Gauge("pretrain_operator_job_attempt", "The job's current attempt (status.attempt)", JOB_LABELS)
JOB_PREEMPTIONS = Gauge("pretrain_operator_job_preemptions", "Preemptions survived (status.preemptions)", JOB_LABELS)
JOB_FAILURES = Gauge("pretrain_operator_job_failures", "Failures counted against maxFailures (status.failures)", JOB_LABELS)
JOB_CHECKPOINT_STEP = Gauge("pretrain_operator_job_last_checkpoint_step", "status.lastCheckpoint.step", JOB_LABELS)
JOB_RUNNING_SECONDS = Gauge("pretrain_operator_job_running_seconds",
                            "Seconds the job has spent Running (every node up), all attempts (status.runningSeconds and the current stretch)",
                            JOB_LABELS)
JOB_LOST_STEPS = Gauge("pretrain_operator_job_lost_steps", "Steps trained again after restarts (status.lostSteps)", JOB_LABELS)
JOB_NODES = Gauge("pretrain_operator_job_nodes", "Nodes of the current attempt's gang (status.nodes): below spec.nodes "
                  "while an elastic job runs shrunk", JOB_LABELS)
JOB_PHASE = Gauge("pretrain_operator_job_phase", "1 for the job's current phase", JOB_LABELS + ["phase"])
PHASES = typing.get_args(api.Phase)


def observe_job(ns: str, name: str, status: dict, running_s: float = 0.0) -> None:
    JOB_ATTEMPT.labels(ns, name).set(status.get("attempt", 0))
    JOB_RUNNING_SECONDS.labels(ns, name).set(running_s)
    JOB_LOST_STEPS.labels(ns, name).set(status.get("lostSteps", 0))
    JOB_NODES.labels(ns, name).set(status.get("nodes", 0))
    JOB_PREEMPTIONS.labels(ns, name).set(status.get("preemptions", 0))
    JOB_FAILURES.labels(ns, name).set(status.get("failures", 0))
    JOB_CHECKPOINT_STEP.labels(ns, name).set((status.get("lastCheckpoint") or {}).get("step", 0))
    for ph in PHASES:
        JOB_PHASE.labels(ns, name, ph).set(1 if status.get("phase") == ph else 0)


def forget_job(ns: str, name: str) -> None:
    for g in (JOB_ATTEMPT, JOB_PREEMPTIONS, JOB_FAILURES, JOB_CHECKPOINT_STEP, JOB_RUNNING_SECONDS, JOB_LOST_STEPS, JOB_NODES):
        try:
            g.remove(ns, name)
        except KeyError:
            pass
    for ph in PHASES:
        try:
            JOB_PHASE.remove(ns, name, ph)
        except KeyError:
            pass
