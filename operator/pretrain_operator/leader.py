"""Leader election on a coordination.k8s.io Lease, so two operators never both act: only the
holder reconciles; a stopped holder's Lease expires after lease_duration_s and another takes it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid

from kubernetes import client

from . import metrics
from .kubeapi import KubeAPI

log = logging.getLogger("pretrain_operator.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, duration_s: float, renew_s: float):
        self.kube = KubeAPI(api)
        self.ns, self.name = namespace, name
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.duration_s, self.renew_s = duration_s, renew_s
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.is_leader = threading.Event()
        self.stopped = threading.Event()
        self.renewed = 0.0  # time.monotonic() of the last successful renewal
        self.holder = None  # another holder of the Lease, as last seen
        self.said_holder = None
        # The Lease's record as last seen, and when (by this process's clock): another holder's
        # Lease has expired when its record has not changed for its duration (client-go's way),
        # whatever its renewTime says; that time comes from the holder's clock, and a clock an
        # hour behind made every renewal look expired (two leaders), one ahead made a dead
        # leader's Lease look alive for that hour.
        self.observed: tuple | None = None
        self.observed_at = 0.0

    def _try(self) -> bool:
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration_s), "renewTime": _stamp(now)}
        lease = self.kube.get_or_none(f"{self.path}/{self.name}")
        if lease is None:
            body = {"metadata": {"name": self.name}, "spec": {**spec, "acquireTime": spec["renewTime"], "leaseTransitions": 0}}
            try:
                self.kube.create(self.path, body)
                return True
            except client.ApiException as e:
                if e.status == 409:
                    return False
                raise
        old = lease.get("spec") or {}  # empty when the Helm chart created it (so that uninstall removes it)
        holder = old.get("holderIdentity")
        record = (holder, old.get("renewTime"), old.get("leaseTransitions"))
        if record != self.observed:
            self.observed, self.observed_at = record, time.monotonic()
        # Free: never held, or handed back (release()); else expired by our clock, as above.
        expired = not holder or time.monotonic() - self.observed_at > (old.get("leaseDurationSeconds") or self.duration_s)
        if holder != self.identity and not expired:
            self.holder = holder
            return False
        lease["spec"] = {**old, **spec}
        if holder != self.identity:
            lease["spec"]["acquireTime"] = spec["renewTime"]
            lease["spec"]["leaseTransitions"] = (old.get("leaseTransitions") or 0) + 1
        try:
            # The resourceVersion in the body makes this a compare-and-swap: a concurrent taker gets 409.
            self.kube.replace(f"{self.path}/{self.name}", lease)
            return True
        except client.ApiException as e:
            if e.status == 409:
                return False
            raise

    def run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            try:
                ok = self._try()
                if ok:
                    self.renewed = started  # renewTime was stamped at about this moment
            except Exception as e:  # noqa: BLE001  (an API hiccup: keep what we had, for a while)
                # Leadership is kept only while the Lease is surely still ours: another replica may
                # take it once it has not been renewed for duration_s (by that replica's clock).
                # Like client-go's RenewDeadline, stop acting at two thirds of it; before, a
                # leader cut off from the API server went on acting for as long as it was cut off.
                ok = self.leading()
                log.warning("leader election: %s%s", e, "" if ok or not self.is_leader.is_set() else
                            f"; the Lease was last renewed {time.monotonic() - self.renewed:.1f} s ago: stepping down")
            if ok and not self.is_leader.is_set():
                log.info("became the leader (%s)", self.identity)
                self.is_leader.set()
            elif not ok and self.is_leader.is_set():
                log.warning("lost the leader Lease")
                self.is_leader.clear()
            elif not ok and self.holder != self.said_holder:  # a follower says once whom it waits for
                log.info("waiting for the leader Lease %s, held by %s (it acts on nothing until then)",
                         f"{self.path.rsplit('/', 2)[-2]}/{self.name}", self.holder)
                self.said_holder = self.holder
            self.stopped.wait(self.renew_s)

    def leading(self) -> bool:
        """Whether to act now: the Lease is ours and was renewed within two thirds of its duration
        (also while a renewal hangs on an API server that does not answer)."""
        return self.is_leader.is_set() and time.monotonic() - self.renewed < self.duration_s * 2 / 3

    def release(self) -> None:
        """On a clean shutdown: hand the Lease back at once instead of letting it expire."""
        self.stopped.set()
        if not self.is_leader.is_set():
            return
        try:
            lease = self.kube.get(f"{self.path}/{self.name}")
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"].update(holderIdentity="", renewTime=_stamp(_now()))
                self.kube.replace(f"{self.path}/{self.name}", lease)
        except Exception as e:  # noqa: BLE001  (it expires anyway)
            log.warning("releasing the Lease: %s", e)
        self.is_leader.clear()

    def start(self) -> threading.Thread:
        # Read at each scrape, not set after each try: a renewal that hangs makes leading() false
        # while run() still waits on it (the gauge stayed 1, and PretrainOperatorNoLeader silent).
        metrics.IS_LEADER.set_function(lambda: 1.0 if self.leading() else 0.0)
        t = threading.Thread(target=self.run, daemon=True, name="leader-election")
        t.start()
        return t
