"""A checkpoint folder's fence: only the newest attempt of a job writes there.

    PRETRAIN_JOB_UID=<uid> PRETRAIN_ATTEMPT=<n>   # the operator sets both; unset (plain torchrun): no fence

Why: the operator force-deletes the pods of a node it has lost (NotReady, unreachable), or the next
gang could never start. But a node whose kubelet died, or that is cut off from the API server
alone, keeps running their containers, and a gang that lives entirely there (a one-pod job, most
often) trains on: into the same checkpoint folder as its replacement, saving the same steps into
the same files, moving `latest`, each pruning the other's checkpoints.

How: `<checkpoint folder>/ATTEMPT` names the job (its uid) and the attempt that started there last.
Each attempt claims it as it starts, before it loads a checkpoint. Rank 0 reads it again at most
once a second while training, and before each commit: once another attempt (or another job) has
claimed the folder, the stale attempt commits nothing more and every rank stops at its next step
without saving (exit 83). An attempt that starts after a newer attempt of its job stops at once.
A new job (another uid) given the folder of a deleted one takes it over, and resumes from it.

Limits: a stale attempt trains on for up to a second (the read's interval) after it was replaced,
and the save it may have begun before then is written but never committed (its folder has no
marker, so it is never loaded, and the next commit's clean-up removes it). A file system that
caches attributes (NFS's actimeo) can delay the read by its cache time. Two saves of the same step
at the same moment, one stale, one new, are not prevented: the new attempt reaches that step only
after its start and a checkpoint's load, later than the stale one notices.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pretrain_operator import contract as c

log = logging.getLogger("pretrain_trainer.fence")
FENCE = "ATTEMPT"


class Fence:
    def __init__(self, root: Path, owner: tuple[str, int] | None, every_s: float = 1.0):
        self.path = Path(root) / FENCE
        self.owner = owner  # (job uid, attempt); None: not fenced
        self.every_s = every_s
        self.read_at = -float("inf")
        self.taken: str | None = None

    @classmethod
    def from_env(cls, root: Path) -> Fence:
        uid, attempt = os.environ.get(c.ENV_JOB_UID), os.environ.get(c.ENV_ATTEMPT)
        return cls(root, (uid, int(attempt)) if uid and attempt and attempt.isdigit() else None)

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet (or a user removed it): nobody else holds it
            return {}
        return doc if isinstance(doc, dict) else {}

    def claim(self) -> str | None:
        """Claim the folder for this attempt (rank 0, before loading). Returns why this attempt must
        not run (a newer attempt of its job has claimed it), else None."""
        if self.owner is None:
            return None
        uid, attempt = self.owner
        held = self._read()
        if held.get("job") == uid and isinstance(held.get("attempt"), int) and held["attempt"] > attempt:
            return (f"attempt {held['attempt']} of this job has claimed {self.path.parent} since: attempt {attempt} "
                    "is stale (a pod the operator replaced)")
        if held.get("job") not in (None, uid):
            log.warning("checkpoint folder %s was job %s's (attempt %s): this job (%s) takes it over",
                        self.path.parent, held.get("job"), held.get("attempt"), uid)
        tmp = self.path.with_name(f"{FENCE}.tmp-{uid}-{attempt}")
        tmp.write_text(json.dumps({"job": uid, "attempt": attempt, "time": time.time()}))
        os.replace(tmp, self.path)
        return None

    def taken_by(self, now: bool = False) -> str | None:
        """Who has claimed the folder since this attempt did ("job U attempt N"), or None. Reads the
        file at most once per `every_s` unless `now`; once taken, it stays taken."""
        if self.owner is None or self.taken is not None:
            return self.taken
        t = time.monotonic()
        if not now and t - self.read_at < self.every_s:
            return None
        self.read_at = t
        held = self._read()
        if held and (held.get("job"), held.get("attempt")) != self.owner:
            self.taken = f"job {held.get('job')} attempt {held.get('attempt')}"
        return self.taken
