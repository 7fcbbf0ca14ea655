"""`python -m pretrain_trainer launch [TORCHRUN OPTIONS] ARGS...`: torchrun (torch.distributed.run,
its options and the PET_* variables the operator sets) running `pretrain_trainer ARGS...` on each
rank, with two differences:

- The workers are forked from the launcher once it has imported torch and the trainer, instead of
  each starting a fresh interpreter that imports them again: 2.7 CPU-seconds per rank saved, which is
  most of a gang's start on few cores (bench/trainer.py measures it). `--start-method spawn` gives
  fresh interpreters back (torchrun's elastic agent, rendezvous and restarts are the same either way).
  The launcher touches no GPU before forking, and freezes what it made out of the ranks' garbage
  collectors, so the ranks keep sharing its pages: 8 ranks took 938 MiB (PSS) instead of 1481.
- It exits with the workers' own exit code when they agree on one of the contract's (83 preempted,
  85 permanent; ranks the agent killed after them do not count): plain torchrun turns any worker
  failure into exit 1. A rank that crashed (any other code) makes it 1.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

from pretrain_operator import contract as c

SUBCOMMANDS = ("train", "eval", "export", "prepare")


def worker(*argv: str) -> None:
    """One rank, in a process forked (or spawned) by torchrun's agent: the trainer's own command line."""
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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

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

        importlib.import_module(f"{__package__}.train")  # imported once here, inherited by every forked rank
        from pretrain_operator import cel
        cel.compile_rules()  # and the config's rules, compiled once
        # What the ranks inherit, out of their collectors' sight (Python's gc docs, for fork without
        # exec): a collection in a rank would write to every inherited object's header, copying
        # the launcher's pages into each rank.
        gc.freeze()
        if torch.cuda.is_initialized():  # a forked child cannot use a CUDA context its parent made
            parsed.start_method = "spawn"
    torchrun.config_from_args = function_entrypoint
    try:
        torchrun.run(parsed)
    except ChildFailedError as e:
        # The ranks that failed first agree on a contract code; the agent kills the rest (a signal,
        # a negative code). Any other code (a crash) is a failure, whatever the others said.
        codes = {f.exitcode for f in e.failures.values()}
        for code in (c.EXIT_PERMANENT, c.EXIT_PREEMPTED):
            if code in codes and all(x == code or x < 0 for x in codes):
                return code
        return 1
    finally:
        torchrun.config_from_args = module_entrypoint
    return 0
