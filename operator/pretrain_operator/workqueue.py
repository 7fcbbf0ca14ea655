"""A work queue keyed by job (namespace, name): deduplicated, delayed re-adds, never the same key
in two workers at once (a key added while in flight is re-run after it finishes), and keys added
with `first=True` (jobs not reconciled yet) served before the others."""

from __future__ import annotations

import heapq
import threading
import time


class WorkQueue:
    def __init__(self):
        self._cv = threading.Condition()
        self._ready: list = []          # keys ready now (FIFO)
        self._first: list = []          # keys ready now that go before _ready (FIFO)
        self._queued: set = set()
        self._delayed: list = []        # heap of (due, key)
        self._due: dict = {}            # key -> due time of its one live entry in _delayed
        self._active: set = set()
        self._dirty: set = set()        # added while active
        self._closed = False
        self._not_before: dict = {}     # key -> monotonic time: errors back off, events wait for it

    def backoff(self, key, delay: float) -> None:
        """Hold the key back for `delay` seconds, whatever events arrive meanwhile."""
        with self._cv:
            self._not_before[key] = time.monotonic() + delay
        self.add(key, delay)

    def forget(self, key) -> None:
        with self._cv:
            self._not_before.pop(key, None)

    def add(self, key, delay: float = 0.0, first: bool = False) -> None:
        with self._cv:
            held = self._not_before.get(key, 0.0) - time.monotonic()
            if held > delay:
                delay = held
            if delay > 0:
                # One delayed entry per key, the earliest (as client-go's AddAfter): every reconcile
                # requeues its key, and without this each event that ran one started another
                # self-renewing chain (2 reconciles a second per waiting job after a burst).
                due = time.monotonic() + delay
                if self._due.get(key, due + 1) <= due:
                    return
                self._due[key] = due
                heapq.heappush(self._delayed, (due, key))
                self._cv.notify()
                return
            if key in self._active:
                self._dirty.add(key)
                return
            if key not in self._queued:
                self._queued.add(key)
                (self._first if first else self._ready).append(key)
                self._cv.notify()
            elif first and key in self._ready:
                self._ready.remove(key)
                self._first.append(key)

    def get(self, timeout: float = 1.0):
        """The next key (marked active), or None on timeout or close."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._closed:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    due, key = heapq.heappop(self._delayed)
                    if self._due.get(key) != due:
                        continue  # superseded by an earlier entry for the key
                    del self._due[key]
                    held = self._not_before.get(key, 0.0)
                    if held > now:
                        # Requeued before a later pass failed and backed off: held until then
                        # (it ran the key again at once, as if no back-off had been asked for).
                        self._due[key] = held
                        heapq.heappush(self._delayed, (held, key))
                        continue
                    if key in self._active:
                        self._dirty.add(key)
                    elif key not in self._queued:
                        self._queued.add(key)
                        self._ready.append(key)
                if self._first or self._ready:
                    key = (self._first or self._ready).pop(0)
                    self._queued.discard(key)
                    self._active.add(key)
                    return key
                wait = deadline - now
                if self._delayed:
                    wait = min(wait, self._delayed[0][0] - now)
                if wait <= 0:
                    return None
                self._cv.wait(wait)
            return None

    def done(self, key) -> None:
        with self._cv:
            self._active.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                # Through add (the lock is re-entrant): a back-off set by the pass that just failed
                # holds the events that came during it too (they re-ran it at once).
                self.add(key)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._first) + len(self._ready) + len(self._due)
