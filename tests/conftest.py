"""Shared fixtures: the local cluster is started once per test session (or reused when
`make cluster-up` already runs it) and every test gets its own namespace.

    make test                       # everything, set-up included
    .venv/bin/pytest tests/test_control_plane.py -k dns
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
import warnings

import pytest
from kubernetes import client, config

from pretrain_localcluster import binaries, network
from pretrain_localcluster.config import REPO_ROOT, ClusterConfig
from pretrain_localcluster.controlplane import LocalCluster
from tests.kubeutil import pod_security_labels
from tests.operator_fixture import OperatorProcess


@pytest.fixture(scope="session")
def cluster() -> LocalCluster:
    if not network.can_manage():
        pytest.fail("the local cluster's process nodes need root and the `ip` command (iproute2): run the tests as root")
    lc = LocalCluster(ClusterConfig.load())
    started_here = not (lc.state() and lc.is_running())
    lc.up(log=lambda m: print(f"[local-cluster] {m}"))
    if lc.procs.running().get("operator"):
        # `make demo`'s operator: it holds the Lease the tests' own operators need, and would act
        # on their jobs too. Stopped; `make demo` starts it again.
        print("[local-cluster] stopping the operator `make demo` left running: the tests run their own")
        lc.procs.stop("operator")
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
    """A fresh namespace named after the test, deleted afterwards (without waiting). It enforces
    the `restricted` Pod Security level, as the namespaces of careful users do; a test that needs
    more says so, and why, with @pytest.mark.pod_security("baseline" or "privileged")."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    marker = request.node.get_closest_marker("pod_security")
    labels = {"pretrain-test": "1", **pod_security_labels(marker.args[0] if marker else "restricted")}
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
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



@pytest.fixture
def pool(cluster):
    """Three spot nodes of the test's own (a label its job selects: job_manifest(pool=label)),
    removed afterwards: (label, node names)."""
    from pretrain_localcluster import nodes
    label = uuid.uuid4().hex[:8]
    names = [nodes.add_node(cluster.state_dir, spot=True, labels={"pretrain.dev/test-pool": label}) for _ in range(3)]
    yield label, names
    for n in names:
        nodes.remove_node(cluster.state_dir, n)


@pytest.fixture(scope="session")
def crd(cluster):
    """The generated CRD, applied server-side as `make run-operator` does."""
    r = subprocess.run([str(binaries.locate(["kubectl"])["kubectl"]), "--kubeconfig", str(cluster.cfg.kubeconfig),
                        "apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ext = client.ApiextensionsV1Api(config.new_client_from_config(config_file=str(cluster.cfg.kubeconfig)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition("pretrainjobs.pretrain.dev")
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            break
        time.sleep(0.2)
    time.sleep(1)  # discovery
    return "pretrainjobs.pretrain.dev"


@pytest.fixture(scope="session")
def operator_process(cluster, crd, tmp_path_factory):
    """The operator, running as a process for the whole session (tests may stop and restart it)."""
    op = OperatorProcess(cluster.cfg.kubeconfig, tmp_path_factory.mktemp("operator"))
    op.start()
    yield op
    op.stop()


@pytest.fixture
def operator(operator_process):
    """The session's operator, running when the test starts: a test that stopped it and failed
    before starting it again must not take every later test down with it. An operator that exited
    on its own is a bug; it is started again, and the warning with its log shows in the summary."""
    if not operator_process.running:
        if operator_process.exited is not None:
            warnings.warn(f"the operator had exited with {operator_process.exited}: "
                          f"{operator_process.log_path.read_text()[-1500:]}")
        operator_process.start()
    return operator_process


def pytest_collection_modifyitems(items):
    """`cluster` marks exactly the tests that need the local cluster (any fixture built on it), so
    `-m "not cluster"` runs the pure ones in seconds; a hand-kept mark drifted both ways."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


def pytest_sessionfinish(session, exitstatus):
    """Under `make test` (PRETRAIN_REQUIRE_ALL=1), which installs every extra and runs as root, a
    skipped test is a failure of the run: an import that broke (torch's wheel, a missing library)
    must not leave the suite green without the tests it skipped."""
    if os.environ.get("PRETRAIN_REQUIRE_ALL") != "1":
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = (tr.stats.get("skipped") or []) if tr else []
    if skipped:
        for r in skipped:
            tr.write_line(f"SKIPPED under PRETRAIN_REQUIRE_ALL: {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
