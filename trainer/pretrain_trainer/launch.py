"""`python -m pretrain_trainer launch ARGS...`: torchrun (torch.distributed.run, reading the PET_*
variables the operator sets) running `-m pretrain_trainer ARGS...`, but exiting with the workers'
own exit code when they agree on one of the contract's (83 preempted, 85 permanent): plain torchrun
turns any worker failure into exit 1."""

from __future__ import annotations

from pretrain_operator import contract as c


def launch(args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parsed = get_args_parser().parse_args(["--module", "pretrain_trainer", *args])
    try:
        run(parsed)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        for code in (c.EXIT_PERMANENT, c.EXIT_PREEMPTED):
            if code in codes:
                return code
        return 1
    return 0
