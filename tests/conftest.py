"""Shared fixtures: the local cluster is started once per test session (or reused when
`make cluster-up` already runs it) and every test gets its own namespace.

    make test                       # everything, set-up included
    .venv/bin/pytest tests/test_control_plane.py -k dns
"""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest
from kubernetes import client, config

from pretrain_localcluster.config import ClusterConfig
from pretrain_localcluster.controlplane import LocalCluster


@pytest.fixture(scope="session")
def cluster() -> LocalCluster:
    lc = LocalCluster(ClusterConfig.load())
    started_here = not (lc.state() and lc.is_running())
    lc.up(log=lambda m: print(f"[local-cluster] {m}"))
    yield lc
    if started_here and os.environ.get("KEEP_CLUSTER", "") not in ("1", "true"):
        lc.down(log=lambda m: print(f"[local-cluster] {m}"))


@pytest.fixture(scope="session")
def api(cluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.cfg.kubeconfig))


@pytest.fixture(scope="session")
def core(api) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def namespace(request, core) -> str:
    """A fresh namespace named after the test, deleted afterwards (without waiting)."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"pretrain-test": "1"})))
    # The serviceaccount controller adds `default`; pods are refused until it exists.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except client.ApiException:
            time.sleep(0.1)
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException:
        pass

