"""The operator's settings: one typed tree, every default here, overridable by environment
variables (`PRETRAIN_OPERATOR_<FIELD>`, upper case) and by `python -m pretrain_operator` flags."""

from __future__ import annotations

import ipaddress
import os
import typing

from pydantic import BaseModel, Field, field_validator


class OperatorSettings(BaseModel):
    namespaces: list[str] = Field(default_factory=list, description="Watch only these namespaces; empty: cluster-wide.")
    workers: int = Field(16, ge=1, le=256, description="Reconcile workers (jobs reconciled at once).")
    metrics_port: int = Field(8000, description="Prometheus metrics of the operator; 0 disables.")
    health_port: int = Field(8080, description="Liveness endpoint /healthz; 0 disables.")
    bind_address: str = Field("0.0.0.0", description=(
        "The address the metrics and liveness ports listen on: `::` in an IPv6-only cluster (its kubelet "
        "probes and Prometheus reach the pod's IPv6 address, which 0.0.0.0 does not listen on). With `::` "
        "the liveness port (kopf's server) listens on IPv6 alone: not where pods' first address is IPv4."))
    lease_namespace: str = Field("default", description="Namespace of the leader-election Lease.")
    lease_name: str = "pretrain-operator"
    lease_duration_s: float = 15.0
    lease_renew_s: float = 2.0
    resync_s: float = Field(30.0, description="Every job is reconciled at least this often (events bring changes sooner).")
    finished_resync_s: float = Field(600.0, description="The same for a Succeeded or Failed job with nothing left to do: a "
                                                          "reconcile (a read and a pod list) every 30 s for each of thousands "
                                                          "of finished jobs was load for nothing; their events still wake them.")
    progress_interval_s: float = Field(5.0, gt=0, description="How often a Running job's trainer metrics are mirrored into status.progress and status.lastCheckpoint (a reconcile this often).")
    progress_rate: float = Field(10.0, gt=0, description="At most this many progress reads (a reconcile, a metrics scrape and a status write each) a second over all Running jobs: with more than progress_rate x progress_interval_s of them (50 by default), each job's progress is read less often.")
    api_qps_pool: int = Field(64, description="HTTP connections to the API server.")
    memory_trim_s: float = Field(10.0, description="Hand freed heap pages back to the OS this often after work (glibc malloc_trim); 0 disables.")
    malloc_arenas: int = Field(2, ge=0, description="glibc malloc arenas (M_ARENA_MAX) before any thread starts; 0 keeps glibc's 8 per core. Two hold the RSS after 100 jobs at about 86 MiB instead of 115-129.")
    watch_worker_idle_s: float = Field(1.0, description="How long kopf keeps an idle object's event worker (its default, 5 s, keeps one per pod of a burst alive: 30 MiB more after 100 jobs).")
    watch_list_chunk: int = Field(500, ge=0, description="Objects per page of the watches' first lists (pods of jobs, nodes, PretrainJobs); 0: one response.")
    watch_server_timeout_s: int = 300
    watch_client_timeout_s: int = 330
    capacity_probe_image: str = Field("registry.k8s.io/pause:3.10", description=(
        "The image of the capacity probes a shrunk elastic gang places before it regrows (docs/operations.md: "
        "a container that runs and does nothing; a mirror's copy where registry.k8s.io cannot be reached). "
        "Empty: no probes, a shrunk gang regrows after elastic.regrowAfterSeconds whether or not there is room."))
    # Fault injection for the kill-the-operator tests: exit right after this write-point.
    crash_at: str = ""

    @field_validator("bind_address")
    @classmethod
    def _an_ip_address(cls, v: str) -> str:
        ipaddress.ip_address(v)  # its ValueError names the value; pydantic names the setting
        return v

    @classmethod
    def from_env(cls, **overrides) -> "OperatorSettings":
        values = {}
        for name, f in cls.model_fields.items():
            env = os.environ.get(f"PRETRAIN_OPERATOR_{name.upper()}")
            if env is None:
                continue
            if f.annotation == list[str]:
                values[name] = [x for x in env.split(",") if x]
            else:
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def unknown_env(cls, environ: typing.Mapping[str, str] = os.environ) -> list[str]:
        """The PRETRAIN_OPERATOR_* variables that name no setting: a misspelt one (in the chart's
        operator.env) is otherwise ignored without a word, the default kept."""
        known = {f"PRETRAIN_OPERATOR_{name.upper()}" for name in cls.model_fields}
        return sorted(k for k in environ if k.startswith("PRETRAIN_OPERATOR_") and k not in known)
