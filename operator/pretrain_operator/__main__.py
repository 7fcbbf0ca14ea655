"""Run the operator:

    python -m pretrain_operator [--namespace NS ...] [--workers N] [--metrics-port P]
    pretrain-operator ...          # the same, as a console script
    make run-operator              # against the local cluster

Reads the in-cluster config, else the kubeconfig ($KUBECONFIG). Settings: OperatorSettings
(settings.py), from PRETRAIN_OPERATOR_* environment variables and these flags.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import sys

import kopf
from pydantic import ValidationError

from . import handlers
from .contract import url_host
from .settings import OperatorSettings


def limit_malloc_arenas(n: int) -> None:
    """Each thread that allocates gets its own glibc arena (up to 8 per core), and each keeps the
    pages freed by a burst: with 40 threads that is tens of MiB of RSS. Must run before they start."""
    if n > 0:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
        except (OSError, AttributeError):
            pass  # not glibc (musl has no arenas to limit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pretrain-operator", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--namespace", "-n", action="append", dest="namespaces", help="watch only these (repeatable)")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--metrics-port", type=int)
    ap.add_argument("--health-port", type=int)
    ap.add_argument("--lease-namespace")
    ap.add_argument("--verbose", "-v", action="store_true")
    a = ap.parse_args(argv)
    try:
        s = OperatorSettings.from_env(namespaces=a.namespaces, workers=a.workers, metrics_port=a.metrics_port,
                                      health_port=a.health_port, lease_namespace=a.lease_namespace)
    except ValidationError as e:  # a bad PRETRAIN_OPERATOR_* value or flag: say which, not a traceback
        ap.error(f"bad settings (PRETRAIN_OPERATOR_<NAME> variables and flags): {e}")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not a.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event otherwise
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per liveness probe otherwise
    for name in OperatorSettings.unknown_env():
        logging.getLogger("pretrain_operator").warning("%s names no setting (operator/pretrain_operator/settings.py lists them): ignored", name)
    handlers.STATE["settings"] = s
    limit_malloc_arenas(s.malloc_arenas)
    liveness = f"http://{url_host(s.bind_address)}:{s.health_port}/healthz" if s.health_port else None
    asyncio.run(kopf.operator(standalone=True, clusterwide=not s.namespaces, namespaces=s.namespaces or (),
                              liveness_endpoint=liveness))
    return 0


if __name__ == "__main__":
    sys.exit(main())
