"""A restart is several writes (status: intent; delete the old pods; create the new gang). Kill
the operator between them and a new one converges to exactly one live gang, with the counters
counted once. A failure for good is two (status Failed; delete the pods): the next operator
removes the pods it left. A termination notice's checkpoint request is two (status; annotate the
pods): the next operator annotates the pods it did not. A status decided from a stale read (another writer recorded a newer
attempt in between) is refused and decided again, never written over the newer one."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers import wait_for
from tests.jobs import Jobs, job_manifest
from tests.operator_fixture import OperatorProcess, has_ipv6_loopback



@pytest.fixture
def jobs(api, namespace, operator) -> Jobs:
    return Jobs(api, namespace)


def _crash_during_restart(jobs: Jobs, core, namespace: str, operator, crash_at: str, tmp_path) -> None:
    jobs.create(job_manifest("crashy", steps=500))
    jobs.wait_phase("crashy", "Running", timeout=60)
    operator.stop()
    try:
        faulty = OperatorProcess(operator.kubeconfig, tmp_path).start(crash_at=f"{crash_at}:{namespace}/crashy")
    except RuntimeError as e:  # it met its crash point before the preemption below: say why
        pods = [(p.metadata.name, p.status.phase, p.metadata.deletion_timestamp) for p in jobs.pods("crashy", live=False)]
        raise AssertionError(f"{e}\nstatus: {jobs.status('crashy')}\npods: {pods}") from None
    try:
        core.delete_namespaced_pod("crashy-a1-n1", namespace)  # a preemption: the restart begins
        assert faulty.wait_exit(60) == 17, faulty.log_path.read_text()[-3000:]
    finally:
        faulty.stop()


def _converged(jobs: Jobs, nodes: int = 2) -> dict:
    st = jobs.wait_phase("crashy", "Running", timeout=90, attempt=2)
    assert st["attempt"] == 2 and st["preemptions"] == 1 and st["failures"] == 0
    live = jobs.pods("crashy")
    assert sorted(p.metadata.name for p in live) == [f"crashy-a2-n{r}" for r in range(nodes)]
    return st


def test_killed_after_recording_the_intent_before_deleting_the_old_pods(jobs, core, namespace, operator, tmp_path):
    _crash_during_restart(jobs, core, namespace, operator, "intent-recorded:status", tmp_path)
    st = jobs.status("crashy")
    assert st["attempt"] == 2 and st["preemptions"] == 1 and st["phase"] == "Restarting"
    assert [p.metadata.name for p in jobs.pods("crashy")] == ["crashy-a1-n0"], "the old pod is still there"
    # The decision's Event was emitted with the intent, before the act the operator died in: the
    # next operator finds the restart recorded and decides nothing new, so it would never be told.
    jobs.wait_events("crashy", "Preemption")
    operator.start()
    _converged(jobs)
    # Counted by the operator that decided it, not again by the one that took over.
    assert operator.total("pretrain_operator_gang_restarts_total") == 0


def test_killed_after_deleting_the_old_pods_before_creating_the_gang(jobs, core, namespace, operator, tmp_path):
    _crash_during_restart(jobs, core, namespace, operator, "old-pods-gone:before-create", tmp_path)
    assert jobs.status("crashy")["attempt"] == 2
    wait_for(lambda: not jobs.pods("crashy", live=False), what="no pods at all between the writes")
    operator.start()
    _converged(jobs)


def test_killed_after_recording_a_failure_before_deleting_the_pods(jobs, namespace, operator, tmp_path):
    operator.stop()
    faulty = OperatorProcess(operator.kubeconfig, tmp_path).start(crash_at=f"failed:status:{namespace}/capped")
    try:
        jobs.create(job_manifest("capped", steps=5000, activeDeadlineSeconds=6))  # fails for good at 6 s
        assert faulty.wait_exit(60) == 17, faulty.log_path.read_text()[-3000:]
    finally:
        faulty.stop()
    st = jobs.status("capped")
    assert st["phase"] == "Failed" and st["completionTime"]
    assert len(jobs.pods("capped")) == 2, "the gang is still there: its deletes were never sent"
    jobs.wait_events("capped", "Failed")
    operator.start()
    wait_for(lambda: not jobs.pods("capped", live=False), timeout=30, what="the next operator to remove the pods")
    st = jobs.status("capped")
    assert st["phase"] == "Failed" and any(cd["type"] == "Failed" and cd["reason"] == "DeadlineExceeded" for cd in st["conditions"])


def test_killed_after_recording_a_notices_checkpoint_request_before_annotating_the_pods(jobs, core, namespace, operator,
                                                                                         pool, tmp_path):
    label, _ = pool
    jobs.create(job_manifest("noticed", steps=5000, interval=100000, step_s=0.1, pool=label))
    jobs.wait_phase("noticed", "Running", timeout=60)
    rank0 = next(p for p in jobs.pods("noticed") if p.metadata.labels["pretrain.dev/node-rank"] == "0")
    operator.stop()
    faulty = OperatorProcess(operator.kubeconfig, tmp_path).start(crash_at=f"notice:status:{namespace}/noticed")
    try:
        # A notice that stays (no reclaim follows here): the request is the only thing that can happen.
        node = core.read_node(rank0.spec.node_name)
        core.patch_node(node.metadata.name, {"spec": {"taints": [t.to_dict() for t in node.spec.taints or []] + [
            {"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"}]}})
        assert faulty.wait_exit(60) == 17, faulty.log_path.read_text()[-3000:]
    finally:
        faulty.stop()
    assert jobs.status("noticed")["checkpointRequestedAt"].startswith("1@")
    assert all("pretrain.dev/checkpoint-request" not in (p.metadata.annotations or {}) for p in jobs.pods("noticed"))
    jobs.wait_events("noticed", "TerminationNotice")
    operator.start()
    # The next operator finds the request recorded and the pods without it: it annotates them, and
    # the trainer saves (before, it took the recorded request for done: no checkpoint on the notice).
    wait_for(lambda: "checkpoint requested: saved step" in jobs.logs(rank0.metadata.name), timeout=30,
             what="the trainer to serve the request")
    st = jobs.wait("noticed", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) > 0, timeout=30,
                   what="the checkpoint in status")
    assert st["attempt"] == 1 and st["phase"] == "Running"
    assert [e.reason for e in jobs.events("noticed")].count("TerminationNotice") == 1


def test_a_second_operator_waits_while_the_first_holds_the_lease(operator, tmp_path):
    second = OperatorProcess(operator.kubeconfig, tmp_path)
    try:
        with pytest.raises(RuntimeError, match="did not become leader"):
            second.start(leader_timeout=10)  # 2.5x the Lease duration: the first keeps renewing it
    finally:
        second.stop()
    # It says whom it waits for (before: nothing at all, an operator that seemed to do nothing).
    assert "waiting for the leader Lease default/pretrain-operator, held by " in second.log_path.read_text()
    assert operator.metrics().get("pretrain_operator_leader") == 1.0


def test_a_setting_of_the_wrong_kind_stops_the_operator_at_once_naming_it():
    r = subprocess.run([sys.executable, "-m", "pretrain_operator"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PRETRAIN_OPERATOR_BIND_ADDRESS="localhost", KUBECONFIG="/nonexistent"))
    assert r.returncode == 2, r.stderr
    assert "bad settings" in r.stderr and "bind_address" in r.stderr and "'localhost' does not appear to be an IPv4 or IPv6 address" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_an_operator_bound_to_ipv6_answers_its_liveness_probe_and_scrapes_there(operator, tmp_path):
    # An IPv6-only cluster's kubelet probes and Prometheus reach the pod's IPv6 address, which the
    # fixed 0.0.0.0 did not listen on: the pod was restarted for ever by its liveness probe.
    standby = OperatorProcess(operator.kubeconfig, tmp_path)
    try:
        standby.start(lead=False, PRETRAIN_OPERATOR_BIND_ADDRESS="::")
        with urllib.request.urlopen(f"http://[::1]:{standby.health_port}/healthz", timeout=5) as r:
            assert r.status == 200
        assert standby.total("pretrain_operator_leader") == 0  # scraped at [::1]; the first operator leads
    finally:
        standby.stop()


def test_a_clean_stop_hands_the_lease_back_at_once(api, operator):
    # A stopped operator's successor need not wait out the Lease (docs/operations.md).
    from pretrain_operator.kubeapi import KubeAPI
    path = "/apis/coordination.k8s.io/v1/namespaces/default/leases/pretrain-operator"
    assert KubeAPI(api).get(path)["spec"]["holderIdentity"]
    operator.stop()
    try:
        assert KubeAPI(api).get(path)["spec"]["holderIdentity"] == ""
    finally:
        operator.start()


def test_a_leader_cut_off_from_the_api_server_stops_acting_before_another_may_take_its_lease(api, namespace):
    # Another replica takes the Lease once it has gone unrenewed for its duration; the cut-off
    # leader once went on acting for as long as it was cut off (two leaders acting at once).
    import time

    from kubernetes import client

    from pretrain_operator.kubeapi import KubeAPI
    from pretrain_operator.leader import LeaderElector
    elector = LeaderElector(api, namespace, "cut-off", duration_s=3.0, renew_s=0.2)
    elector.start()
    try:
        wait_for(elector.leading, timeout=10, what="the Lease")
        nowhere = client.Configuration()
        nowhere.host = "http://127.0.0.1:9"  # nothing listens: every request fails at once
        elector.kube = KubeAPI(client.ApiClient(nowhere))
        t0 = time.monotonic()
        wait_for(lambda: not elector.is_leader.is_set(), timeout=10, what="the cut-off leader to step down")
        assert time.monotonic() - t0 < 3.0  # within the Lease's duration
        assert not elector.leading()
    finally:
        elector.stopped.set()


def test_a_replica_whose_lease_renewal_hangs_says_it_does_not_lead_and_drops_its_jobs_series_and_children(api, crd, namespace):
    # A renewal on a connection the API server never answers (half-open after its failover): the
    # leader gauge stayed 1 (set after each try, which never returned), so PretrainOperatorNoLeader
    # kept quiet; and a replica that no longer leads exported its jobs' series unchanged for ever
    # (a deleted job's Failed phase kept PretrainJobFailed firing, jobs counted by two replicas).
    import socket

    from kubernetes import client
    from prometheus_client import REGISTRY

    from pretrain_operator.controller import Controller
    from pretrain_operator.kubeapi import KubeAPI
    from pretrain_operator.leader import LeaderElector
    from pretrain_operator.settings import OperatorSettings
    elector = LeaderElector(api, namespace, "hangs", duration_s=3.0, renew_s=0.2)
    elector.start()
    ctl = Controller(api, OperatorSettings(metrics_port=0, health_port=0, workers=1), elector)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are accepted by the kernel, and never answered
    try:
        wait_for(elector.leading, timeout=10, what="the Lease")
        assert REGISTRY.get_sample_value("pretrain_operator_leader") == 1.0
        Jobs(api, namespace).create(job_manifest("seen", steps=10, suspend=True), claim=False)
        series = {"namespace": namespace, "pretrain_job": "seen", "phase": "Suspended"}

        def reconciled():  # the running operator may write the same status first (409: read again)
            try:
                ctl.reconcile(namespace, "seen")
            except client.ApiException as e:
                if e.status != 409:
                    raise
            return REGISTRY.get_sample_value("pretrain_operator_job_phase", series) == 1.0
        wait_for(reconciled, timeout=20, what="this replica to export the job's series")
        assert (namespace, "seen") in ctl.children
        silent_cfg = client.Configuration()
        silent_cfg.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        elector.kube = KubeAPI(client.ApiClient(silent_cfg))
        wait_for(lambda: REGISTRY.get_sample_value("pretrain_operator_leader") == 0.0, timeout=10,
                 what="the gauge to say this replica does not lead")
        assert elector.is_leader.is_set()  # its renewal hangs still: the gauge does not wait for it
        ctl.start()
        ctl.queue.add((namespace, "seen"))
        wait_for(lambda: REGISTRY.get_sample_value("pretrain_operator_job_phase", series) is None, timeout=10,
                 what="the job's series to go from a replica that does not lead")
        assert REGISTRY.get_sample_value("pretrain_operator_jobs", {"phase": "Suspended"}) == 0.0
        # Nor does it keep what it knew of the job's children: the leader may change them meanwhile.
        assert (namespace, "seen") not in ctl.children
    finally:
        elector.stopped.set()
        ctl.stopped.set()
        ctl.pool.shutdown()
        silent.close()


def test_the_lease_expires_by_this_replicas_clock_not_by_the_holders_renew_time(api, namespace):
    # The holder stamps renewTime with its own clock. One an hour behind made every renewal look
    # expired to a follower, which took the Lease from a live leader (two leaders acting at once).
    import datetime as dt
    import threading
    import time

    from pretrain_operator.kubeapi import KubeAPI
    from pretrain_operator.leader import LeaderElector, _stamp
    kube, path = KubeAPI(api), f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    kube.create(path, {"metadata": {"name": "skewed"}, "spec": {"holderIdentity": "behind", "leaseDurationSeconds": 2}})
    alive = threading.Event()
    alive.set()

    def renew_an_hour_behind():
        while alive.is_set():
            lease = kube.get(f"{path}/skewed")
            lease["spec"]["renewTime"] = _stamp(dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
            kube.replace(f"{path}/skewed", lease)
            time.sleep(0.3)
    holder = threading.Thread(target=renew_an_hour_behind, daemon=True)
    holder.start()
    follower = LeaderElector(api, namespace, "skewed", duration_s=2.0, renew_s=0.2)
    follower.start()
    try:
        time.sleep(5)  # 2.5 of the Lease's durations: the holder renews all along
        assert not follower.is_leader.is_set() and follower.holder == "behind"
        alive.clear()
        holder.join(5)
        t0 = time.monotonic()
        wait_for(follower.leading, timeout=10, what="the follower to take the Lease the holder no longer renews")
        assert time.monotonic() - t0 >= 1.5  # not before the Lease's duration without a renewal
    finally:
        alive.clear()
        follower.stopped.set()


def test_a_spec_an_older_operator_does_not_understand_is_said_once_and_its_job_left_alone(jobs, api, namespace, operator, monkeypatch):
    # The upgrade applies the new CRD first: an operator whose own upgrade lags (or failed) reads
    # fields it does not know. It said so only in its log, once a minute, and the jobs looked managed.
    from pydantic import ConfigDict, create_model

    from pretrain_operator import api as papi
    from pretrain_operator.controller import Controller
    from pretrain_operator.settings import OperatorSettings
    # This operator's spec model without `lora`: an older version's.
    older = create_model("PretrainJobSpec", __config__=ConfigDict(extra="forbid", populate_by_name=True),
                         **{k: (f.annotation, f) for k, f in papi.PretrainJobSpec.model_fields.items() if k != "lora"})
    operator.stop()
    ctl = Controller(api, OperatorSettings(metrics_port=0, health_port=0))
    try:
        monkeypatch.setattr(papi, "PretrainJobSpec", older)
        jobs.create(job_manifest("newer", steps=10, lora={"rank": 4}), claim=False)
        assert ctl.reconcile(namespace, "newer") == 60.0
        assert ctl.reconcile(namespace, "newer") == 60.0  # said once
        st = jobs.status("newer")
        assert st["message"].startswith("spec not understood by this operator version (lora: Extra inputs are not permitted")
        assert "upgrade the operator" in st["message"] and not st.get("attempt") and not jobs.pods("newer", live=False)
        assert [e.reason for e in jobs.events("newer")] == ["SpecNotUnderstood"]
    finally:
        monkeypatch.undo()
        ctl.stopped.set()
        ctl.pool.shutdown()
        operator.start()
    st = jobs.wait_phase("newer", "Succeeded", timeout=90)  # the upgraded operator (this one) runs it
    assert st["attempt"] == 1


def test_a_status_decided_from_a_stale_read_is_refused_and_decided_again_from_a_new_one(jobs, api, core, namespace, operator, monkeypatch):
    # Two writers: this operator reads the job at attempt 1 and decides a restart (attempt 2);
    # before it writes, another (a replica that took the Lease over a paused leader) has recorded
    # attempt 3. Written over it, attempt 3 and a preemption would be lost and a gang of attempt 2
    # made; the write carries the resourceVersion read, so it is refused and decided again.
    from kubernetes import client

    from pretrain_operator import api as papi
    from pretrain_operator import reconcile
    from pretrain_operator.controller import Controller
    from pretrain_operator.settings import OperatorSettings
    jobs.create(job_manifest("stale", steps=500))
    jobs.wait_phase("stale", "Running", timeout=60)
    operator.stop()
    core.delete_namespaced_pod("stale-a1-n1", namespace, grace_period_seconds=0)  # a preemption
    wait_for(lambda: len(jobs.pods("stale")) == 1, what="the preempted pod to go")
    decide, other = reconcile.decide, []

    def decide_then_another_writer_records_attempt_3(observed):
        plan = decide(observed)
        if not other:
            st = plan.status
            assert st["attempt"] == 2 and st["preemptions"] == 1  # this operator's decision
            other.append({**st, "attempt": 3, "preemptions": 2})
            jobs.custom.patch_namespaced_custom_object_status(papi.GROUP, papi.VERSION, namespace, papi.PLURAL, "stale",
                                                              {"status": other[0]})
        return plan
    monkeypatch.setattr(reconcile, "decide", decide_then_another_writer_records_attempt_3)
    ctl = Controller(api, OperatorSettings(metrics_port=0, health_port=0))
    try:
        with pytest.raises(client.ApiException) as refused:
            ctl.reconcile(namespace, "stale")
        assert refused.value.status == 409
        st = jobs.status("stale")
        assert (st["attempt"], st["preemptions"]) == (3, 2)  # the other writer's record stands
        ctl.reconcile(namespace, "stale")  # decided again, from attempt 3: nothing counted twice
        st = jobs.status("stale")
        assert (st["attempt"], st["preemptions"], st["failures"]) == (3, 2, 0)
    finally:
        ctl.stopped.set()
        ctl.pool.shutdown()
    assert not jobs.pods("stale", attempt=2, live=False)
    monkeypatch.undo()
    operator.start()
    st = jobs.wait_phase("stale", "Running", timeout=90, attempt=3)
    assert (st["attempt"], st["preemptions"]) == (3, 2)
    assert sorted(p.metadata.name for p in jobs.pods("stale")) == ["stale-a3-n0", "stale-a3-n1"]
