"""`python -m pretrain_trainer launch [TORCHRUN OPTIONS] ARGS...`: torchrun (torch.distributed.run,
its options and the PET_* variables the operator sets) running `pretrain_trainer ARGS...` on each
rank, with three differences:

- The workers are forked from the launcher once it has imported torch and the trainer, instead of
  each starting a fresh interpreter that imports them again: 2.7 CPU-seconds per rank saved, which is
  most of a gang's start on few cores (bench/trainer.py measures it). `--start-method spawn` gives
  fresh interpreters back (torchrun's elastic agent, rendezvous and restarts are the same either way).
  The launcher freezes what it made out of the ranks' garbage collectors, so the ranks keep
  sharing its pages: 8 ranks took 938 MiB (PSS) instead of 1481. A node with GPUs spawns its
  ranks: torchrun's launch config starts CUDA in the launcher, and a forked rank cannot use it.
- It exits with the workers' own exit code when they agree on one of the contract's (83 preempted,
  85 permanent; ranks the agent killed after them do not count): plain torchrun turns any worker
  failure into exit 1. A rank that crashed (any other code) makes it 1. Also when the launcher itself is signalled (the kubelet's SIGTERM goes to the
  container's first process): the agent forwards it to the ranks, waits for them up to its
  shutdown timeout (`--shutdown-timeout`, `PET_SHUTDOWN_TIMEOUT`: the operator sets the pod's
  grace period; torchrun's default is 30 s) and then kills them; ranks that saved and exited 83
  make it 83 (plain torchrun: 1, with a traceback). Ranks that had all finished (exit 0, the last
  step checkpointed) before the agent noticed make it 0, at once (they were killed after the
  shutdown timeout, and it exited 143). Ranks that were killed make it 128 + the signal's number,
  as a shell would.
- A node that does not host the rendezvous store (rank 0's) first waits until the store's port
  answers, for the rendezvous' `join_timeout` (`PET_RDZV_CONF`; the operator sets the gang's start
  timeout and a minute more, at least torch's 600 s) from its own start: rank 0's pod may still be
  pending, or pulling its image, and torch gives up on the store after its `read_timeout` (exit
  1, a failure spent on a slow start the operator's start timeout was there to judge). The wait is
  in Python, so a SIGTERM meanwhile ends it at once (143; torch's store connect answers it only at
  its timeout, and a pod's first process without a handler sat out its grace period). The
  operator's `read_timeout`, as long as the join timeout (for plain torchrun, a custom command, to
  wait alike), becomes torch's 60 s here: it also bounds every later store call of the agent (a
  rank 0 lost under a running gang). A `read_timeout` of the user's (template.env) is kept.
- The ranks start with the default action for SIGTERM, SIGINT, SIGHUP and SIGQUIT (the process
  ends) until the trainer answers SIGTERM itself: forked ranks inherited the agent's handler, which
  raised an exception in the middle of whatever the rank was doing (a checkpoint's load took it
  for a bad checkpoint and set a good one aside).
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import socket
import sys
import time
import traceback

from pretrain_operator import contract as c

SUBCOMMANDS = ("train", "eval", "export", "prepare")
# What torchrun's agent handles (TORCHELASTIC_SIGNALS_TO_HANDLE's default) by raising SignalException.
AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def contract_code(codes: set[int]) -> int | None:
    """The contract's code the ranks that ended first agree on (83 or 85; ranks the agent killed
    after them, a negative code, do not count), or None."""
    for code in (c.EXIT_PERMANENT, c.EXIT_PREEMPTED):
        if code in codes and all(x == code or x < 0 for x in codes):
            return code
    return None


def signalled_code(codes: set[int], sig: int) -> int:
    """The launcher's exit code when it was signalled, from its ranks' codes: 0 when every rank had
    exited 0 (the run finished before the signal: 128 + 15 made a finished, checkpointed job look
    like a crash), the contract's code they agree on, else 128 + the signal's number."""
    if codes == {0}:
        return 0
    return contract_code(codes) or 128 + sig


def rdzv_options(rdzv_conf: str) -> dict[str, str]:
    """torchrun's --rdzv-conf (key=value,...) as a dict."""
    return {k.strip(): v.strip() for k, _, v in (item.partition("=") for item in (rdzv_conf or "").split(",")) if k.strip()}


