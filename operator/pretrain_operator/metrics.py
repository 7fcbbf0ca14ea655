"""The operator's Prometheus metrics (docs/metrics.md lists them with their labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("pretrain_operator_reconciles_total", "Reconciles run", ["result"])
RECONCILE_SECONDS = Histogram("pretrain_operator_reconcile_duration_seconds", "Time per reconcile",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
JOBS = Gauge("pretrain_operator_jobs", "PretrainJobs by phase", ["phase"])
RESTARTS = Counter("pretrain_operator_restarts_total", "Gang restarts by kind and reason", ["kind", "reason"])
RECOVERY_SECONDS = Histogram("pretrain_operator_recovery_seconds",
                             "From the end of an attempt (restart recorded) to the new gang running",
                             buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
PODS_CREATED = Counter("pretrain_operator_pods_created_total", "Pods created")
PODS_DELETED = Counter("pretrain_operator_pods_deleted_total", "Pods deleted")
CHECKPOINT_REQUESTS = Counter("pretrain_operator_checkpoint_requests_total", "Checkpoint requests sent to trainers", ["reason"])
IS_LEADER = Gauge("pretrain_operator_leader", "1 while this operator holds the leader Lease")
API_WRITES = Counter("pretrain_operator_api_writes_total", "Writes (create, patch, delete) sent to the API server")
