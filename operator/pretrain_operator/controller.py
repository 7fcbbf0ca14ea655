"""The reconcile loop's I/O: observe a job and its children, `reconcile.decide`, write the status
(once, and first: the intent is on record before any child is touched), emit the decision's Events,
act.

Workers take job keys from a WorkQueue fed by watch events (jobs, their pods, nodes) and by
requeues; only the leader acts. Every action is idempotent by deterministic names, so a killed
operator resumes where it stopped (tests/test_operator_crash.py kills it between the writes).
"""

from __future__ import annotations

import copy
import ctypes
import datetime as dt
import logging
import math
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client
from pydantic import ValidationError

from . import api, classify, contract as c, metrics, reconcile, render
from .kubeapi import STRATEGIC, KubeAPI, api_message, core_path
from .settings import OperatorSettings
from .workqueue import WorkQueue

log = logging.getLogger("pretrain_operator")


class Controller:
    def __init__(self, api_client: client.ApiClient, settings: OperatorSettings, leader=None):
        self.kube = KubeAPI(api_client)
        self.settings = settings
        self.queue = WorkQueue()
        self.leader = leader
        self.nodes: dict[str, dict] = {}          # node cache, fed by the node watch
        self.node_jobs: dict[str, set] = {}       # node name -> job keys with pods there
        self.pool = ThreadPoolExecutor(max_workers=max(settings.workers, 8), thread_name_prefix="create")
        self.stopped = threading.Event()
        self.reconciles = 0
        self.last_progress: dict = {}
        self.progress_misses: dict = {}  # job key -> failed progress reads in a row (a warning at PROGRESS_MISSES_WARN)
        self.progress_read: dict = {}  # job key -> (uid, attempt, when, progress) of the last read, if it succeeded
        self.phases: dict = {}
        self.running = 0  # jobs in phase Running, counted with the phase gauge
        self.errors: dict = {}  # key -> consecutive errors, for exponential back-off
        self.children: dict = {}  # job key -> (uid, generation, config, when read) once its Service and ConfigMap exist
        self.last_seen: dict = {}  # job key -> {pod name: the pod last seen disrupted (DisruptionTarget) or finished}
        self.memo_lock = threading.Lock()
        self.create_errors: dict = {}  # job key -> (uid, attempt, HTTP status, message) of its last refused pod create
        self.probe_refusals: dict = {}  # job key -> (refused passes in a row, monotonic time of the last) of capacity probes
        self.job_uids: dict = {}  # job key -> uids of the jobs the watch saw live under that key, not yet deleted
        self.dead_uids: dict = {}  # uid -> monotonic time the watch saw that job deleted (kept GONE_KEEP_S)
        self.workers: list[threading.Thread] = []

    # ---- inputs from the watches ------------------------------------------------------------------
    def on_node(self, node: dict, deleted: bool) -> None:
        name = node["metadata"]["name"]
        if deleted:
            # Its jobs are told once, and the name forgotten: spot nodes' names are rarely reused,
            # and the map grew by every node a job ever ran on.
            with self.memo_lock:
                self.nodes.pop(name, None)
                keys = self.node_jobs.pop(name, set())
        else:
            self.nodes[name] = node
            with self.memo_lock:
                keys = set(self.node_jobs.get(name, ()))
        for key in keys:
            self.queue.add(key)

    def on_job(self, key: tuple[str, str], uid: str | None = None) -> None:
        # A job this operator has not reconciled yet (new, or new to it) goes before the re-reconciles
        # its peers' pod events queue: in a burst of applies, gangs are created first, bookkeeping after.
        if uid:
            with self.memo_lock:
                if uid not in self.dead_uids:  # a late event of a job seen deleted
                    self.job_uids.setdefault(key, set()).add(uid)
        self.queue.add(key, first=key not in self.phases)

    def on_job_deleted(self, key: tuple[str, str], uid: str) -> None:
        """The watch saw the job deleted: forgotten on every replica, and its pods' last events (the
        garbage collector's deletions, a grace period's worth) are not remembered. A standby never
        reconciles the 404 that forgets a job, so it kept every deleted job's pods, node entries and
        queue key until it led. kopf watches each object on its own: a job deleted and applied again
        under its name may be seen new before the old one is seen gone, so this is by uid."""
        self._forget_uids(key, {uid})
        self.queue.add(key)  # the leader's pass reads the 404 (or the new job)

    def _forget_uids(self, key: tuple[str, str], uids: set) -> None:
        """These jobs of the key are deleted: their pods' events are not remembered from now on, and
        the key's memos go unless a newer job of the name lives (seen in either order)."""
        now = time.monotonic()
        with self.memo_lock:
            self.dead_uids = {u: t for u, t in self.dead_uids.items() if now - t < GONE_KEEP_S}
            self.dead_uids.update(dict.fromkeys(uids, now))
            live = self.job_uids.get(key, set()) - uids
            if live:
                self.job_uids[key] = live
                return
            self.job_uids.pop(key, None)
            self._forget_job(key)

    def _forget_job(self, key: tuple[str, str]) -> None:
        """Nothing of a deleted job outlives it (or reaches a new job of its name). Called with
        memo_lock held: the watches' threads write these too."""
        self._forget_metrics(key)
        self.last_progress.pop(key, None)
        for memo in (self.create_errors, self.children, self.progress_misses, self.progress_read, self.probe_refusals):
            memo.pop(key, None)
        self.last_seen.pop(key, None)
        for node in [n for n, keys in self.node_jobs.items() if key in keys]:
            self.node_jobs[node].discard(key)
            if not self.node_jobs[node]:
                del self.node_jobs[node]

    def on_pod(self, pod: dict) -> None:
        job = (pod["metadata"].get("labels") or {}).get(c.LABEL_JOB)
        if not job:
            return
        key = (pod["metadata"]["namespace"], job)
        # Also a pod being deleted whose trainer has ended (the operator's own deletions add no
        # DisruptionTarget): its kubelet deletes it at once, and rank 0's final report (its SIGTERM
        # checkpoint) was gone before the next pass listed the pods.
        ended = classify.finished(pod) or classify.disrupted(pod) is not None or \
            (bool(pod["metadata"].get("deletionTimestamp")) and classify.terminated(pod) is not None)
        node = (pod.get("spec") or {}).get("nodeName")
        with self.memo_lock:  # one section with the deletion's check: on_job_deleted may run meanwhile
            if pod["metadata"]["labels"].get(c.LABEL_JOB_UID) in self.dead_uids:
                return  # a deleted job's pod, going with it
            if ended:
                self._remember(key, pod)
            if node:
                self.node_jobs.setdefault(node, set()).add(key)
        self.queue.add(key)

    def _remember(self, key: tuple[str, str], pod: dict) -> None:
        """Keep how the pod ended, for decide (Observed.last_seen): what it reads of it only (a
        finished job's pods were kept whole until its deletion), its job's last attempts only (a
        job preempted every hour kept every evicted pod it ever had), nothing for a finished job.
        Called with memo_lock held (against the pop once the job is finished, _observe_metrics)."""
        md = pod["metadata"]
        slim = {"metadata": {k: md[k] for k in ("name", "namespace", "labels", "deletionTimestamp") if k in md},
                "spec": {k: v for k, v in (pod.get("spec") or {}).items() if k == "nodeName"}, "status": pod.get("status") or {}}
        if self.phases.get(key) != "Succeeded":  # a Failed job's pods still save on their way out
            uid = (md.get("labels") or {}).get(c.LABEL_JOB_UID)
            live, kept = self.job_uids.get(key) or set(), self.last_seen.get(key, {})
            if uid not in live and any(p["metadata"]["labels"].get(c.LABEL_JOB_UID) in live for p in kept.values()):
                # A deleted job's pod (its deletion unseen: this operator started since, or it was
                # seen GONE_KEEP_S ago; its pod stuck Terminating ends late) would replace the live
                # job's memos: a finished rank removed since would read as deleted, a preemption.
                return
            # Another job of that name (deleted and applied again): its pods are not this one's.
            memo = {n: p for n, p in self.last_seen.get(key, {}).items() if p["metadata"]["labels"].get(c.LABEL_JOB_UID) == uid}
            memo[md["name"]] = slim
            newest = max(reconcile.attempt_of(p) for p in memo.values())
            self.last_seen[key] = {n: p for n, p in memo.items() if reconcile.attempt_of(p) >= newest - 2}

    def _last_seen(self, key: tuple[str, str]) -> dict:
        with self.memo_lock:  # a copy: the watch thread writes it meanwhile
            return dict(self.last_seen.get(key, {}))

    # ---- workers ------------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.settings.workers):
            self.workers.append(threading.Thread(target=self._worker, daemon=True, name=f"reconcile-{i}"))
            self.workers[-1].start()
        if self.settings.memory_trim_s > 0:
            threading.Thread(target=self._trim_memory, daemon=True, name="memory-trim").start()

    def stop(self, timeout: float) -> bool:
        """Take no more work and wait, at most `timeout` s, for the passes in flight to end; whether
        they did. A replica that handed its Lease back while a pass still wrote (a gang's pods being
        created) acted beside the standby that took it over."""
        self.stopped.set()
        self.queue.close()
        deadline = time.monotonic() + timeout
        for t in self.workers:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.workers)

    def _trim_memory(self) -> None:
        """A burst of reconciles (100 jobs applied at once) leaves freed pages in glibc's heaps that
        it keeps until asked: ask after work, so the RSS falls back instead of holding its peak."""
        try:
            trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            return  # not glibc: nothing to ask
        seen = -1
        while not self.stopped.wait(self.settings.memory_trim_s):
            if self.reconciles != seen:
                seen = self.reconciles
                trim(0)

    def _worker(self) -> None:
        while not self.stopped.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            try:
                if self.leader is not None and not self.leader.leading():
                    # Not ours to act on; look again when we lead. Its per-job series go: a replica
                    # that lost the Lease would export them unchanged for ever (a deleted job's
                    # Failed phase firing PretrainJobFailed, jobs counted by two replicas).
                    self._forget_metrics(key)
                    # Nor is what it knew of the job's Service and ConfigMap: the leader meanwhile
                    # may change them, and this replica, leading again, would not read them for a minute.
                    with self.memo_lock:
                        self.children.pop(key, None)
                    if key in self.job_uids:  # a deleted job's key came back every second for ever
                        self.queue.add(key, delay=1.0)
                    continue
                t0 = time.monotonic()
                delay = self.reconcile(*key)
                metrics.RECONCILE_SECONDS.observe(time.monotonic() - t0)
                metrics.RECONCILES.labels("ok").inc()
                if self.errors.pop(key, None):
                    self.queue.forget(key)
                if delay != DELETED:  # a deleted job was read again at every resync for ever
                    self.queue.add(key, delay=next_pass(delay, self.phases.get(key, ""), self.settings))
            except client.ApiException as e:
                # Conflicts and API hiccups are retried with back-off; the next pass re-observes
                # everything, so nothing is lost. (A namespace being deleted answers 403 until the
                # job itself is gone, then the 404 ends it.)
                metrics.RECONCILES.labels("error").inc()
                n = self.errors[key] = self.errors.get(key, 0) + 1
                log.warning("reconcile %s/%s: %s %s: %s (retry %d)", key[0], key[1], e.status, e.reason,
                            api_message(e), n)
                self.queue.backoff(key, min(0.5 * 2 ** (n - 1), 30.0))
            except Exception:  # noqa: BLE001
                metrics.RECONCILES.labels("error").inc()
                n = self.errors[key] = self.errors.get(key, 0) + 1
                log.exception("reconcile %s/%s failed (retry %d)", key[0], key[1], n)
                self.queue.backoff(key, min(0.5 * 2 ** (n - 1), 30.0))
            finally:
                self.reconciles += 1  # racy by design: only whether it changed matters
                self.queue.done(key)

    # ---- one reconcile --------------------------------------------------------------------------------
    def reconcile(self, ns: str, name: str) -> float | None:
        # Observe.
        with self.memo_lock:
            known = set(self.job_uids.get((ns, name), ()))  # before the read: each is deleted if it reads 404
        try:
            job = self.kube.get(_job_path(ns, name))
        except client.ApiException as e:
            if e.status == 404:
                # Also when the watch missed its deletion (a watch restarted); a job applied again
                # since the read is kept (its event queued the key again).
                self._forget_uids((ns, name), known)
                return DELETED  # ownerReferences garbage-collect the children
            raise
        if job["metadata"].get("deletionTimestamp"):
            return None
        try:
            spec = api.PretrainJobSpec.model_validate(job.get("spec") or {})
        except ValidationError as e:
            # The CRD schema admits only valid specs; this means a newer CRD than this operator (the
            # upgrade applies the CRD first: an operator whose own upgrade failed). Its gang is left
            # as it is, and the job says so once (status.message, an Event), not only this log.
            # Retried: the operator's upgrade ends it.
            first = e.errors()[0]
            msg = (f"spec not understood by this operator version ({'.'.join(str(x) for x in first['loc'])}: {first['msg']}; "
                   f"{e.error_count()} error(s)): the CRD is newer than the operator; upgrade the operator (docs/install.md)")
            log.error("%s/%s: %s", ns, name, msg)
            if (job.get("status") or {}).get("message") != msg:
                self._write(lambda: self.kube.patch(_job_path(ns, name) + "/status", {"status": {"message": msg}}))
                self._event(job, "Warning", "SpecNotUnderstood", msg)
            return 60.0
        uid = job["metadata"]["uid"]
        # A job with no status was never acted on (the status is written before any child is made),
        # so it has no pods, Service or ConfigMap of ours yet: three reads saved per new job, which
        # is what a burst of new jobs waits on. (Someone else's object of the same name still fails the create;
        # a deleted job's pods still running are looked for, below, by one read.)
        fresh = not job.get("status")
        pods = [] if fresh else self.kube.get(core_path(ns, "pods"), labelSelector=f"{c.LABEL_JOB_UID}={uid}")["items"]
        nodes = {}
        for p in pods:
            nn = (p.get("spec") or {}).get("nodeName")
            if nn and nn not in nodes:
                nodes[nn] = self._node(nn)
                with self.memo_lock:  # the watches' threads read and write it too
                    self.node_jobs.setdefault(nn, set()).add((ns, name))
        probes = [p for p in pods if c.LABEL_PROBE in p["metadata"].get("labels", {})]
        pods = [p for p in pods if c.LABEL_PROBE not in p["metadata"].get("labels", {})]
        # The Service and ConfigMap are re-read once a minute or when the spec changes: only we change them.
        known = self.children.get((ns, name))
        known = known[1:] if known and known[0] == uid else None  # a new job of the name: nothing known
        gen = job["metadata"].get("generation")
        foreign = predecessor = None
        if fresh:
            svc_exists, config_data = False, None
        elif known and known[0] == gen and time.monotonic() - known[2] < 60:
            svc_exists, config_data = True, known[1]
        else:
            svc = self.kube.get_or_none(core_path(ns, "services", name))
            cm = self.kube.get_or_none(core_path(ns, "configmaps", render.config_map_name(name)))
            foreign, predecessor = _not_owned(job, ("Service", svc), ("ConfigMap", cm))
            svc_exists = svc is not None
            config_data = (cm.get("data") or {}).get(c.CONFIG_FILE) if cm is not None else None
        was = job.get("status") or {}
        if predecessor is None and not foreign and was.get("attempt", 0) <= 1 and not was.get("gangCreated") \
                and was.get("phase") not in reconcile.TERMINAL and not spec.suspend:  # about to make its first gang
            predecessor = self._predecessor_pods(ns, name, uid)
        observed = reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=svc_exists,
                                      config_data=config_data, now=dt.datetime.now(dt.timezone.utc),
                                      last_seen={n: p for n, p in self._last_seen((ns, name)).items()
                                                 if p["metadata"]["labels"].get(c.LABEL_JOB_UID) == uid},
                                      foreign=foreign, predecessor=predecessor,
                                      create_error=self._create_error(ns, name, job),
                                      progress_read=self._progress_read((ns, name), job),
                                      probes=probes, probe_image=self.settings.capacity_probe_image)
        # Decide.
        plan = reconcile.decide(observed)
        restarts = plan.status.get("attempt", 0) > was.get("attempt", 0) > 0
        fails = plan.status.get("phase") == "Failed" != was.get("phase")  # a restart past its budget too
        if (restarts or fails) and self._namespace_terminating(ns):
            # Absorbed: deleting a namespace deletes the job's pods before the job, which looks like a
            # preemption (a failure, with no preemption left); a new gang would be refused (403) and
            # the job is about to go too.
            log.info("%s/%s: its namespace is being deleted: no restart", ns, name)
            return None
        self._progress(job, plan, pods)
        # Record (first).
        if plan.status != (job.get("status") or {}):
            # Against the job as read (its resourceVersion): a status decided from a stale read (a
            # second operator acting, the spec changed meanwhile) is refused with 409 and decided
            # again from a new read, never written over a newer one (attempt N over N + 1).
            self._write(lambda: self.kube.patch(_job_path(ns, name) + "/status", {
                "metadata": {"resourceVersion": job["metadata"]["resourceVersion"]},
                "status": _patchable(job.get("status") or {}, plan.status)}))
        # Tell, before acting: the decision is on record now, and an act that raises is retried by a
        # reconcile that finds the intent already recorded and decides nothing new, so Events emitted
        # after it would be lost (as they were when the act failed or the operator died in it).
        for etype, reason, message in plan.events:
            self._event(job, etype, reason, message)
        self._crash_point(plan.stage, "status", job)
        # Act.
        self._act(ns, job, plan)
        cm_obj = plan.update_config or next((o for o in plan.create if o["kind"] == "ConfigMap"), None)
        if (foreign or predecessor) is None and (not known or known[0] != gen or time.monotonic() - known[2] >= 60 or cm_obj):
            # Known as the job's own only: another's (or a deleted job's) was taken for ours, and
            # the next pass made the pods on it.
            self.children[(ns, name)] = (uid, gen, cm_obj["data"][c.CONFIG_FILE] if cm_obj else observed.config_data, time.monotonic())
        self._observe_metrics(ns, name, job, plan)
        if plan.status.get("phase") == "Running":
            # Back for the trainer's progress (status.progress, lastCheckpoint) even when nothing
            # else happens: on a real cluster nothing may touch a running gang for minutes (a
            # kubelet writes an unchanged node status every 5 min), and the resync is 30 s.
            return min(math.inf if plan.requeue_after is None else plan.requeue_after, self._progress_interval())
        return plan.requeue_after

    def _act(self, ns: str, job: dict, plan: reconcile.Plan) -> None:
        # Each kind of write to the pods at once, as the creates are: a notice's checkpoint request
        # reaches a 1000-pod gang in the time of a few requests, not of 1000 (a GCE notice is 30 s).
        def annotate(item: tuple[str, dict]) -> None:
            pod_name, ann = item
            try:
                self._write(lambda: self.kube.patch(core_path(ns, "pods", pod_name), {"metadata": {"annotations": ann}}, STRATEGIC))
                metrics.CHECKPOINT_REQUESTS.labels(next(iter(ann.values())).split("-")[0]).inc()
            except client.ApiException as e:
                if e.status != 404:
                    raise

        def delete(item: tuple[str, dict | None]) -> None:
            pod_name, body = item
            if self._write(lambda: self.kube.delete(core_path(ns, "pods", pod_name), body)) is not None:
                metrics.PODS_DELETED.inc()
        list(self.pool.map(annotate, plan.annotate_pods.items()))
        list(self.pool.map(delete, [(n, None) for n in plan.delete_pods] + [(n, {"gracePeriodSeconds": 0}) for n in plan.force_delete_pods]))
        if plan.delete_pods or plan.force_delete_pods:
            self._crash_point(plan.stage, "deleted", job)
        if plan.update_config is not None:
            cm = plan.update_config
            self._write(lambda: self.kube.replace(core_path(ns, "configmaps", cm["metadata"]["name"]), cm))
        # The whole gang at once (all pods of an attempt together), concurrently with the Service and
        # ConfigMap, which are sent first: a node that sees a pod before its ConfigMap retries the mount.
        key = (ns, job["metadata"]["name"])
        # Capacity probes the API server refused (a quota, most often the one that shrank the gang)
        # are tried again after a back-off, not at every pass of the Running job (every 5 s).
        n, last = self.probe_refusals.get(key, (0, 0.0))
        creates = [o for o in plan.create if not (c.LABEL_PROBE in o["metadata"].get("labels", {})
                                                 and n and time.monotonic() - last < min(5.0 * 2 ** (n - 1), 300.0))]
        creates_pods = any(o["kind"] == "Pod" for o in creates)
        if creates_pods:
            self._crash_point(plan.stage, "before-create", job)
        refused = []

        def create(obj: dict) -> None:
            try:
                self._create(ns, obj)
            except client.ApiException as e:
                # A refused pod is kept for the next pass's decision (status.message and an Event,
                # or PodInvalid), then retried with back-off like any failed write; a refused Service
                # or ConfigMap only retried (its words are not the pods'). A refused capacity probe
                # is only said: the gang runs on, and its pass is no error (a quota that shrank
                # the gang refuses its probes as long as it runs).
                if obj["kind"] == "Pod":
                    refused.append(obj)
                    self.create_errors[key] = (job["metadata"]["uid"], plan.status.get("attempt", 0), e.status, api_message(e))
                if c.LABEL_PROBE not in obj["metadata"]["labels"]:
                    raise
        # The Service and ConfigMap first, then the pods: a pod must not start on another job's
        # config (a deleted job's of the same name, not garbage-collected yet: its create is
        # refused, and no pod is made).
        list(self.pool.map(create, [o for o in creates if o["kind"] != "Pod"]))
        list(self.pool.map(create, [o for o in creates if o["kind"] == "Pod"]))
        if creates_pods and not refused:
            self.create_errors.pop(key, None)
            self.probe_refusals.pop(key, None)
        elif refused:
            self.probe_refusals[key] = (n + 1, time.monotonic())
        if plan.delete_job:
            self._write(lambda: self.kube.delete(_job_path(ns, job["metadata"]["name"]), {
                "propagationPolicy": "Background", "preconditions": {"uid": job["metadata"]["uid"]}}))

    def _create(self, ns: str, obj: dict, retried: bool = False) -> None:
        kind = obj["kind"]
        plural = {"Pod": "pods", "Service": "services", "ConfigMap": "configmaps"}[kind]
        try:
            self._write(lambda: self.kube.create(core_path(ns, plural), obj))
            if kind == "Pod":
                metrics.PODS_CREATED.inc()
        except client.ApiException as e:
            if e.status != 409:
                raise
            # AlreadyExists is success only if it is ours (same controller uid): names are deterministic.
            # Otherwise a refusal like any other (said, retried): most often the child of a deleted
            # job of the same name that garbage collection has not removed yet.
            existing = self.kube.get(core_path(ns, plural, obj["metadata"]["name"]))
            owners = [o["uid"] for o in existing["metadata"].get("ownerReferences") or []]
            job = obj["metadata"]["ownerReferences"][0]
            if job["uid"] in owners:
                return
            if kind == "Pod" and _predecessor(existing, job["name"]) and not self._may_run(existing) and not retried:
                # A deleted job's rank holding this name (attempt 1's) that no longer runs: stuck
                # Terminating on a node gone dark or past its grace period, or finished and not yet
                # collected. Garbage collection waits on its kubelet, maybe for ever, and the new
                # gang's other ranks held their nodes until the start timeout. Removed (only that
                # pod: the uid precondition), as the operator removes its own ranks on lost nodes.
                log.warning("pod %s/%s of a deleted PretrainJob of this name no longer runs but holds the name: removing it",
                            ns, existing["metadata"]["name"])
                try:
                    self._write(lambda: self.kube.delete(core_path(ns, plural, existing["metadata"]["name"]), {
                        "gracePeriodSeconds": 0, "preconditions": {"uid": existing["metadata"]["uid"]}}))
                except client.ApiException as gone:
                    if gone.status not in (404, 409):  # gone meanwhile, or another pod of the name since
                        raise
                return self._create(ns, obj, retried=True)
            raise client.ApiException(status=409, reason=_whose(kind, existing, job["name"]))

    def _create_error(self, ns: str, name: str, job: dict) -> tuple[int, str] | None:
        """The last refused pod create of the job's current attempt (reconcile.Observed.create_error)."""
        # Of this job, not of a deleted one of its name (a job re-applied at once, before the pass
        # that found the old one gone, inherited its PodInvalid and failed without a create).
        got = self.create_errors.get((ns, name))
        if got and got[:2] == (job["metadata"]["uid"], (job.get("status") or {}).get("attempt", 0)):
            return got[2], got[3]
        return None

    # ---- helpers ------------------------------------------------------------------------------------
    def _write(self, fn):
        metrics.API_WRITES.inc()
        return fn()

    def _node(self, name: str) -> dict | None:
        if name in self.nodes:
            return self.nodes[name]
        return self.kube.get_or_none(f"/api/v1/nodes/{name}")

    def _namespace_terminating(self, ns: str) -> bool:
        try:
            got = self.kube.get_or_none(f"/api/v1/namespaces/{ns}") or {}
        except client.ApiException as e:
            if e.status == 403:  # RBAC without namespaces/get (an older chart): restart as before
                return False
            raise
        return bool(got.get("metadata", {}).get("deletionTimestamp"))

    def _event(self, job: dict, etype: str, reason: str, message: str) -> None:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        md = job["metadata"]
        body = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{md['name']}.", "namespace": md["namespace"]},
                "involvedObject": {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "name": md["name"],
                                   "namespace": md["namespace"], "uid": md["uid"]},
                "reason": reason, "message": message[:1024], "type": etype, "firstTimestamp": now, "lastTimestamp": now,
                "count": 1, "source": {"component": "pretrain-operator"}, "reportingComponent": "pretrain-operator",
                "reportingInstance": os.environ.get("HOSTNAME", "local")}
        # The log carries every decision too, for when the Events are gone with their namespace.
        (log.warning if etype == "Warning" else log.info)("%s/%s %s: %s", md["namespace"], md["name"], reason, message)
        try:
            self._write(lambda: self.kube.create(core_path(md["namespace"], "events"), body))
        except client.ApiException as e:
            log.warning("event %s on %s: %s", reason, md["name"], api_message(e))

    def _progress(self, job: dict, plan: reconcile.Plan, pods: list[dict]) -> None:
        """Mirror rank 0's training metrics into status.progress and status.lastCheckpoint."""
        st = plan.status
        if st.get("phase") != "Running":
            return
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        if time.monotonic() - self.last_progress.get(key, 0) < self._progress_interval():
            return
        self.last_progress[key] = time.monotonic()
        rank0 = next((p for p in pods if p["metadata"]["labels"].get(c.LABEL_NODE_RANK) == "0"
                      and int(p["metadata"]["labels"].get(c.LABEL_ATTEMPT, 0)) == st.get("attempt")), None)
        ip = ((rank0 or {}).get("status") or {}).get("podIP")
        self.progress_read.pop(key, None)  # until this read succeeds
        if not ip:
            return
        try:
            m = read_trainer_metrics(ip)
        except Exception as e:  # noqa: BLE001  (the trainer may not serve yet: try at the next pass)
            misses = self.progress_misses[key] = self.progress_misses.get(key, 0) + 1
            # A trainer starts serving within seconds of its pod running; reads that keep failing
            # are a network in the way (a NetworkPolicy, a mesh's mTLS): said once, not every pass.
            (log.warning if misses == PROGRESS_MISSES_WARN else log.debug)(
                "progress of %s/%s: %d reads of %s failed in a row (%s); status.progress and "
                "status.lastCheckpoint are not updated (docs/install.md: the operator must reach the "
                "trainers' port)", key[0], key[1], misses, c.metrics_url(ip), e)
            return
        self.progress_misses.pop(key, None)
        read = dt.datetime.now(dt.timezone.utc)
        now = reconcile.iso(read)
        if math.isfinite(m.get(c.METRIC_STEP, math.nan)):  # a custom trainer's NaN step: no progress
            total = m.get(c.METRIC_TOTAL_STEPS, math.nan)
            prog = {"step": int(m[c.METRIC_STEP]), "totalSteps": int(total) if math.isfinite(total) else job["spec"]["training"]["steps"]}
            # NaN and infinity are not JSON (the API server refuses the whole patch): left out.
            if math.isfinite(m.get(c.METRIC_LOSS, math.nan)):
                prog["loss"] = round(m[c.METRIC_LOSS], 4)
            if math.isfinite(m.get(c.METRIC_TOKENS_PER_SECOND, math.nan)):
                prog["tokensPerSecond"] = round(m[c.METRIC_TOKENS_PER_SECOND], 1)
            if math.isfinite(m.get(c.METRIC_VALIDATION_LOSS, math.nan)) and m.get(c.METRIC_VALIDATION_STEP, 0) > 0:
                prog["validationLoss"] = round(m[c.METRIC_VALIDATION_LOSS], 4)
                prog["validationStep"] = int(m[c.METRIC_VALIDATION_STEP])
            reconcile.set_progress(st, prog, now)
            self.progress_read[key] = (job["metadata"].get("uid"), st.get("attempt"), read, prog)
        if math.isfinite(m.get(c.METRIC_LAST_CHECKPOINT_STEP, 0)) and m.get(c.METRIC_LAST_CHECKPOINT_STEP, 0) > 0:
            step = int(m[c.METRIC_LAST_CHECKPOINT_STEP])
            if (st.get("lastCheckpoint") or {}).get("step") != step:
                reconcile.set_last_checkpoint(st, job["spec"]["checkpoint"]["path"], step,
                                              checkpoint_time(m.get(c.METRIC_LAST_CHECKPOINT_TIME), now))

    def _predecessor_pods(self, ns: str, name: str, uid: str) -> str | None:
        """What a job's first gang waits for: pods of a deleted job of the same name still running
        (their grace period: a trainer writing its last checkpoint, to the same folder when the job
        was applied again as it was). Garbage collection removes the Service and ConfigMap at
        once, the pods after their grace period: the new gang ran beside them, and the new trainer,
        finding the folder held by another job's live trainer, failed for good (exit 85)."""
        old = self.kube.get(core_path(ns, "pods"), labelSelector=f"{c.LABEL_JOB}={name},{c.LABEL_JOB_UID},{c.LABEL_JOB_UID}!={uid}")["items"]
        going = sorted((p for p in old if _predecessor(p, name) is not None and self._may_run(p)), key=lambda p: p["metadata"]["name"])
        if not going:
            return None
        whose = _predecessor(going[0], name)
        return (f"pod(s) {', '.join(p['metadata']['name'] for p in going)} of a deleted PretrainJob of this name (uid {whose}) still running "
                "(their grace period: a last checkpoint may be going to the same folder); waiting for them to end")

    def _may_run(self, pod: dict) -> bool:
        """Whether a deleted job's rank may still run: not a probe, not finished, its grace period not
        over (its kubelet has killed it, or is gone: a pod stuck Terminating on a lost node would hold
        the new job for ever), its node not gone dark."""
        due = reconcile.parse(pod["metadata"].get("deletionTimestamp") or "")
        nn = (pod.get("spec") or {}).get("nodeName")
        return (c.LABEL_PROBE not in pod["metadata"]["labels"] and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                and (due is None or due > dt.datetime.now(dt.timezone.utc)) and not (nn and classify.node_dark(self._node(nn), nn)))

    def _progress_read(self, key: tuple[str, str], job: dict) -> dt.datetime | None:
        """When rank 0's step of the job's current attempt was last read, if that read succeeded and
        the job's status shows what it saw (its write refused, the status is older than the read);
        not a deleted job's of the same name."""
        uid, attempt, when, prog = self.progress_read.get(key, (None, None, None, None))
        st = job.get("status") or {}
        mine = uid == job["metadata"].get("uid") and attempt == st.get("attempt")
        return when if mine and reconcile.progress_of(st) == prog else None

    def _progress_interval(self) -> float:
        return progress_interval(self.settings.progress_interval_s, self.settings.progress_rate, self.running)

    def _observe_metrics(self, ns: str, name: str, job: dict, plan: reconcile.Plan) -> None:
        st = plan.status
        with self.memo_lock:
            self.phases[(ns, name)] = st.get("phase", "Pending")
            if st.get("phase") == "Succeeded" or (st.get("phase") == "Failed" and plan.requeue_after is None):
                # Read by no later pass: a finished job's phase is sticky, and a Failed one has no pods
                # left (while they go, it is looked at again and their final reports read from here).
                self.last_seen.pop((ns, name), None)
        self._update_phase_gauge()
        metrics.observe_job(ns, name, st, reconcile.running_seconds(st, dt.datetime.now(dt.timezone.utc)))
        r = st.get("restart")
        before = ((job.get("status") or {}).get("restart") or {}).get("requestedAt")
        if r and st.get("phase") == "Restarting" and r.get("requestedAt") != before:
            # Decided by this pass (its status write succeeded): counted once, also by an operator
            # that took over while the job was Restarting (a memory of its own counted it again).
            metrics.RESTARTS.labels(r.get("kind", ""), r.get("reason", "")).inc()
            metrics.GANG_RESTARTS.labels(r.get("kind", "")).inc()
        if r and st.get("phase") == "Running" and (job.get("status") or {}).get("phase") != "Running":
            started = reconcile.parse(r.get("requestedAt", ""))
            if started:
                metrics.RECOVERY_SECONDS.observe((dt.datetime.now(dt.timezone.utc) - started).total_seconds())

    def _forget_metrics(self, key: tuple[str, str]) -> None:
        if self.phases.pop(key, None) is not None:
            metrics.forget_job(*key)
            self._update_phase_gauge()

    def _update_phase_gauge(self) -> None:
        counts: dict[str, int] = {}
        for ph in list(self.phases.values()):  # a copy: workers write it meanwhile
            counts[ph] = counts.get(ph, 0) + 1
        for ph in metrics.PHASES:
            metrics.JOBS.labels(ph).set(counts.get(ph, 0))
        self.running = counts.get("Running", 0)

    def _crash_point(self, stage: str, when: str, job: dict) -> None:
        """Fault injection for tests: PRETRAIN_OPERATOR_CRASH_AT=<stage>:<when>[:<namespace>/<job>]
        exits the process there (for that job only, when one is named: other jobs in the cluster
        pass the same points)."""
        md = job["metadata"]
        if self.settings.crash_at and self.settings.crash_at in (f"{stage}:{when}", f"{stage}:{when}:{md['namespace']}/{md['name']}"):
            log.error("crash point %s reached: exiting (fault injection)", self.settings.crash_at)
            logging.shutdown()
            os._exit(17)


