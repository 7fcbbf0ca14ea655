"""How a pod of the current attempt ended, and what that means for the attempt. Pure functions.

Preemption (not the user's fault; never spends maxFailures): a DisruptionTarget condition of any
reason, the pod deleted by anyone but the operator, its node deleted, NotReady or unreachable, a
termination-notice taint on its node, or the trainer's EXIT_PREEMPTED (it checkpointed on notice).
Failure: a non-zero exit without any of those (of the trainer or of an init container), OOMKilled. Permanent: a non-retryable exit code.
Success: every rank exited 0. A preemption anywhere in the gang makes the whole attempt a
preemption: the surviving ranks crash when a peer vanishes, and that is not their fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from . import api, contract as c

RUNNING, SUCCESS, PREEMPTION, FAILURE, PERMANENT, RETRYABLE = (
    "Running", "Success", "Preemption", "Failure", "Permanent", "Retryable")
# A node's notice taints (node_problem's reasons): both ask for a checkpoint; only the first makes
# a pod that ended there a preemption whatever its exit code.
NOTICES = ("TerminationNotice", "AdvisoryNotice")
# Which outcome wins when ranks disagree.
_PRIORITY = [PREEMPTION, PERMANENT, FAILURE, RETRYABLE, RUNNING, SUCCESS]


@dataclass(frozen=True)
class End:
    outcome: str
    reason: str = ""
    message: str = ""
    pod: str = ""


def _cond(obj: dict, ctype: str) -> dict | None:
    return next((x for x in (obj.get("status") or {}).get("conditions") or [] if x.get("type") == ctype), None)


def disrupted(pod: dict) -> dict | None:
    """The pod's DisruptionTarget condition, when it is True (an eviction, a preemption, PodGC)."""
    dt = _cond(pod, "DisruptionTarget")
    return dt if dt and dt.get("status") == "True" else None


def node_dark(node: dict | None, node_name: str) -> str | None:
    """Why the node's kubelet is known to be gone (the Node deleted, tainted unreachable, its Ready
    condition Unknown: no heartbeat), or None. Not a node that says it is not ready: its kubelet
    is alive (a graceful shutdown, whose pods may be writing their last checkpoint)."""
    if node is None:
        return f"node {node_name} was deleted"
    for t in (node.get("spec") or {}).get("taints") or []:
        if t.get("key") == "node.kubernetes.io/unreachable" and t.get("effect") == "NoExecute":
            return f"node {node_name} is unreachable"
    ready = _cond(node, "Ready")
    if ready is not None and ready.get("status") == "Unknown":
        return f"node {node_name} is NotReady ({ready.get('reason', '')})"
    return None


def node_problem(node: dict | None, node_name: str | None, notice_taints: list[str]) -> tuple[str, str] | None:
    """(reason, message) when the node is gone, not ready, unreachable or under a reclaim notice."""
    if not node_name:
        return None
    if node is None:
        return "NodeDeleted", f"node {node_name} was deleted"
    # A node gone dark first, whatever notice it had: its pods show Running still (their kubelet
    # is gone), and as a notice the node was only asked for a checkpoint, its pods left to end on
    # their own, a peer's crash (a failure) or the progress deadline first. The node controller
    # adds its taint after the notice one, so the notice was always found first. A node not ready
    # with its kubelet alive (shutting down) comes after a notice: its pods are saving.
    dark = node_dark(node, node_name)
    if dark:
        return "NodeNotReady", dark
    taints = (node.get("spec") or {}).get("taints") or []
    # A termination notice before an advisory one the node also has (a rebalance recommendation first).
    for t in sorted(taints, key=lambda t: t.get("key") in api.ADVISORY_NOTICE_TAINTS):
        if t.get("key") in notice_taints:
            return ("AdvisoryNotice" if t["key"] in api.ADVISORY_NOTICE_TAINTS else "TerminationNotice",
                    f"node {node_name} has termination-notice taint {t['key']}")
    for t in taints:
        if t.get("key") == "node.kubernetes.io/not-ready" and t.get("effect") == "NoExecute":
            return "NodeNotReady", f"node {node_name} is not-ready"
    ready = _cond(node, "Ready")
    if ready is not None and ready.get("status") != "True":
        return "NodeNotReady", f"node {node_name} is NotReady ({ready.get('reason', '')})"
    return None


