"""What the operator's watches ask the API server for: the pods of PretrainJobs only (by label
selector, so that the other pods of a shared cluster never reach the operator), listed in pages.
kopf applies a handler's own `labels=` filter after the events arrive, so the selector has to be in
kopf's watching settings; these tests read it back through kopf's own resolution, the one its
LIST and WATCH requests use. (That pod events of jobs still arrive is what every operator test
on the local cluster relies on.)"""

from __future__ import annotations

import time

import kopf

from pretrain_operator import contract as c
from pretrain_operator.handlers import configure
from pretrain_operator.settings import OperatorSettings
from tests.helpers import wait_for

PODS = kopf.Resource("", "v1", "pods", kind="Pod", namespaced=True)
NODES = kopf.Resource("", "v1", "nodes", kind="Node", namespaced=False)


def _kopf_settings(**ours) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    configure(settings, OperatorSettings(**ours))
    return settings


def test_the_pod_watch_asks_the_api_server_for_the_pods_of_pretrainjobs_only():
    selectors = _kopf_settings().watching.label_selectors
    assert list(selectors.collect(PODS)) == [c.LABEL_JOB]
    assert list(selectors.collect(NODES)) == []  # every node: a lost one is a preemption of its pods


def test_the_first_lists_come_in_pages():
    assert _kopf_settings().watching.chunk_size == 500
    assert _kopf_settings(watch_list_chunk=0).watching.chunk_size == 0


def test_a_deleted_node_wakes_its_jobs_once_and_is_forgotten():
    # Spot and Karpenter nodes get new names: the node -> jobs map kept every node a job ever ran
    # on, and a node event of an old name woke jobs long gone from it.
    from kubernetes import client

    from pretrain_operator.controller import Controller
    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0))
    try:
        ctl.on_pod({"metadata": {"name": "j-a1-n0", "namespace": "ml", "labels": {c.LABEL_JOB: "j"}}, "spec": {"nodeName": "spot-7"}})
        assert ctl.queue.get(timeout=1) == ("ml", "j")
        ctl.queue.done(("ml", "j"))
        node = {"metadata": {"name": "spot-7"}}
        ctl.on_node(node, deleted=False)
        assert ctl.queue.get(timeout=1) == ("ml", "j")  # a node's change wakes the jobs with pods there
        ctl.queue.done(("ml", "j"))
        ctl.on_node(node, deleted=True)
        assert ctl.queue.get(timeout=1) == ("ml", "j") and "spot-7" not in ctl.node_jobs and "spot-7" not in ctl.nodes
    finally:
        ctl.pool.shutdown()