DELETED = -1.0  # reconcile's answer for a job that is gone: not looked at again until an event of its key
# How long a deleted job's pods are not remembered (their deletions by the garbage collector come
# within seconds; a minute-long pod grace period is the longest wait).
GONE_KEEP_S = 600.0
PROGRESS_MISSES_WARN = 12  # failed progress reads in a row before a warning (a minute at the default interval)


def next_pass(delay: float | None, phase: str, settings: OperatorSettings) -> float:
    """When to reconcile a job again: when it asked, never later than the resync (a long timeout
    still gets looked at); a finished job that asked for nothing, only at the finished resync."""
    if delay is None and phase in reconcile.TERMINAL:
        return settings.finished_resync_s
    return settings.resync_s if delay is None else min(delay, settings.resync_s)


def progress_interval(interval_s: float, rate: float, running: int) -> float:
    """Seconds between progress reads of one Running job: `interval_s`, or longer when `running`
    jobs read that often would exceed `rate` reads a second in all (each is a reconcile, a metrics
    scrape and a status write: at 1000 jobs every 5 s, 200 of each a second)."""
    return max(interval_s, running / rate)


def _job_path(ns: str, name: str) -> str:
    return f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{ns}/{api.PLURAL}/{name}"


def _predecessor(obj: dict, job_name: str) -> str | None:
    """The uid of the PretrainJob of this name that owns obj (a deleted job's child that garbage
    collection has not removed yet), or None."""
    return next((o.get("uid") for o in obj["metadata"].get("ownerReferences") or []
                 if o.get("kind") == api.KIND and o.get("name") == job_name), None)