def trainer_statuses(pod: dict) -> list[dict]:
    """The status of the trainer's container (contract.TRAINER_CONTAINER), not another container's
    (a log shipper, a mesh's proxy: sidecars); a status without names: every container's."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return [cs for cs in statuses if cs.get("name") == c.TRAINER_CONTAINER] or statuses


def env_of(pod: dict | None, name: str) -> str | None:
    """The value the trainer's container was given for environment variable `name`, if any."""
    for ctr in ((pod or {}).get("spec") or {}).get("containers") or []:
        if ctr.get("name") == c.TRAINER_CONTAINER:
            return next((e.get("value") for e in ctr.get("env") or [] if e.get("name") == name), None)
    return None


def terminated(pod: dict) -> dict | None:
    """How the trainer's container ended, or None while it has not: not another container's (a log
    shipper that exited 0 while the trainer runs, a sidecar killed after it finished)."""
    return next(((cs.get("state") or {}).get("terminated") for cs in trainer_statuses(pod)
                 if (cs.get("state") or {}).get("terminated")), None)


def failed_init(pod: dict) -> dict | None:
    """The status of the first init container that ended with a non-zero exit code, if any."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        t = (cs.get("state") or {}).get("terminated")
        if t and t.get("exitCode", 0) != 0:
            return {"name": cs.get("name", "?"), "terminated": t}
    return None


def report(pod: dict | None) -> dict:
    """The trainer's final report, its termination message (contract.TERMINATION_MESSAGE_PATH):
    only the fields below, with the types they must have (`error` from a rank that failed); {} when
    there is none or it is not one (a crash's log lines, a custom command's text)."""
    t = terminated(pod) if pod else None
    try:
        doc = json.loads((t or {}).get("message") or "")
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    out = {k: doc[k] for k in ("step", "totalSteps", "checkpointStep", "tokensSeen", "validationStep")
           if isinstance(doc.get(k), int) and not isinstance(doc[k], bool) and doc[k] >= 0}
    for k in ("loss", "validationLoss"):
        if isinstance(doc.get(k), (int, float)) and not isinstance(doc[k], bool) and math.isfinite(doc[k]):
            out[k] = float(doc[k])
    if "validationLoss" not in out or "validationStep" not in out:  # one without the other says nothing
        for k in ("validationLoss", "validationStep"):
            out.pop(k, None)
    if isinstance(doc.get("error"), str) and doc["error"]:
        out["error"] = doc["error"][:1000]
    return out


def finished(pod: dict) -> bool:
    """Its trainer exited 0: the contract says the last step is checkpointed. Whatever happens to
    the pod or its node afterwards does not undo that: the pod Succeeded, or Running still for a
    sidecar (a native one, a mesh's proxy), or Failed by such a sidecar's end, or deleted (PodGC,
    an emptied node removed), its node lost or noticed, a DisruptionTarget."""
    t = terminated(pod)
    return t is not None and t.get("exitCode") == 0


def classify_pod(pod: dict | None, name: str, node: dict | None, spec: api.PretrainJobSpec) -> End:
    fp = spec.failurePolicy
    if pod is None:
        return End(PREEMPTION, "PodDeleted", f"pod {name} was deleted by someone other than the operator", name)
    if finished(pod):
        # Before the disruption checks: a rank that finished and whose node was then emptied
        # (an autoscaler, PodGC's DisruptionTarget) is done, not preempted.
        return End(SUCCESS, pod=name)
    dt = disrupted(pod)
    if dt:
        return End(PREEMPTION, dt.get("reason") or "DisruptionTarget", dt.get("message") or f"pod {name} was disrupted", name)
    if pod["metadata"].get("deletionTimestamp"):
        return End(PREEMPTION, "PodDeleted", f"pod {name} is being deleted by someone other than the operator", name)
    node_name = (pod.get("spec") or {}).get("nodeName")
    prob = node_problem(node, node_name, spec.preemption.noticeTaints)
    t = terminated(pod)
    phase = (pod.get("status") or {}).get("phase")
    if prob and prob[0] not in NOTICES:
        return End(PREEMPTION, prob[0], prob[1], name)
    if t is None and phase not in ("Failed", "Succeeded"):
        return End(RUNNING, pod=name)
    if t is None and phase == "Failed" and (init := failed_init(pod)):
        # The job's own init container (template.initContainers) failed: the user's step, a failure.
        msg = (init["terminated"].get("message") or "").strip()[-300:]
        return End(FAILURE, "InitContainerFailed", f"pod {name}: init container {init['name']} exited with code "
                   f"{init['terminated'].get('exitCode')} ({init['terminated'].get('reason') or 'Error'})"
                   + (f": {msg}" if msg else ""), name)
    if t is None and phase == "Failed":
        # No container ever ran: the kubelet refused the pod (UnexpectedAdmissionError from a
        # device plugin, OutOf<resource>, NodeAffinity, ...) or evicted it for node pressure. Not the
        # trainer's failure, and no exit code to report: the gang is recreated without spending the
        # failure budget (an eviction is a preemption, as with a DisruptionTarget condition).
        st = pod.get("status") or {}
        why = st.get("reason") or "Rejected"
        said = f"pod {name} {'was evicted' if why == 'Evicted' else 'was refused by its node'} ({why}: {st.get('message') or 'no message'})"
        return End(PREEMPTION if why == "Evicted" else RETRYABLE, why, said, name)
    st = pod.get("status") or {}
    if phase == "Failed" and st.get("reason") == "Evicted":
        # Evicted for node pressure while the trainer ran (killed: 137), by a kubelet that adds no
        # DisruptionTarget condition (before 1.26, or its feature gate off): a preemption as above,
        # not the trainer's failure.
        return End(PREEMPTION, "Evicted", f"pod {name} was evicted ({st.get('message') or 'no message'})", name)
    code = t.get("exitCode", 1) if t else 1
    if code == c.EXIT_PREEMPTED:
        return End(PREEMPTION, "CheckpointedOnNotice", f"pod {name} checkpointed and stopped (exit {code})", name)
    if prob and prob[0] == "TerminationNotice":
        # A termination notice: whatever ended the pod, the node was going away. Not an advisory
        # one (a rebalance recommendation, a scale-down candidate): such a node may stay for
        # hours, and a trainer crashing there again and again would never spend its budget.
        return End(PREEMPTION, prob[0], prob[1], name)
    # What the trainer said ended it, when it could say (its report's error).
    err = report(pod).get("error")
    why = f": {err}" if err else ""
    if code in fp.nonRetryableExitCodes:
        return End(PERMANENT, "NonRetryableExitCode", f"pod {name} exited with non-retryable code {code}{why}", name)
    if code in fp.retryableExitCodes:
        return End(RETRYABLE, "RetryableExitCode", f"pod {name} exited with retryable code {code}{why}", name)
    reason = (t or {}).get("reason") or "Error"
    if reason == "OOMKilled":
        return End(FAILURE, "OOMKilled", f"pod {name} ran out of memory (OOMKilled)", name)
    return End(FAILURE, "ExitCode", f"pod {name} exited with code {code} ({reason}){why}", name)


def classify_attempt(ends: list[End]) -> End:
    """The attempt's outcome from its ranks' (the most severe by _PRIORITY; SUCCESS only if all)."""
    if not ends:
        return End(RUNNING)
    return min(ends, key=lambda e: _PRIORITY.index(e.outcome))