def rdzv_option(rdzv_conf: str, key: str, default: float) -> float:
    """A number of torchrun's --rdzv-conf, else `default` (torch's)."""
    value = rdzv_options(rdzv_conf).get(key, "")
    return float(value) if value.isdigit() else default


def join_timeout(rdzv_conf: str) -> float:
    return rdzv_option(rdzv_conf, "join_timeout", 600.0)


def agent_conf(rdzv_conf: str) -> str:
    """The conf torch's agent gets: the operator's read_timeout, equal to the join timeout (so that
    plain torchrun waits for rank 0's store), is torch's 60 s: the launcher waits for the store itself."""
    if rdzv_option(rdzv_conf, "read_timeout", 60.0) != join_timeout(rdzv_conf):
        return rdzv_conf
    return ",".join(["read_timeout=60"] + [f"{k}={v}" for k, v in rdzv_options(rdzv_conf).items() if k != "read_timeout"])


def hosts_store(rdzv_conf: str, endpoint: str, node_rank: int) -> bool:
    """Whether this node hosts the rendezvous store: the conf's is_host, else node rank 0 (the
    operator's rank 0 is the endpoint's host) or torch's own test of the endpoint's name."""
    is_host = rdzv_options(rdzv_conf).get("is_host")
    if is_host is not None:
        return is_host.lower() in ("1", "true", "yes", "y")
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    except ImportError:  # a torch without it: the operator's convention alone
        return node_rank == 0
    return node_rank == 0 or _matches_machine_hostname(endpoint.rpartition(":")[0] or endpoint)


def wait_for_store(endpoint: str, deadline: float) -> None:
    """Until rank 0's store accepts a connection, or the deadline (monotonic); says so meanwhile."""
    host, sep, port = endpoint.rpartition(":")
    if not sep:  # torch's default port
        host, port = endpoint, "29400"
    said = 0.0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() - said >= 30:
                said = time.monotonic()
                print(f"launcher: rank 0's rendezvous store {endpoint} not reachable ({e}); waiting for "
                      f"{deadline - said:.0f} s more", file=sys.stderr, flush=True)
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def store_unreachable(e: BaseException) -> bool:
    """The rendezvous failed to reach rank 0's store at all (torch's _create_tcp_store), not in a
    later call of the rendezvous (then it has marked itself closed in the store: no try again)."""
    return any(f.name == "_create_tcp_store" for f in traceback.extract_tb(e.__traceback__))


def release_finished_ranks(context) -> None:
    """Let the ranks that have returned exit (0) before the agent closes them. torchrun's worker
    wrapper keeps a rank that returned alive until the agent's next check of its ranks tells it to
    exit (an event); a signal to the agent before that check closed them instead: SIGTERM, which
    a finished trainer ignores, the whole shutdown timeout (the pod's grace period), then SIGKILL,
    and a finished job's launcher exited 143. Ranks still running are not concerned: the event only
    ends the wait of those that returned."""
    finished = getattr(context, "_worker_finished_event", None)  # torch's private field: without it, as before
    if finished is not None:
        finished.set()


def worker(*argv: str) -> None:
    """One rank, in a process forked (or spawned) by torchrun's agent: the trainer's own command line."""
    for sig in AGENT_SIGNALS:  # the agent's handlers, inherited by a fork: the default until train.Stop
        signal.signal(sig, signal.SIG_DFL)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit():
        # A fresh interpreter reads the OMP_NUM_THREADS the agent set for its ranks (1 when there are
        # several) as torch loads; a forked rank inherits the launcher's pool size: set it here.
        import torch
        torch.set_num_threads(int(threads))
    from .__main__ import main
    code = main(list(argv))
    if code:
        sys.exit(code)  # the process's exit code, which the agent reports per rank