def _whose(kind: str, obj: dict, job_name: str) -> str:
    old = _predecessor(obj, job_name)
    if old:
        return (f"{kind} {obj['metadata']['name']} still belongs to a deleted PretrainJob of this name (uid {old}); "
                "waiting for garbage collection to remove it")
    return (f"{kind} {obj['metadata']['name']} already exists and is not this job's: the job needs that name "
            "for its own; rename the job or remove the other object")


def _not_owned(job: dict, *children: tuple[str, dict | None]) -> tuple[str | None, str | None]:
    """Which of the job's deterministically named children exists without being the job's, as
    (foreign, predecessor). Foreign: a user's Service named as the job, a copied ConfigMap; using
    it would point the rendezvous elsewhere or overwrite it, and garbage collection would delete it
    with the job. Predecessor: the child of a deleted job of the same name (deleted in the
    background, re-applied at once, as docs/operations.md has it), which goes by itself."""
    uid, name = job["metadata"]["uid"], job["metadata"]["name"]
    for kind, obj in children:
        if obj is not None and uid not in [o.get("uid") for o in obj["metadata"].get("ownerReferences") or []]:
            return (None, _whose(kind, obj, name)) if _predecessor(obj, name) else (_whose(kind, obj, name), None)
    return None, None


def _patchable(old: dict, new: dict) -> dict:
    """A merge patch from old to new status: removed keys become None, at every depth (a merge
    patch merges objects: status.progress without `loss`, once the loss became NaN, kept the last
    finite loss on the server, and every later pass found it different and wrote again)."""
    patch = copy.deepcopy(new)
    for k, v in old.items():
        if k not in new:
            patch[k] = None
        elif isinstance(v, dict) and isinstance(new[k], dict):
            patch[k] = _patchable(v, new[k])
    return patch


def checkpoint_time(t: float | None, read: str) -> str:
    """When the trainer says its last checkpoint was committed, or `read` (when the metrics were
    read) for a time it cannot have meant: none, 0, NaN, infinite or out of range (a custom
    trainer's). A NaN raised out of the whole pass, before its status write: progress was never
    mirrored, and the progress deadline never fired."""
    try:
        if t is not None and math.isfinite(t) and t > 0:
            return reconcile.iso(dt.datetime.fromtimestamp(t, dt.timezone.utc))
    except (OverflowError, OSError, ValueError):
        pass
    return read


def read_trainer_metrics(pod_ip: str, port: int = c.METRICS_PORT, timeout: float = 1.0) -> dict[str, float]:
    """One scrape of a pod's trainer (IPv4 or IPv6 pod IP); raises what urllib raises."""
    with urllib.request.urlopen(c.metrics_url(pod_ip, port), timeout=timeout) as r:
        return parse_metrics(r.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition (what the trainer's contract uses)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2 and "{" not in parts[0]:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out
