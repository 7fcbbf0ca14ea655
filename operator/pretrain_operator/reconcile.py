"""Reconcile a PretrainJob: observe -> decide -> act -> record. This module is `decide`, a pure
function from what was observed to a Plan; `handlers.py` observes, writes the status (first, so
the intent is on record before any child is touched), acts, then emits the events.

The state machine (docs/preemption.md draws it):

    Pending -> Starting -> Running -> Succeeded
                  ^           |-> (preemption | failure | retryable | start timeout | regrow)
                  |           v
                  +------ Restarting   (attempt + 1 recorded, old pods deleted and gone, new gang;
                                        spec.elastic: a start timeout's next gang may be smaller,
                                        status.nodes, and elastic.py says how large)
    any -> Suspended (suspend: true) -> Restarting (resume: a new attempt)
    any -> Failed (failures > maxFailures, preemptions > maxPreemptions, a non-retryable exit,
                   activeDeadlineSeconds passed, pods the API server finds invalid)
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import math
from dataclasses import dataclass, field

from . import api, classify, contract as c, elastic, render

TERMINAL = ("Succeeded", "Failed")


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(ts: str) -> dt.datetime | None:
    if not ts:
        return None
    return dt.datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)


@dataclass
class Observed:
    job: dict
    spec: api.PretrainJobSpec
    pods: list[dict]                     # every pod owned by the job (all attempts)
    nodes: dict[str, dict | None]        # node name -> Node (None when it no longer exists)
    service_exists: bool
    config_data: str | None              # the ConfigMap's config.yaml, None when missing
    now: dt.datetime
    # Pods the watch saw disrupted (a DisruptionTarget condition) or finished (Succeeded), by name, as
    # last seen: such a pod may be gone before the reconcile lists the pods (evicted; deleted by
    # PodGC once its node went, the node emptied by an autoscaler after the rank finished), and its
    # last state still says how it ended (a finished rank is no preemption).
    last_seen: dict[str, dict] = field(default_factory=dict)
    # The API server's answer to the last pod create of this attempt that failed: (HTTP status,
    # message); None once a create went through.
    create_error: tuple[int, str] | None = None
    # A child of the job's name that is not the job's (controller._not_owned): what it is, or None.
    foreign: str | None = None
    # A child of the job's name that a deleted job of the same name still owns: what it is, or None.
    predecessor: str | None = None
    # When this operator last read rank 0's metrics of the current attempt, if that read (the
    # latest tried) succeeded; None otherwise: a read that fails says nothing of the trainer.
    progress_read: dt.datetime | None = None
    # The job's spec as written, when `spec` is the current attempt's (decide sets both: an elastic
    # attempt of fewer nodes runs with a smaller parallelism.data).
    declared: api.PretrainJobSpec | None = None
    # The job's capacity probes (render.probe; not in `pods`), and the image they run: "" for none
    # (a shrunk gang then regrows without asking the scheduler first).
    probes: list[dict] = field(default_factory=list)
    probe_image: str = ""


@dataclass
class Plan:
    status: dict
    create: list[dict] = field(default_factory=list)
    update_config: dict | None = None
    delete_pods: list[str] = field(default_factory=list)
    # Pods on a lost node (deleted, NotReady): no kubelet will ever confirm a graceful deletion.
    force_delete_pods: list[str] = field(default_factory=list)
    annotate_pods: dict[str, dict[str, str]] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    delete_job: bool = False
    requeue_after: float | None = None
    # Which write-point a restart or a failure passes, for the kill-the-operator tests (controller._crash_point).
    stage: str = ""
    # The capacity probes the job is to have (step 9c); those it has and are not here are deleted.
    probes: list[dict] = field(default_factory=list)


def attempt_of(pod: dict) -> int:
    return int(pod["metadata"]["labels"].get(c.LABEL_ATTEMPT, "0"))


def set_condition(status: dict, ctype: str, ok: bool, reason: str, message: str, now: str, generation: int) -> None:
    conds = status.setdefault("conditions", [])
    want = "True" if ok else "False"
    for cond in conds:
        if cond["type"] == ctype:
            if cond["status"] != want:
                cond["lastTransitionTime"] = now
            cond.update(status=want, reason=reason, message=message, observedGeneration=generation)
            return
    conds.append({"type": ctype, "status": want, "reason": reason, "message": message,
                  "lastTransitionTime": now, "observedGeneration": generation})


def progress_of(status: dict) -> dict:
    """status.progress without its `updated` stamp: what a new reading is compared with."""
    return {k: v for k, v in (status.get("progress") or {}).items() if k != "updated"}


def set_progress(status: dict, prog: dict, now: str) -> None:
    """status.progress := prog, stamped `updated` only when it changed (so an unchanged job gets no write)."""
    if prog != progress_of(status):
        status["progress"] = {**prog, "updated": now}


def set_last_checkpoint(status: dict, root: str, step: int, time: str) -> None:
    status["lastCheckpoint"] = {"step": step, "time": time, "path": f"{root}/step-{step:08d}"}


def _record_report(status: dict, pod: dict | None, spec: api.PretrainJobSpec, now: str) -> None:
    """Rank 0's final report (its pod's termination message) into status.progress and, with the
    folder that pod saved to, status.lastCheckpoint: checkpoint.path may have changed since (it
    may while the job is Suspended, as the pods still save on their way out)."""
    rep = classify.report(pod)
    if "step" in rep:
        prog = {**progress_of(status), "step": rep["step"], "totalSteps": rep.get("totalSteps", spec.training.steps)}
        if "loss" in rep:
            prog["loss"] = round(rep["loss"], 4)
        if "validationLoss" in rep:
            prog["validationLoss"], prog["validationStep"] = round(rep["validationLoss"], 4), rep["validationStep"]
        set_progress(status, prog, now)
    step = rep.get("checkpointStep", 0)
    if step > (status.get("lastCheckpoint") or {}).get("step", 0):
        set_last_checkpoint(status, classify.env_of(pod, c.ENV_CHECKPOINT_DIR) or spec.checkpoint.path, step, now)


def _record_reports(status: dict, pods: list[dict], spec: api.PretrainJobSpec, now: str) -> None:
    """The final reports of rank-0 pods on their way out (a suspend's or a restart's checkpoint on
    SIGTERM): lastCheckpoint showed the last step mirrored before, all through a suspension. The
    step the replaced attempt reports raises the restart's `reachedStep` (its SIGTERM save's step
    often comes after the restart was decided, at the eviction)."""
    restart = status.get("restart") or {}
    for p in pods:
        if (p["metadata"].get("labels") or {}).get(c.LABEL_NODE_RANK) == "0":
            rep = classify.report(p)
            _record_report(status, p, spec, now)
            # (A restart recorded by an operator before reachedStep: its steps were counted then.)
            if ("reachedStep" in restart and attempt_of(p) == restart.get("fromAttempt")
                    and rep.get("step", 0) > restart["reachedStep"]):
                restart["reachedStep"] = rep["step"]


def _gone(o: Observed, by_name: dict, attempt: int | None) -> list[dict]:
    """Attempt `attempt`'s pods the watch last saw that were gone before this pass listed them
    (a pod whose trainer ended, deleted at once by its kubelet: its final report is read there)."""
    return [p for n, p in o.last_seen.items() if n not in by_name and attempt_of(p) == attempt]


def running_since(status: dict) -> dt.datetime | None:
    """When the job became Running, while it is (its Running condition's transition)."""
    if status.get("phase") != "Running":
        return None
    return parse(next((cd.get("lastTransitionTime", "") for cd in status.get("conditions") or []
                       if cd.get("type") == "Running" and cd.get("status") == "True"), ""))


def running_seconds(status: dict, now: dt.datetime) -> float:
    """Seconds the job has spent Running (every node up) over all its attempts, until now."""
    since = running_since(status)
    return status.get("runningSeconds", 0) + (max((now - since).total_seconds(), 0.0) if since else 0.0)


def reached_step(status: dict) -> int:
    """The step the current attempt's reported progress reached, or 0: progress reported by an
    earlier attempt (a restart before the new attempt reported any) is not this one's."""
    prog, started = status.get("progress") or {}, parse(status.get("attemptStartTime", ""))
    updated = parse(prog.get("updated", ""))
    # Strictly after: a replaced attempt's final report read in the pass that creates the next gang
    # is stamped with that pass's time, as attemptStartTime is.
    return prog.get("step", 0) if updated and started and updated > started else 0


def lost_steps(status: dict) -> int:
    """Steps the replaced attempt trained past the checkpoint the next attempt starts from (it
    trains them again): counted when the next gang is created, once the old pods are gone and
    their final reports read (a SIGTERM's checkpoint committed after the restart was decided)."""
    reached = (status.get("restart") or {}).get("reachedStep", 0)
    return max(reached - (status.get("lastCheckpoint") or {}).get("step", 0), 0)


def stalled(spec: api.PretrainJobSpec, status: dict, read: dt.datetime | None) -> str:
    """Why the Running attempt counts as hung, or "": its step has not moved for
    failurePolicy.progressDeadlineSeconds by rank 0's metrics last `read` (the status holds what
    that read saw: `progress.updated` is stamped only when the progress changed)."""
    deadline = spec.failurePolicy.progressDeadlineSeconds
    since = running_since(status)
    if deadline is None or read is None or since is None:
        return ""  # no deadline; no reading to judge by (a network in the way); not Running
    prog = status.get("progress") or {}
    if prog.get("step", 0) >= spec.training.steps:
        return ""  # the last step: the final save may take long, and the pods end by themselves
    # From the later of the last change and the Running transition: an earlier attempt's
    # progress (or none) leaves this attempt its start (import, checkpoint load) from Running.
    changed = parse(prog.get("updated", ""))
    since = max(since, changed) if changed else since
    still = (read - since).total_seconds()
    if still < deadline:
        return ""
    return (f"step {prog.get('step', 0)} has not moved for {int(still)} s (failurePolicy.progressDeadlineSeconds "
            f"{deadline}): the pods run, the training does not (a hang)")


def _phase(status: dict, phase: str, reason: str, message: str, now: str, gen: int) -> None:
    if phase != "Running" and running_since(status):
        status["runningSeconds"] = int(running_seconds(status, parse(now)))
    if phase != "Running" and status.get("capacityProbesSince"):
        status["capacityProbesSince"] = ""  # probing ends with the attempt's run; a next one starts afresh
    status["phase"] = phase
    status["message"] = message
    set_condition(status, "Running", phase == "Running", reason if phase == "Running" else phase, message if phase == "Running" else "", now, gen)
    set_condition(status, "Restarting", phase == "Restarting", reason if phase == "Restarting" else "NotRestarting",
                  message if phase == "Restarting" else "", now, gen)
    set_condition(status, "Suspended", phase == "Suspended", "JobSuspended" if phase == "Suspended" else "NotSuspended",
                  message if phase == "Suspended" else "", now, gen)
    if phase in TERMINAL:
        set_condition(status, phase, True, reason, message, now, gen)


def deadline_left(spec: api.PretrainJobSpec, status: dict, now: dt.datetime) -> float | None:
    """Seconds until activeDeadlineSeconds runs out (None: no deadline, or not started yet)."""
    since = parse(status.get("startTime", ""))
    if spec.activeDeadlineSeconds is None or since is None:
        return None
    return spec.activeDeadlineSeconds - (now - since).total_seconds()


def decide(o: Observed) -> Plan:
    # The gang's size is the attempt's (status.nodes, recorded with the attempt): after an elastic
    # shrink its pods, config and counts are those of the smaller gang.
    size = (o.job.get("status") or {}).get("nodes") or o.spec.nodes
    o = dataclasses.replace(o, spec=elastic.resized(o.spec, size), declared=o.spec)
    plan = _decide(o)
    _probes(plan, o)
    left = deadline_left(o.spec, plan.status, o.now)
    if left is not None and plan.status["phase"] not in (*TERMINAL, "Suspended"):
        # Pod events and resyncs may not come when the deadline does: a pass at that time.
        plan.requeue_after = min(math.inf if plan.requeue_after is None else plan.requeue_after, max(left, 0.5))
    return plan


def _decide(o: Observed) -> Plan:
    job, spec = o.job, o.spec
    name = job["metadata"]["name"]
    gen = job["metadata"].get("generation", 0)
    now = iso(o.now)
    status = copy.deepcopy(job.get("status") or {})
    status.setdefault("attempt", 0)
    status.setdefault("failures", 0)
    status.setdefault("preemptions", 0)
    status.setdefault("phase", "Pending")
    if status["attempt"] and not status.get("nodes"):
        status["nodes"] = spec.nodes  # an attempt started by an operator before status.nodes: its size
    status["observedGeneration"] = gen
    plan = Plan(status=status)
    attempt = status["attempt"]
    by_name = {p["metadata"]["name"]: p for p in o.pods}
    current = [p for p in o.pods if attempt_of(p) == attempt]
    old = [p for p in o.pods if attempt_of(p) != attempt]

    # 1. Terminal: sticky. Failed jobs hold no pods; TTL deletes the job.
    if status["phase"] in TERMINAL:
        if status["phase"] == "Failed":
            # Its pods save on SIGTERM on their way out (an active deadline's): rank 0's report
            # names that checkpoint, which status.lastCheckpoint never showed.
            _record_reports(status, o.pods + _gone(o, by_name, attempt), spec, now)
            _remove(plan, o, o.pods)
        else:  # pods whose trainer finished but a sidecar runs on (a mesh's proxy) would hold their room
            _remove(plan, o, [p for p in o.pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")])
        status["readyNodes"] = f"0/{spec.nodes}"
        if spec.ttlSecondsAfterFinished is not None and status.get("completionTime"):
            due = parse(status["completionTime"]) + dt.timedelta(seconds=spec.ttlSecondsAfterFinished)
            if o.now >= due:
                plan.delete_job = True
            else:
                plan.requeue_after = (due - o.now).total_seconds()
        if plan.delete_pods or plan.force_delete_pods or (status["phase"] == "Failed" and o.pods):
            # Pods still going: looked at again as a running job is (a lost node's pod is force-deleted
            # on a later pass); a finished job with nothing left waits for events (controller.next_pass).
            plan.requeue_after = min(plan.requeue_after or 30.0, 30.0)
        return plan

    # 1b. Another object has the name of one of the job's children: using it would be wrong (another
    #     Service, another config) and every create refused; it stays as the user made it.
    if o.foreign:
        return _fail(plan, o, "NameConflict", o.foreign)
    # 1c. ... unless a deleted job of the same name still owns it: garbage collection removes it
    #     (in the background, after `kubectl delete`) and the job waits; nothing is made before
    #     (a pod would start with the old job's config). It was failed as a NameConflict.
    if o.predecessor:
        status["message"] = o.predecessor
        if status.get("attempt") == 1 and not status.get("gangCreated") and not o.pods:
            # The first pass recorded attempt 1 before it knew (a fresh job's children are not read):
            # its start clock starts at the first create (step 6), not here. Ran down by this wait,
            # it restarted (or shrank) the job before a pod was made.
            status["attemptStartTime"] = ""
        plan.requeue_after = 2.0
        return plan

    # 2. Shared children exist (idempotent creates; the config follows the spec between attempts).
    if not o.service_exists:
        plan.create.append(render.service(job))
    want_config = render.trainer_config(spec)
    if o.config_data is None:
        plan.create.append(render.config_map(job, spec))
    elif o.config_data != want_config and not current:
        plan.update_config = render.config_map(job, spec)

    # 3. Suspend: ask for a checkpoint, remove the pods (SIGTERM gives the trainer its grace period).
    if spec.suspend:
        live = [p for p in o.pods if not p["metadata"].get("deletionTimestamp")]
        if status.get("failureSeenAt"):
            # Cleared to the schema's default, not removed: a removed key comes back from the server
            # as "", and each pass of a suspended job wrote its status again to remove it.
            status["failureSeenAt"] = ""
            # A rank's failure was settling (failurePolicy.failureSettleSeconds) when the suspension
            # came: it happened, and counts (removing the pods, the suspension erased it; its
            # timestamp stayed in status all through the suspension).
            ended = _outcome(o, [render.pod_name(name, attempt, r) for r in range(spec.nodes)], by_name)
            if ended.outcome == classify.FAILURE:
                if failed := _spend(plan, o, "failures", ended.message):
                    return failed
                # Said as a restart's failure is (its Event): else only `failures` would tell of it.
                plan.events.append(("Warning", "Failure", f"attempt {attempt} ended ({ended.reason}: {ended.message}) as "
                                    f"the job was suspended: failure {status['failures']} of maxFailures {spec.failurePolicy.maxFailures}"))
        if status["phase"] != "Suspended":
            if attempt == 0:  # created suspended (a queue admits it later): nothing ran, nothing to stop
                said = told = "created suspended: no pods until spec.suspend is false"
            else:
                said, told = ("suspended: pods removed after a checkpoint request",
                              f"suspending attempt {attempt}: checkpoint requested, pods removed")
            _phase(status, "Suspended", "JobSuspended", said, now, gen)
            plan.events.append(("Normal", "Suspended", told))
        for p in live:  # a new request, also over a notice's (served already: the trainer serves each id once)
            if (p["metadata"].get("annotations") or {}).get(c.ANN_CHECKPOINT_REQUEST) != f"suspend-{attempt}":
                plan.annotate_pods[p["metadata"]["name"]] = {c.ANN_CHECKPOINT_REQUEST: f"suspend-{attempt}"}
        _record_reports(status, o.pods + _gone(o, by_name, attempt), spec, now)
        _remove(plan, o, o.pods)
        status["readyNodes"] = f"0/{spec.nodes}"
        if status.get("admissionWaitSince"):
            status["admissionWaitSince"] = ""  # no pods wait for admission while suspended
        return plan
    if status["phase"] == "Suspended" and attempt > 0:
        # Resume: a new attempt, from the latest checkpoint; counts as neither failure nor preemption.
        # (A job created suspended, admitted by its queue, has no attempt to resume: its first is
        # started by step 4, not counted as a restart.)
        # The active deadline's clock starts again (a Kubernetes Job resets its startTime alike).
        status["startTime"] = now
        return _restart(plan, o, "Resume", "Resumed", "resumed from suspension", count=None)

    # 4. First attempt: record it, and create the gang in the same pass (nothing older can exist;
    #    the status write still precedes the creates).
    if attempt == 0:
        attempt = status["attempt"] = 1
        status["startTime"] = status.get("startTime") or now
        status["attemptStartTime"] = now
        status["gangCreated"] = False
        status["nodes"] = spec.nodes
        _phase(status, "Starting", "GangStarting", "creating the gang of attempt 1", now, gen)
        plan.events.append(("Normal", "Starting", f"starting attempt 1 with {spec.nodes} node(s) x {spec.nprocPerNode} process(es)"))
        plan.stage = "intent-recorded"
        current, old = [], list(o.pods)

    # 4b. The active deadline: failed for good (a later pass would find the same time passed). The
    #     pods are deleted gracefully, so the trainer's SIGTERM checkpoint keeps the work done.
    left = deadline_left(spec, status, o.now)
    ranks = [by_name.get(n) or o.last_seen.get(n) for n in (render.pod_name(name, attempt, r) for r in range(spec.nodes))]
    finished = all(p is not None and classify.finished(p) for p in ranks)
    if left is not None and left <= 0 and not finished:  # a gang that exited 0 in time is seen as done below
        return _fail(plan, o, "DeadlineExceeded",
                     f"active for more than activeDeadlineSeconds ({spec.activeDeadlineSeconds} s) since {status['startTime']}; "
                     "the pods were stopped with SIGTERM (the trainer checkpoints on it)")

    # 5. Old attempts must be gone before the new gang exists (no overlap, no split rendezvous), and
    #    so must the capacity probes of a regrow (their room is the new gang's).
    if not status.get("attemptStartTime"):
        # Until the next gang starts, the final reports of the replaced attempt's pods that the watch
        # saw evicted and that were gone before this pass listed them (rank 0's on a reclaimed node:
        # its SIGTERM checkpoint, the step the next attempt resumes from).
        # Only the replaced attempt's: an older one's report would move status.progress back.
        _record_reports(status, _gone(o, by_name, (status.get("restart") or {}).get("fromAttempt")), spec, now)
    if old or (o.probes and not status.get("attemptStartTime")):
        _record_reports(status, old, spec, now)
        _remove(plan, o, old)
        plan.requeue_after = 1.0
        plan.stage = "deleting-old-pods"
        status["readyNodes"] = f"0/{spec.nodes}"
        # A pod on a healthy node that does not go (someone's finalizer, a kubelet that does not
        # finish it): said, since the next gang waits for it (no overlap of attempts).
        stuck = overdue(old + o.probes, o.now)
        if stuck:
            _say_once(plan, "OldPodsStuck", f"attempt {attempt} waits: {stuck}")
        return plan

    # 6. Create the gang, all of it at once (also what a killed operator left half-created).
    names = [render.pod_name(name, attempt, r) for r in range(spec.nodes)]
    if not status.get("gangCreated"):
        missing = [n for n in names if n not in by_name]
        # A rank this job created that has ended and gone (the watch kept how) before a pass saw
        # the whole gang (`gangCreated` is written by the pass after the creates: an operator
        # killed between, creates refused for minutes by a quota): the attempt is created, and how
        # it ended is classified below; made again, its evicted rank hid its preemption and a peer
        # that crashed as it vanished was counted a failure.
        uid = o.job["metadata"].get("uid")
        if missing and not any(o.last_seen.get(n, {}).get("metadata", {}).get("labels", {}).get(c.LABEL_JOB_UID) == uid
                               for n in missing):
            return _create_gang(plan, o, names, missing)
        status["gangCreated"] = True

    # 7. Observe the ranks.
    outcome = _outcome(o, names, by_name)
    running = [p for p in current if _running(p)]
    status["readyNodes"] = f"{len(running)}/{spec.nodes}"

    # 7b. Rank 0's final report, once it has ended (exit 0 or preempted): the exact last step, loss
    #     and checkpoint, which the metrics mirrored every few seconds may have missed.
    _record_report(status, by_name.get(names[0]), spec, now)

    # 8. A termination notice on a node of ours: checkpoint now (once per attempt; once more when a
    #    termination notice follows advisory ones, whose request may be hours old by then: an
    #    advisory one is recorded as such, `<attempt>@<time>/advisory`).
    if spec.preemption.checkpointOnNotice and outcome.outcome == classify.RUNNING:
        noticed = [classify.node_problem(o.nodes.get(p["spec"].get("nodeName")), p["spec"].get("nodeName"),
                                         spec.preemption.noticeTaints) for p in current if p["spec"].get("nodeName")]
        noticed = sorted((x for x in noticed if x and x[0] in classify.NOTICES), key=lambda x: x[0] != "TerminationNotice")
        if noticed:
            asked = status.get("checkpointRequestedAt", "")
            advisory = noticed[0][0] != "TerminationNotice"
            if asked.split("@")[0] != str(attempt) or (asked.endswith("/advisory") and not advisory):
                asked = status["checkpointRequestedAt"] = f"{attempt}@{now}" + ("/advisory" if advisory else "")
                plan.events.append(("Warning", "TerminationNotice", noticed[0][1] + "; checkpoint requested"))
            # Which pods to annotate, from the pods themselves: an operator killed after recording
            # the request and before annotating finds it recorded, and annotates the pods still
            # without it (deciding from the status alone, it never would: the checkpoint was lost).
            request = f"notice-{attempt}-{asked.split('@', 1)[1].removesuffix('/advisory')}"
            for p in current:
                if (p["metadata"].get("annotations") or {}).get(c.ANN_CHECKPOINT_REQUEST) != request:
                    plan.annotate_pods[p["metadata"]["name"]] = {c.ANN_CHECKPOINT_REQUEST: request}
                    plan.stage = plan.stage or "notice"

    if outcome.outcome == classify.SUCCESS:
        status["completionTime"] = now
        if status.get("progress"):
            status["progress"] = {**status["progress"], "step": spec.training.steps, "totalSteps": spec.training.steps}
        # The contract: a trainer that exits 0 has committed a checkpoint of its last step.
        set_last_checkpoint(status, spec.checkpoint.path, spec.training.steps, now)
        status["readyNodes"] = f"0/{spec.nodes}"
        _phase(status, "Succeeded", "AllRanksSucceeded", f"all {spec.nodes} node(s) exited 0 in attempt {attempt}", now, gen)
        plan.events.append(("Normal", "Succeeded", f"training finished in attempt {attempt}: {status.get('runningSeconds', 0)} s "
                                                   f"running, {status.get('lostSteps', 0)} step(s) trained again after restarts"))
        return plan
    if outcome.outcome == classify.PERMANENT:
        return _fail(plan, o, outcome.reason, outcome.message)
    if outcome.outcome == classify.FAILURE:
        # A failure may be the first sign of a preemption still on its way (a node about to go
        # NotReady, an eviction in flight): give disruption signals a moment before counting it.
        seen = parse(status.get("failureSeenAt", ""))
        if seen is None:
            status["failureSeenAt"] = now
            plan.requeue_after = max(spec.failurePolicy.failureSettleSeconds, 0.5)
            if spec.failurePolicy.failureSettleSeconds > 0:
                return plan
            seen = o.now
        if (o.now - seen).total_seconds() < spec.failurePolicy.failureSettleSeconds:
            plan.requeue_after = 1.0
            return plan
        return _restart(plan, o, "Failure", outcome.reason, outcome.message, count="failures")
    if outcome.outcome == classify.PREEMPTION:
        return _restart(plan, o, "Preemption", outcome.reason, outcome.message, count="preemptions")
    if outcome.outcome == classify.RETRYABLE:
        return _restart(plan, o, "Retryable", outcome.reason, outcome.message, count=None)

    # 9. Still running: the gang must be up within startTimeoutSeconds. A rank that has finished
    #    (exit 0) while the others write their last checkpoint counts as up, its pod Succeeded or
    #    still Running for a sidecar (it was counted as not running: a job of hours, at its very
    #    end, was restarted for a slow start).
    up = [p for p in current if _running(p) or classify.finished(p)]
    # Pods held by scheduling gates (Kueue's admission gate: the whole pod group waits for its
    # quota) are queued, not starting: the start clock waits for them, and starts again at their
    # admission (also when the pass that sees it finds every pod up already).
    gated = [p for p in current if (p.get("spec") or {}).get("schedulingGates")]
    if not gated and status.get("admissionWaitSince"):
        status["admissionWaitSince"] = ""  # as the schema's default shows it (a removed key comes back so)
        status["attemptStartTime"] = now
        status["message"] = f"attempt {attempt}: admitted (scheduling gates lifted); starting"
    if len(up) == spec.nodes:
        if status["phase"] != "Running":
            shrunk = f" ({spec.nodes} of the spec's {o.declared.nodes}: elastic)" if o.declared and o.declared.nodes != spec.nodes else ""
            _phase(status, "Running", "AllNodesRunning", f"attempt {attempt}: all {spec.nodes} node(s) running{shrunk}", now, gen)
            plan.events.append(("Normal", "Running", f"attempt {attempt}: all {spec.nodes} node(s) running{shrunk}"))
        # 9b. Every pod runs, yet the step does not move: a hang no pod's state shows.
        stuck = stalled(spec, status, o.progress_read)
        if stuck:
            return _restart(plan, o, "Failure", "ProgressDeadlineExceeded", stuck, count="failures")
        # 9c. A gang shrunk for want of capacity tries all the spec's nodes again after a while,
        #     once capacity probes show room for them; at once when the spec no longer allows it.
        full = o.declared or spec
        regrow, at_once = elastic.regrow_due(full, spec.nodes, running_since(status), o.now, progress_of(status).get("step", 0))
        if regrow and (at_once or not o.probe_image or spec.scheduling.queueName):
            return _restart(plan, o, "Regrow", "ElasticRegrow", f"{regrow}: trying all {full.nodes} again", count=None)
        if regrow:
            return _probe_capacity(plan, o, regrow)
        if status.get("capacityProbesSince"):
            # No longer probing (regrowAfterSeconds removed or raised, the last step reached): the
            # probes go (_probes), and the message is the Running one again.
            status["capacityProbesSince"] = ""
            status["message"] = next((cd["message"] for cd in status.get("conditions") or [] if cd["type"] == "Running"), "")
    else:
        # Queued pods: otherwise a job queued longer than startTimeoutSeconds was torn down and
        # put at the back of the queue, again and again.
        if gated:
            status["admissionWaitSince"] = status.get("admissionWaitSince") or now
            status["message"] = (f"attempt {attempt}: {len(gated)}/{spec.nodes} pod(s) held by scheduling gates "
                                 f"({', '.join(sorted({g['name'] for p in gated for g in p['spec']['schedulingGates']}))})")
            return plan  # their ungating is a pod event: a pass then
        # What holds the others back, when a pod says (unschedulable, an image or a Secret missing):
        # in status.message and an Event, not a silent timeout after startTimeoutSeconds. The Event
        # is one per pod and cause: the counts and the scheduler's words change as a large gang's
        # nodes come (an autoscaler adding them), and an Event per wording was hundreds.
        started = parse(status.get("attemptStartTime", "")) or o.now
        waited = (o.now - started).total_seconds()
        why = not_starting(current)
        early = why is not None and waited < NOT_STARTING_GRACE_S
        if why and not early:
            cause, words = why
            said = status.get("message") or ""
            status["message"] = f"attempt {attempt}: {len(running)}/{spec.nodes} node(s) running; {words}"
            if not (said.startswith(f"attempt {attempt}: ") and f"; {cause}" in said):
                plan.events.append(("Warning", "PodsNotStarting", status["message"]))
        if status["phase"] == "Running":
            # All up once in this attempt, a pod not up since (classified above if it ended): no
            # slow start, timed from the start of an attempt of hours (a sidecar's end did it); a
            # hang all the same when the step stops moving (9b).
            stuck = stalled(spec, status, o.progress_read)
            if stuck:
                return _restart(plan, o, "Failure", "ProgressDeadlineExceeded", stuck, count="failures")
            return plan
        if waited >= spec.scheduling.startTimeoutSeconds:
            return _start_timeout(plan, o, current, f"only {len(running)}/{spec.nodes} node(s) running after "
                                                    f"{spec.scheduling.startTimeoutSeconds} s")
        # Pod and node events bring every change sooner; this is for the timeout itself (and for
        # the end of the grace before a waiting pod is said).
        plan.requeue_after = max(min(spec.scheduling.startTimeoutSeconds - waited,
                                     NOT_STARTING_GRACE_S - waited if early else math.inf), 0.5)
    return plan


def _probe_capacity(plan: Plan, o: Observed, regrow: str) -> Plan:
    """Step 9c of a shrunk gang due to regrow: one capacity probe per missing node (render.probe),
    in rounds of scheduling.startTimeoutSeconds; the restart on every node once the scheduler has
    placed them all. The gang trains on meanwhile, and a probe not placed waits in the scheduler's
    queue (an autoscaler's cue to add nodes). A round that ends short removes its probes (no partial
    gang holds accelerators, nor does part of a set of probes) and the next begins after a pause
    that differs by job: two shrunk jobs that each hold part of the room take turns."""
    status, spec, full, attempt = plan.status, o.spec, o.declared, plan.status["attempt"]
    missing, window = full.nodes - spec.nodes, spec.scheduling.startTimeoutSeconds
    head = f"attempt {attempt}: running on {spec.nodes} of {full.nodes} node(s); {regrow}: "
    said = status.get("message") or ""
    rendered = [render.probe(o.job, full, attempt, i, o.probe_image) for i in range(missing)]
    want = {p["metadata"]["name"]: p for p in rendered}
    # Placed: on a node that is there, running (or in Init), of the spec as it is now (a changed
    # request or node selector makes other probes). Replaced (deleted now, made again once gone):
    # one evicted, refused by its kubelet, on a lost node, or of an older spec. Not counted: one on
    # a node under a reclaim notice (it goes with the node). Kept and said: one whose container
    # exited by itself (its image does not run until stopped, as a pause image does).
    lost, ended, placed = set(), [], 0
    for p in o.probes:
        name, node_name, st = p["metadata"]["name"], (p.get("spec") or {}).get("nodeName"), p.get("status") or {}
        if name not in want or p["metadata"].get("deletionTimestamp"):
            continue
        prob = classify.node_problem(o.nodes.get(node_name), node_name, spec.preemption.noticeTaints) if node_name else None
        if ((prob and prob[0] not in classify.NOTICES) or (st.get("phase") in ("Succeeded", "Failed") and st.get("reason"))
                or render.probe_digest(p) != render.probe_digest(want[name])):
            lost.add(name)
        elif st.get("phase") in ("Succeeded", "Failed"):
            ended.append(name)
        elif node_name and (not prob or prob[0] == "AdvisoryNotice"):  # (an advisory one may stay for hours)
            placed += 1
    if placed == missing:  # (also in a pass that comes after its round's end: the room is there)
        return _restart(plan, o, "Regrow", "ElasticRegrow", f"{regrow}, and the scheduler placed {missing} capacity probe "
                        f"pod(s) for the other {missing} node(s): trying all {full.nodes} again", count=None)
    started = parse(status.get("capacityProbesSince", ""))
    if started and (o.now - started).total_seconds() >= window:
        again = started + dt.timedelta(seconds=window + probe_pause(o.job["metadata"]["uid"], status["capacityProbesSince"], window))
        if o.now < again:
            status["message"] = (head + f"no room for {missing} more within scheduling.startTimeoutSeconds ({window} s); "
                                 f"probing again at {iso(again)}")
            if status["message"] != said:
                plan.events.append(("Normal", "CapacityProbe", status["message"]))
            plan.requeue_after = max((again - o.now).total_seconds(), 0.5)
            return plan  # its probes removed (_probes: none wanted)
        started = None
    if started is None:  # a round begins, on record before its probes are made
        started, status["capacityProbesSince"] = o.now, iso(o.now)
    plan.probes = [p for p in rendered if p["metadata"]["name"] not in lost]
    # Worded to stay the same while nothing changes (a status write per pass otherwise).
    status["message"] = (head + f"waiting for room for {missing} more ({placed}/{missing} capacity probe pod(s) placed)"
                         + (f"; the API server refused the probes: {o.create_error[1]}" if o.create_error else "")
                         + (f"; probe {min(ended)} ended, and holds no room: the operator's capacity probe image must run "
                            f"until stopped ({o.probe_image})" if ended else ""))
    if not said.startswith(head + "waiting for room"):
        plan.events.append(("Normal", "CapacityProbe", f"attempt {attempt}: {regrow}: {missing} capacity probe pod(s) "
                                                       f"ask the scheduler for room for the other {missing} node(s)"))
    plan.stage = plan.stage or "probing"
    plan.requeue_after = max(window - (o.now - started).total_seconds(), 0.5)
    return plan


def probe_pause(uid: str, since: str, window: int) -> float:
    """Seconds between a round of capacity probes that ended short and the next: from `window` to
    twice that, by the job and the round (deterministic: a killed operator's successor waits the same)."""
    return window * (1 + int(hashlib.sha256(f"{uid}/{since}".encode()).hexdigest()[:8], 16) / 2**32)


def _probes(plan: Plan, o: Observed) -> None:
    """The job's capacity probes as the plan wants them: the missing created, the others deleted
    (the gang no longer shrunk or no longer due, the job ended or suspended), but for while a
    regrow's old pods drain (the probes hold the room the new gang is to take; step 5 waits for
    them to go before it creates the gang), unless those are stuck (OldPodsStuck)."""
    st = plan.status
    old = [p for p in o.pods if attempt_of(p) < st.get("attempt", 0)]
    if st.get("phase") == "Restarting" and (st.get("restart") or {}).get("kind") == "Regrow" and old and not overdue(old, o.now):
        return
    have = {p["metadata"]["name"] for p in o.probes}
    wanted = {p["metadata"]["name"] for p in plan.probes}
    plan.create += [p for p in plan.probes if p["metadata"]["name"] not in have]
    _remove(plan, o, [p for p in o.probes if p["metadata"]["name"] not in wanted])


QUICK_ATTEMPT_S = 60.0  # an attempt that ended sooner after its first create is a quick one
# A pod is said not to start (PodsNotStarting) once its attempt began this long ago: before, it is
# most often on its way (a claim binding, an image pulling), and a Warning for it was noise.
NOT_STARTING_GRACE_S = 10.0


def restart_backoff(quick_restarts: int) -> float:
    """Seconds the next gang waits after this many quick restarts in a row: none for the first
    two (a preemption right after a start is no loop), then 10 s doubling to 5 min."""
    return 0.0 if quick_restarts < 3 else min(10.0 * 2 ** (quick_restarts - 3), 300.0)


def _create_gang(plan: Plan, o: Observed, names: list[str], missing: list[str]) -> Plan:
    """Step 6: create the attempt's missing pods; say why the API server refused some, fail for good
    when it finds them invalid, tear down what was created at the start timeout."""
    status, spec, attempt, now = plan.status, o.spec, plan.status["attempt"], iso(o.now)
    # Attempts that keep ending at once: the next gang waits, doubling (a hot loop otherwise
    # deletes and creates a whole gang every few seconds, forever for causes that spend no budget).
    asked = parse((status.get("restart") or {}).get("requestedAt", ""))
    wait = restart_backoff(status.get("quickRestarts", 0))
    if wait and asked and not status.get("attemptStartTime") and (o.now - asked).total_seconds() < wait:
        left = wait - (o.now - asked).total_seconds()
        status["message"] = (f"attempt {attempt}: waiting {wait:.0f} s before creating the gang "
                             f"({status['quickRestarts']} attempts in a row ended within {QUICK_ATTEMPT_S:.0f} s)")
        plan.requeue_after = max(left, 0.5)
        return plan
    if status["phase"] == "Restarting":
        # The restart's intent is on record in status.restart; what happens now is the new gang starting.
        _phase(status, "Starting", "GangStarting", f"creating the gang of attempt {attempt}", now,
               o.job["metadata"].get("generation", 0))
    # The attempt's start clock runs from its first create: the old gang's drain (up to its grace
    # period, an hour at most) is not the new gang's start. The replaced attempt's lost steps are
    # counted in the same status write (a killed operator's next pass does not count them again).
    if not status.get("attemptStartTime"):
        status["lostSteps"] = status.get("lostSteps", 0) + lost_steps(status)
        status["attemptStartTime"] = now
    status["readyNodes"] = f"0/{spec.nodes}"
    created = f"{len(names) - len(missing)}/{spec.nodes} pod(s) created"
    if o.create_error:
        code, msg = o.create_error
        # The pod is invalid, and the same spec renders the same pod: fails for good. Not a
        # ValidatingAdmissionPolicy's denial, 422 as well by default: a policy may change (retried).
        if code == 422 and "ValidatingAdmissionPolicy" not in msg:
            return _fail(plan, o, "PodInvalid", f"the API server refused the pods of attempt {attempt}: {msg}")
        # Refused for now (a quota, an admission policy, a missing PriorityClass): said once, retried;
        # the start timeout below frees what part of the gang was created.
        refused = f"attempt {attempt}: {created}; the API server refused the others: "
        if status.get("message") != refused + msg:
            # The words follow the refusal (a quota's usage figures change); the Event is one per
            # attempt and count of pods created, not one per wording.
            if not (status.get("message") or "").startswith(refused):
                plan.events.append(("Warning", "GangCreateFailed", refused + msg))
            status["message"] = refused + msg
    elif missing:
        # What it waited for before (a deleted job's children, a refusal, the back-off) is over:
        # the words said so until the gang ran.
        status["message"] = f"creating the gang of attempt {attempt}"
    if (o.now - parse(status["attemptStartTime"])).total_seconds() >= spec.scheduling.startTimeoutSeconds:
        current = [p for p in o.pods if attempt_of(p) == attempt]
        return _start_timeout(plan, o, current, f"only {created} after {spec.scheduling.startTimeoutSeconds} s"
                                                + (f" ({o.create_error[1]})" if o.create_error else ""))
    plan.create += [p for p in render.gang(o.job, spec, attempt) if p["metadata"]["name"] in missing]
    plan.stage = plan.stage or ("old-pods-gone" if status.get("restart") else "creating-gang")
    plan.requeue_after = 1.0
    return plan


def _start_timeout(plan: Plan, o: Observed, current: list[dict], message: str) -> Plan:
    """The attempt's gang did not all start in time: restart it, on fewer nodes when the job is
    elastic and the scheduler placed fewer pods than the gang has (capacity is what is missing)."""
    placed = sum(1 for p in current if (p.get("spec") or {}).get("nodeName") and not p["metadata"].get("deletionTimestamp"))
    full = o.declared or o.spec
    nodes = elastic.shrink_to(full, o.spec.nodes, placed)
    short = full.elastic is not None and placed < o.spec.nodes
    if nodes is None:
        # Not elastic, or not short of capacity: the whole gang again. Elastic and short, with no
        # smaller count that fits: said, since the spec promised a smaller gang.
        return _restart(plan, o, "StartTimeout", "GangStartTimeout", message + (
            f"; {placed} pod(s) placed, and no count from elastic.minNodes {full.elastic.minNodes} below {o.spec.nodes} "
            f"fits the layout (docs/operations.md): all {full.nodes} node(s) again" if short else ""), count=None)
    said = "again runs" if nodes == o.spec.nodes else "runs"
    return _restart(plan, o, "StartTimeout", "ElasticShrink",
                    f"{message}; {placed} pod(s) placed: the next attempt {said} on {nodes} of {full.nodes} node(s) "
                    f"(parallelism.data {elastic.data_degree(full, nodes)}, elastic.minNodes {full.elastic.minNodes})",
                    count=None, nodes=nodes)


def _say_once(plan: Plan, reason: str, message: str) -> None:
    """The message in status.message and a Warning Event, once: a later pass that finds the same
    words there says nothing again."""
    if plan.status.get("message") != message:
        plan.status["message"] = message
        plan.events.append(("Warning", reason, message))


def _remove(plan: Plan, o: Observed, pods: list[dict]) -> None:
    """Delete pods gracefully (SIGTERM: the trainer checkpoints); force those on a lost node (deleted,
    unreachable, Ready Unknown), which would otherwise stay Terminating forever and block the next
    gang (Kueue's KEP-6757 does the same), and those on a node not ready whose grace period is over.
    A force-deleted pod's containers may still run on a node that is only cut off (its kubelet dead):
    the Event says so, and the trainer's checkpoint fence (trainer/pretrain_trainer/fence.py) stops
    them from writing once the next attempt starts."""
    for p in pods:
        node_name = (p.get("spec") or {}).get("nodeName")
        node = o.nodes.get(node_name)
        prob = classify.node_problem(node, node_name, []) if node_name else None
        if prob and prob[0] == "NodeNotReady" and not classify.node_dark(node, node_name):
            # A node that says it is not ready has a kubelet to end the pod (a graceful shutdown, a
            # blip): deleted gracefully, its trainer saves on SIGTERM. Forced at once, the save was
            # lost (the next attempt's fence refused its commit). Forced once its grace period is
            # over: a kubelet that cannot end it (its runtime down) would block the next gang.
            due = parse(p["metadata"].get("deletionTimestamp") or "")
            if due is None or o.now <= due:
                if due is None:
                    plan.delete_pods.append(p["metadata"]["name"])
                continue
            prob = (prob[0], f"{prob[1]}, and its kubelet did not end the pod within its grace period")
        if prob and prob[0] in ("NodeDeleted", "NodeNotReady"):
            plan.force_delete_pods.append(p["metadata"]["name"])
            if p["metadata"].get("deletionGracePeriodSeconds") == 0:
                continue  # force-deleted already, and still there (a finalizer): said once, not at every pass
            if c.LABEL_PROBE in (p["metadata"].get("labels") or {}):
                continue  # a capacity probe: nothing of the job's runs there
            plan.events.append(("Warning", "PodForceDeleted", (
                f"{prob[1]}: pod {p['metadata']['name']} force-deleted (grace period 0) so that the next gang can start"
                + ("; should its containers still run there, the trainer's checkpoint fence stops them once the next "
                   "attempt starts" if prob[0] == "NodeNotReady" else ""))))
        elif not p["metadata"].get("deletionTimestamp"):
            plan.delete_pods.append(p["metadata"]["name"])


OVERDUE_S = 60.0  # a deleted pod still there this long after its grace period ended is stuck


def overdue(pods: list[dict], now: dt.datetime) -> str:
    """The first deleted pod still there OVERDUE_S after its grace period ended (its
    deletionTimestamp), with its finalizers; "" when none. Worded without the time since, so the
    same stuck pod is said once."""
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        md = p["metadata"]
        due = parse(md.get("deletionTimestamp") or "")
        if due is not None and (now - due).total_seconds() > OVERDUE_S:
            fin = md.get("finalizers") or []
            what = (f"capacity probe {md['name']}" if c.LABEL_PROBE in (md.get("labels") or {})
                    else f"pod {md['name']} of attempt {attempt_of(p)}")
            return (f"{what} was to be gone by {md['deletionTimestamp']} and is still there"
                    + (f" (finalizers: {', '.join(fin)})" if fin else " (its node does not finish it)"))
    return ""


# Waiting reasons of a container on its way (not a problem to report).
_STARTING = ("ContainerCreating", "PodInitializing")


def not_starting(pods: list[dict]) -> tuple[str, str] | None:
    """Why the first pod (by name) that is not running waits, when it says: unschedulable (the
    scheduler's message), or a container waiting on a problem (an image that cannot be pulled, a
    Secret or ConfigMap key its environment names missing, ...). Returns (cause, words), the words
    starting with the cause (which pod, which container, what reason); None when none says."""
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if _running(p):
            continue
        st, name = p.get("status") or {}, p["metadata"]["name"]
        sched = next((x for x in st.get("conditions") or [] if x.get("type") == "PodScheduled"), None)
        if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
            cause = f"pod {name} is unschedulable"
            return cause, f"{cause}: {sched.get('message') or 'no message'}"
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            w = (cs.get("state") or {}).get("waiting") or {}
            if w.get("reason") and w["reason"] not in _STARTING:
                cause = f"pod {name}: container {cs.get('name')} is waiting ({w['reason']}"
                return cause, f"{cause}: {w.get('message') or 'no message'})"
    return None


def _running(p: dict) -> bool:
    """The pod runs its trainer (its other containers, sidecars, are theirs: a log shipper that
    ended does not stop the rank; a status without names: every container)."""
    st = p.get("status") or {}
    return st.get("phase") == "Running" and not p["metadata"].get("deletionTimestamp") and all(
        "running" in (cs.get("state") or {}) for cs in classify.trainer_statuses(p) or [{}])


def _fail(plan: Plan, o: Observed, reason: str, message: str) -> Plan:
    st = plan.status
    now = iso(o.now)
    st["completionTime"] = now
    st["readyNodes"] = f"0/{o.spec.nodes}"
    _phase(st, "Failed", reason, message, now, o.job["metadata"].get("generation", 0))
    _remove(plan, o, o.pods)  # again by every later pass while any is left (1. Terminal)
    plan.events.append(("Warning", "Failed", message))
    plan.stage = "failed"
    return plan


def _outcome(o: Observed, names: list[str], by_name: dict[str, dict]) -> classify.End:
    """How the attempt whose rank pods are `names` stands, from each rank's pod (or its last
    watched state, once gone)."""
    ends = []
    for n in names:
        p = by_name.get(n) or o.last_seen.get(n)
        node_name = ((p or {}).get("spec") or {}).get("nodeName")
        ends.append(classify.classify_pod(p, n, o.nodes.get(node_name) if node_name else None, o.spec))
    return classify.classify_attempt(ends)


def _spend(plan: Plan, o: Observed, count: str, message: str) -> Plan | None:
    """Count a failure or a preemption (`count`: the status field); the job failed when that is
    past its budget, else None."""
    st, fp = plan.status, o.spec.failurePolicy
    st[count] += 1
    if count == "failures" and st["failures"] > fp.maxFailures:
        return _fail(plan, o, "MaxFailuresExceeded", f"{message}; failure {st['failures']} exceeds maxFailures {fp.maxFailures}")
    if count == "preemptions" and fp.maxPreemptions is not None and st["preemptions"] > fp.maxPreemptions:
        return _fail(plan, o, "MaxPreemptionsExceeded",
                     f"{message}; preemption {st['preemptions']} exceeds maxPreemptions {fp.maxPreemptions}")
    return None


def _restart(plan: Plan, o: Observed, kind: str, reason: str, message: str, count: str | None,
             nodes: int | None = None) -> Plan:
    """Record the intent (attempt + 1, why, counters, the next gang's size: `nodes`, else every node
    of the spec), then the next passes delete and recreate."""
    st = plan.status
    spec = o.spec
    now = iso(o.now)
    gen = o.job["metadata"].get("generation", 0)
    if count and (failed := _spend(plan, o, count, message)):
        return failed
    # How far the ending attempt got; one whose gang was never created carries its predecessor's
    # figure, not yet counted (that is done at a gang's first create), and its predecessor's pods:
    # those still going are the ones replaced, whose final reports raise the figure.
    carried = (st.get("restart") or {}) if not st.get("attemptStartTime") else {}
    reached = max(carried.get("reachedStep", 0), reached_step(st))
    old_attempt = st["attempt"]
    started = parse(st.get("attemptStartTime", ""))
    quick = kind != "Resume" and started is not None and (o.now - started).total_seconds() < QUICK_ATTEMPT_S
    st["quickRestarts"] = st.get("quickRestarts", 0) + 1 if quick else 0
    st["attempt"] = old_attempt + 1
    st["restart"] = {"fromAttempt": carried.get("fromAttempt") or old_attempt, "kind": kind, "reason": reason, "message": message, "requestedAt": now,
                     "reachedStep": reached}
    st["attemptStartTime"] = ""  # set by the new gang's first create (step 6)
    st["admissionWaitSince"] = ""  # the new gang's pods wait (or not) anew
    st["gangCreated"] = False
    st["capacityProbesSince"] = ""  # the next shrunk attempt's probing starts afresh
    st["nodes"] = nodes or (o.declared or spec).nodes
    st.pop("failureSeenAt", None)
    st["readyNodes"] = f"0/{st['nodes']}"
    _phase(st, "Restarting", reason, f"{kind.lower()}: {message}; starting attempt {st['attempt']}", now, gen)
    plan.events.append(("Warning" if kind in ("Failure", "Preemption", "StartTimeout") else "Normal", kind,
                        f"attempt {old_attempt} ended ({reason}: {message}); starting attempt {st['attempt']}"))
    plan.stage = "intent-recorded"
    plan.requeue_after = 0.2
    return plan