def test_the_pod_watch_remembers_how_a_pod_ended_disrupted_or_finished():
    # A pod may be gone before the reconcile lists it: evicted (its DisruptionTarget says why), or
    # finished and then deleted by PodGC once its node went (its Succeeded state says it is no
    # preemption). A pod seen only running leaves nothing behind.
    from kubernetes import client

    from pretrain_operator.controller import Controller
    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0))
    meta = {"namespace": "ml", "labels": {c.LABEL_JOB: "j"}}
    running = {"metadata": {**meta, "name": "j-a1-n0"}, "spec": {}, "status": {"phase": "Running"}}
    done = {"metadata": {**meta, "name": "j-a1-n1"}, "spec": {},
            "status": {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 0}}}]}}
    evicted = {"metadata": {**meta, "name": "j-a1-n2"}, "spec": {},
               "status": {"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True"}]}}
    try:
        for p in (running, done, evicted):
            ctl.on_pod(p)
        assert ctl.last_seen[("ml", "j")] == {"j-a1-n1": done, "j-a1-n2": evicted}
        # Deleted by the operator (no DisruptionTarget), its trainer ended (exit 83 with its report):
        # its kubelet deletes it at once, and the report was gone before the next pass.
        saved = {"metadata": {**meta, "name": "j-a1-n4", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {},
                 "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 83}}}]}}
        going = {"metadata": {**meta, "name": "j-a1-n5", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {},
                 "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}}
        ctl.on_pod(saved)
        ctl.on_pod(going)
        assert sorted(ctl.last_seen[("ml", "j")]) == ["j-a1-n1", "j-a1-n2", "j-a1-n4"]
        del ctl.last_seen[("ml", "j")]["j-a1-n4"]
        # A sidecar keeps it Running after its trainer exited 0: finished all the same. Only what
        # decide reads is kept (a finished job's pods stayed whole in memory until its deletion).
        meshed = {"metadata": {**meta, "name": "j-a1-n3", "annotations": {"big": "x" * 10000}}, "spec": {"nodeName": "n", "containers": []},
                  "status": {"phase": "Running", "containerStatuses": [done["status"]["containerStatuses"][0],
                                                                       {"name": "istio-proxy", "state": {"running": {}}}]}}
        ctl.on_pod(meshed)
        assert ctl.last_seen[("ml", "j")]["j-a1-n3"] == {"metadata": {**meta, "name": "j-a1-n3"}, "spec": {"nodeName": "n"},
                                                         "status": meshed["status"]}
        # Once the job is finished (its phase written): forgotten, and no more kept.
        # Only the last attempts' (decide reads the replaced attempt's): a job preempted every hour
        # kept every evicted pod it ever had.
        for a in (2, 3, 4, 5):
            ctl.on_pod({"metadata": {**meta, "name": f"j-a{a}-n0", "labels": {c.LABEL_JOB: "j", c.LABEL_ATTEMPT: str(a)}},
                        "spec": {}, "status": evicted["status"]})
        assert sorted(ctl.last_seen[("ml", "j")]) == ["j-a3-n0", "j-a4-n0", "j-a5-n0"]
        # The job deleted and applied again (another uid): its predecessor's pods go, and do not
        # prune the new job's attempts.
        ctl.on_pod({"metadata": {**meta, "name": "j-a1-n0", "labels": {c.LABEL_JOB: "j", c.LABEL_ATTEMPT: "1", c.LABEL_JOB_UID: "new"}},
                    "spec": {}, "status": evicted["status"]})
        assert sorted(ctl.last_seen[("ml", "j")]) == ["j-a1-n0"] and ctl._last_seen(("ml", "j")) == ctl.last_seen[("ml", "j")]
        # A deleted job's pod ending late (stuck Terminating), its deletion not seen by this
        # operator (started since): the live job's memos stay, or its finished rank, removed
        # since, would read as deleted (a preemption).
        ctl.on_job(("ml", "j"), "new")
        ctl.on_pod({"metadata": {**meta, "name": "j-a2-n0", "labels": {c.LABEL_JOB: "j", c.LABEL_ATTEMPT: "2", c.LABEL_JOB_UID: "old"}},
                    "spec": {}, "status": evicted["status"]})
        assert sorted(ctl.last_seen[("ml", "j")]) == ["j-a1-n0"]
        from pretrain_operator import reconcile
        ctl._observe_metrics("ml", "j", {"metadata": {}, "status": {}}, reconcile.Plan(status={"phase": "Succeeded"}))
        assert ("ml", "j") not in ctl.last_seen
        ctl.on_pod(done)
        assert ("ml", "j") not in ctl.last_seen
    finally:
        ctl.pool.shutdown()


def test_a_deleted_job_is_forgotten_by_a_standby_that_never_reconciles_it():
    # A standby (not leading) never reads the 404 that makes the leader forget a job: it kept every
    # deleted job's pods, node entries and queue key (polled every second) until it led.
    from kubernetes import client

    from pretrain_operator.controller import Controller

    class Standby:
        def leading(self) -> bool:
            return False

    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0, workers=1), Standby())
    key = ("ml", "j")

    def pod(name: str, uid: str) -> dict:
        return {"metadata": {"name": name, "namespace": "ml", "labels": {c.LABEL_JOB: "j", c.LABEL_JOB_UID: uid, c.LABEL_ATTEMPT: "1"}},
                "spec": {"nodeName": "spot-1"},
                "status": {"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True"}]}}
    try:
        ctl.on_job(key, "old")
        ctl.on_pod(pod("j-a1-n0", "old"))
        assert ctl.last_seen[key] and ctl.node_jobs == {"spot-1": {key}}
        ctl.start()  # its worker polls the key while it does not lead
        ctl.on_job_deleted(key, "old")
        assert key not in ctl.last_seen and not ctl.node_jobs
        # The garbage collector's deletion of its pods comes after: not remembered.
        ctl.on_pod(pod("j-a1-n1", "old"))
        assert key not in ctl.last_seen and not ctl.node_jobs
        # The standby's worker drops the key instead of polling it for ever.
        wait_for(lambda: not len(ctl.queue), timeout=5, interval=0.1, what="the deleted job's key dropped")
        # Applied again under the name: the new job's pods are its own, and its key is polled.
        ctl.on_job(key, "new")
        ctl.on_pod(pod("j-a1-n0", "new"))
        assert sorted(ctl.last_seen[key]) == ["j-a1-n0"] and ctl.node_jobs == {"spot-1": {key}}
        # kopf watches each object on its own: the old job's deletion may be seen after the new
        # job. It forgets nothing of the new one, and the old one's last pods are still not kept.
        ctl.on_job_deleted(key, "old")
        ctl.on_pod(pod("j-a1-n2", "old"))
        assert sorted(ctl.last_seen[key]) == ["j-a1-n0"] and ctl.node_jobs == {"spot-1": {key}}
        time.sleep(1.5)
        assert len(ctl.queue) == 1  # still polled
    finally:
        ctl.stop(timeout=5)
        ctl.pool.shutdown()