def launch(args: list[str]) -> int:
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing import api as mp_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    started = time.monotonic()

    # torchrun's options go before the trainer's subcommand; a --start-method among them wins over fork.
    at = next((i for i, a in enumerate(args) if a in SUBCOMMANDS), len(args))
    parsed = torchrun.get_args_parser().parse_args(["--start-method", "fork", *args[:at], "--module", "pretrain_trainer", *args[at:]])
    module_entrypoint = torchrun.config_from_args

    def function_entrypoint(a):
        # torchrun.run prepares the rendezvous options, then asks this for the entry point: the same
        # launch config, with the trainer as a function instead of a `python -m` command line.
        config, _cmd, _cmd_args = module_entrypoint(a)
        return config, worker, list(a.training_script_args)

    if parsed.start_method == "fork":
        import torch

        if torch.cuda.device_count():
            # torchrun's own launch config asks torch.accelerator for the device count, which starts
            # CUDA's driver in this process: a forked rank then cannot use CUDA ("Cannot re-initialize
            # CUDA in forked subprocess", every GPU pod's first step, seen on an H200). GPU nodes
            # spawn their ranks; the seconds a fork saves matter on few CPU cores, not beside GPUs.
            parsed.start_method = "spawn"
            print("launcher: GPUs here: the ranks are spawned, not forked (CUDA cannot start in a forked rank)",
                  file=sys.stderr, flush=True)
    if parsed.start_method == "fork":
        importlib.import_module(f"{__package__}.train")  # imported once here, inherited by every forked rank
        from pretrain_operator import cel
        cel.compile_rules()  # and the config's rules, compiled once
        # What the ranks inherit, out of their collectors' sight (Python's gc docs, for fork without
        # exec): a collection in a rank would write to every inherited object's header, copying
        # the launcher's pages into each rank.
        gc.freeze()
    # The ranks' exit codes when the agent closes them after a signal (its SignalException carries none).
    closed: dict[int, int | None] = {}
    close = mp_api.MultiprocessContext._close

    def recording_close(self, death_sig, timeout=30):
        release_finished_ranks(self)
        close(self, death_sig, timeout)
        closed.update({i: p.exitcode for i, p in enumerate(self._pc.processes)} if self._pc else {})

    def signalled(signum, _frame):
        # Until torch's agent answers signals itself (once its ranks start), as its handler does.
        raise mp_api.SignalException(f"launcher {os.getpid()} got signal {signum}", sigval=signal.Signals(signum))

    for sig in AGENT_SIGNALS:
        signal.signal(sig, signalled)
    torchrun.config_from_args = function_entrypoint
    mp_api.MultiprocessContext._close = recording_close
    deadline = started + join_timeout(parsed.rdzv_conf)
    try:
        if parsed.rdzv_backend == "c10d" and not hosts_store(parsed.rdzv_conf, parsed.rdzv_endpoint, parsed.node_rank):
            wait_for_store(parsed.rdzv_endpoint, deadline)
        parsed.rdzv_conf = agent_conf(parsed.rdzv_conf)
        while True:
            try:
                torchrun.run(parsed)
                break
            except RendezvousConnectionError as e:
                # Rank 0's store not up yet (its pod pending, its image pulling): again, until the
                # join timeout, unless this node's ranks ran (the store went away under a gang).
                left = deadline - time.monotonic()
                if closed or left <= 0 or not store_unreachable(e):
                    raise
                print(f"launcher: rank 0's rendezvous store {parsed.rdzv_endpoint} not reachable ({e.__cause__ or e}); "
                      f"trying again for {left:.0f} s", file=sys.stderr, flush=True)
            time.sleep(min(5.0, max(left, 0)))
    except ChildFailedError as e:
        # The ranks that failed first agree on a contract code; the agent kills the rest (a signal,
        # a negative code). Any other code (a crash) is a failure, whatever the others said.
        return contract_code({f.exitcode for f in e.failures.values()}) or 1
    except mp_api.SignalException as e:
        # Signalled itself (a pod's SIGTERM): the agent gave the ranks its shutdown timeout to
        # save and exit 83, then killed the rest; or they had finished before it noticed.
        codes = {x if x is not None else -9 for x in closed.values()}
        code = signalled_code(codes, int(e.sigval))
        print(f"launcher: {e.sigval.name}; the ranks exited {sorted(codes)}: exiting {code}", file=sys.stderr, flush=True)
        return code
    finally:
        torchrun.config_from_args = module_entrypoint
        mp_api.MultiprocessContext._close = close
    return 0
