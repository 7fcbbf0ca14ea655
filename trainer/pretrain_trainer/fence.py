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

Another job: two PretrainJobs on one folder would fence each other off, restart, and do it again.
So rank 0 of the holder touches the file every BEAT_S seconds (a thread, so a long load counts as
alive too), and an attempt of another job that finds the folder held by a live trainer (touched
within LIVE_S) fails for good (exit 85, naming the job that holds it); the running job loses
nothing. A fence touched within LIVE_S but not released is watched first: touched again (within
BEAT_S), its trainer runs; untouched until LIVE_S, that trainer was killed (a deleted job's, in its
last save) and the folder is taken over, so a claim waits at most LIVE_S. The trainer marks the fence released as its process ends (`release_held`, from the
command line, whatever the exit); a released fence, or one untouched for LIVE_S (a trainer killed
outright), is taken over by another job, which resumes from the folder (continual pretraining from
a finished run's folder, a job created again after a fix).

Limits: a job between two attempts (no trainer running) can lose its folder to another job started
then; its next attempt then fails for good, saying which job took it. A stale attempt trains on for
up to a second (the read's interval) after it was replaced, and the save it may have begun before
then is written but never committed (its folder has no marker, so it is never loaded, and the next
commit's clean-up removes it; the attempt exits 83, the last step's save included). A release reads
the fence, then writes it: a next attempt's claim in between is overwritten by the older attempt's
released fence. The newer attempt's rank 0, finding an older attempt of its job there (which never
takes the folder from it), claims it again at its next read (within a second while training,
BEAT_S while loading); another job starting in between can take the folder over (the newer attempt
then stops, 83). Every read opens the file, which NFS revalidates (close-to-open
consistency); one mounted `nocto` can delay what a read sees by its cache time. Two saves of the
same step at the same moment, one stale, one new, are not prevented: the new attempt reaches that
step only after its start and a checkpoint's load, later than the stale one notices.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path

from pretrain_operator import contract as c

log = logging.getLogger("pretrain_trainer.fence")
FENCE = "ATTEMPT"
BEAT_S = 10.0  # how often the holder's rank 0 touches the fence
LIVE_S = 60.0  # touched this recently: its trainer is alive
WATCH_S = 1.0  # how often a claim re-reads another job's fresh, unreleased fence (`_watch`)
_HELD: list[Fence] = []  # claimed by this process, released as it ends


def release_held() -> None:
    """Release what this process claimed (the command line calls it as the process ends)."""
    while _HELD:
        _HELD.pop().close()


class InUse(Exception):
    """The folder is held by a live trainer of another job: a config to fix (exit 85)."""


class Fence:
    def __init__(self, root: Path, owner: tuple[str, int] | None, every_s: float = 1.0):
        self.path = Path(root) / FENCE
        self.owner = owner  # (job uid, attempt); None: not fenced
        self.every_s = every_s
        self.read_at = -float("inf")
        self.taken: str | None = None
        self.stop = threading.Event()
        self.beat: threading.Thread | None = None
        self.writing = threading.Lock()  # the beat's thread, the training loop and `close` may each write

    @classmethod
    def from_env(cls, root: Path) -> Fence:
        uid, attempt = os.environ.get(c.ENV_JOB_UID), os.environ.get(c.ENV_ATTEMPT)
        return cls(root, (uid, int(attempt)) if uid and attempt and attempt.isdigit() else None)

    def _read(self) -> dict:
        return self._read_with_age()[0]

    def _read_with_age(self) -> tuple[dict, float]:
        """The fence and how long ago it was last touched. Both from one open file: an open
        revalidates NFS's cached attributes (close-to-open consistency), a bare stat may not."""
        try:
            with open(self.path) as f:
                doc, age = json.loads(f.read()), time.time() - os.fstat(f.fileno()).st_mtime
        except (OSError, ValueError):  # none yet (or a user removed it): nobody else holds it
            return {}, math.inf
        return (doc, age) if isinstance(doc, dict) else ({}, math.inf)

    def fields(self) -> dict:
        """The owner as the fence file and each checkpoint's marker name it ({} when not fenced)."""
        return dict(zip(("job", "attempt"), self.owner)) if self.owner else {}

    def _mine(self, held: dict) -> bool:
        return self.owner is not None and {k: held.get(k) for k in ("job", "attempt")} == self.fields()

    def _write(self, **doc) -> None:
        with self.writing:
            self._put(doc)

    def _put(self, doc: dict) -> None:
        tmp = self.path.with_name(f"{FENCE}.tmp-{self.owner[0]}-{self.owner[1]}")
        tmp.write_text(json.dumps({**self.fields(), "time": time.time(), **doc}))
        os.replace(tmp, self.path)

    def _older_of_this_job(self, held: dict) -> bool:
        """Written by an older attempt of this job, which never takes the folder from a newer one
        (`claim` stops it): its release racing this attempt's claim (its `close` read the fence as
        its own, this attempt claimed, then it wrote), or its claim racing this one's."""
        attempt = held.get("attempt")
        return (self.owner is not None and held.get("job") == self.owner[0] and isinstance(attempt, int)
                and attempt < self.owner[1])

    def _still_mine(self, held: dict) -> bool:
        """Whether the folder is still this attempt's; an older attempt's write over this one's claim
        is undone (the claim written again): left, it stopped the beat, and a released fence let
        another job take the folder from a live trainer."""
        if self._mine(held):
            return True
        if not self._older_of_this_job(held):
            return False
        log.warning("checkpoint fence %s was written by attempt %s of this job after attempt %s claimed it%s: claimed again",
                    self.path, held.get("attempt"), self.owner[1], " (released as its trainer ended)" if held.get("released") else "")
        with self.writing:
            if not self.stop.is_set():  # this attempt's own release (`close` sets `stop` first) stands
                self._put({})
        return True

    def claim(self) -> str | None:
        """Claim the folder for this attempt (rank 0, before loading) and keep it alive. Returns why
        this attempt must not run (a newer attempt of its job has claimed it), else None; raises
        InUse when a live trainer of another job holds it."""
        if self.owner is None:
            return None
        uid, attempt = self.owner
        held, alive = self._read_with_age()
        if held.get("job") not in (None, uid) and not held.get("released") and alive < LIVE_S:
            held, alive = self._watch(held, alive)
        if held.get("job") == uid and isinstance(held.get("attempt"), int) and held["attempt"] > attempt:
            return (f"attempt {held['attempt']} of this job has claimed {self.path.parent} since: attempt {attempt} "
                    "is stale (a pod the operator replaced)")
        if held.get("job") not in (None, uid):
            if not held.get("released") and alive < LIVE_S:
                raise InUse(f"the checkpoint folder {self.path.parent} is in use by job {held['job']} (attempt "
                            f"{held.get('attempt')}, its trainer alive {alive:.0f} s ago): two PretrainJobs cannot share one; "
                            "give this job its own checkpoint.path or checkpoint.claimName (a folder is taken over once no "
                            f"trainer of that job runs, or {LIVE_S:.0f} s after one was last alive)")
            log.warning("checkpoint folder %s was job %s's (attempt %s, %s): this job (%s) takes it over", self.path.parent,
                        held.get("job"), held.get("attempt"),
                        "its trainer has exited" if held.get("released") else f"its trainer last alive {alive:.0f} s ago", uid)
        self._write()
        self.beat = threading.Thread(target=self._beat, name="checkpoint-fence", daemon=True)
        self.beat.start()
        _HELD.append(self)
        return None

    def _watch(self, held: dict, alive: float) -> tuple[dict, float]:
        """Watch another job's unreleased fence, touched `alive` s ago, until its trainer touches it
        again (alive: at most BEAT_S away), it changes (released, or claimed), or LIVE_S passes since
        its last touch (a trainer killed outright: its release never ran). Returns the fence as last
        read and how long ago it was touched. Why wait: a deleted job's trainer killed within its last
        save (the grace period too short for it) leaves a fresh fence, and a job created again under
        its name at once (its pods gone) failed for good (85) on a folder nobody held any more."""
        log.warning("checkpoint folder %s is job %s's (attempt %s), whose trainer was alive %.0f s ago and did not release "
                    "it: waiting up to %.0f s to see whether that trainer still runs", self.path.parent, held.get("job"),
                    held.get("attempt"), alive, LIVE_S - alive)
        touched = time.time() - alive
        while alive < LIVE_S:
            time.sleep(min(WATCH_S, LIVE_S - alive))
            now, alive = self._read_with_age()
            if now != held or time.time() - alive > touched + 0.5:  # changed, or touched again (mtime moved)
                return now, alive
        return held, alive

    def _beat(self) -> None:
        """Touch the fence while it is this attempt's (a newer attempt's is left alone)."""
        while not self.stop.wait(BEAT_S):
            held = self._read()
            if held and not self._still_mine(held):  # unread ({}: an NFS hiccup) is not taken: touched on
                return
            try:
                os.utime(self.path)
            except OSError as e:  # the next beat tries again; LIVE_S allows a few misses
                log.warning("checkpoint fence %s not touched: %s", self.path, e)

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
        if held and not self._still_mine(held):
            self.taken = f"job {held.get('job')} attempt {held.get('attempt')}"
        return self.taken

    def close(self) -> None:
        """Stop keeping the fence alive and, while it is still this attempt's, mark it released:
        another job may continue from the folder at once."""
        self.stop.set()
        if self.owner is not None and self.beat is not None and self._mine(self._read()):
            self._write(released=True)