def test_a_job_read_gone_is_not_read_again_until_an_event_of_it():
    # After the 404 that forgets a job, its key came back at every resync for ever: a GET every 30 s
    # for each job ever deleted in the operator's lifetime.
    from kubernetes import client

    from pretrain_operator import metrics
    from pretrain_operator.controller import Controller

    class Gone:
        def get(self, path: str, **_):
            raise client.ApiException(status=404, reason="Not Found")

    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0, workers=1, resync_s=0.2))
    ctl.kube = Gone()
    before = metrics.RECONCILES.labels("ok")._value.get()
    try:
        ctl.start()
        ctl.on_job(("ml", "j"), "u1")
        wait_for(lambda: metrics.RECONCILES.labels("ok")._value.get() == before + 1, timeout=5, interval=0.05,
                 what="the pass that reads the 404")
        time.sleep(1.0)  # five resyncs
        assert metrics.RECONCILES.labels("ok")._value.get() == before + 1 and not len(ctl.queue)
        assert ("ml", "j") not in ctl.job_uids
    finally:
        ctl.stop(timeout=5)
        ctl.pool.shutdown()


def test_a_job_deleted_and_applied_again_keeps_the_new_one_whatever_order_its_events_come_in():
    # kopf watches each object on its own: the new job's ADDED, a late MODIFIED of the old one and
    # the old one's DELETED may interleave; a 404 read may race the new job's event.
    from kubernetes import client

    from pretrain_operator.controller import DELETED, Controller

    key = ("ml", "j")
    evicted = {"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True"}]}

    def pod(name: str, uid: str) -> dict:
        return {"metadata": {"name": name, "namespace": "ml", "labels": {c.LABEL_JOB: "j", c.LABEL_JOB_UID: uid, c.LABEL_ATTEMPT: "1"}},
                "spec": {}, "status": evicted}

    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0))
    try:
        ctl.on_job(key, "a")
        ctl.on_job(key, "b")  # applied again
        ctl.on_pod(pod("j-a1-n0", "b"))
        ctl.on_job(key, "a")  # a late event of the old one
        ctl.on_job_deleted(key, "a")
        assert ctl.job_uids[key] == {"b"} and sorted(ctl.last_seen[key]) == ["j-a1-n0"]
        ctl.on_job(key, "a")  # later still: a deleted job is not live again
        assert ctl.job_uids[key] == {"b"}

        class ReadGoneWhileApplied:  # the GET answers 404 for the old job; the new one's event comes meanwhile
            def get(self, path: str, **_):
                ctl.on_job(key, "c")
                raise client.ApiException(status=404, reason="Not Found")
        ctl.kube = ReadGoneWhileApplied()
        ctl.on_job_deleted(key, "b")
        ctl.on_job(key, "x")  # a job whose deletion the watch missed (it restarted)
        ctl.on_pod(pod("j-a1-n1", "x"))
        assert ctl.reconcile(*key) == DELETED
        assert ctl.job_uids[key] == {"c"}, "the job applied during the read is kept"
        ctl.on_pod(pod("j-a1-n2", "x"))  # the read-gone job's last pods: not remembered
        assert "j-a1-n2" not in ctl.last_seen.get(key, {})
    finally:
        ctl.pool.shutdown()


def test_a_stopping_operator_hands_its_lease_back_only_once_its_passes_in_flight_ended():
    # Released at once, a pass still writing (a gang's pods being created) acted beside the standby
    # that took the Lease over.
    import threading

    from kubernetes import client

    from pretrain_operator.controller import Controller

    answered = threading.Event()
    reading = threading.Event()

    class Slow:
        def get(self, path: str, **_):
            reading.set()
            answered.wait(30)
            raise client.ApiException(status=404, reason="Not Found")

    ctl = Controller(client.ApiClient(), OperatorSettings(metrics_port=0, health_port=0, workers=1))
    ctl.kube = Slow()
    try:
        ctl.start()
        ctl.on_job(("ml", "j"), "u")
        assert reading.wait(5)
        assert ctl.stop(timeout=0.5) is False  # a pass in flight: the Lease is left to expire
        answered.set()
        assert ctl.stop(timeout=5) is True
    finally:
        answered.set()
        ctl.pool.shutdown()
