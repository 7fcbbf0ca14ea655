"""The trainer's command line.

    torchrun --nproc_per_node N -m pretrain_trainer train --config job.yaml [--checkpoint-dir DIR]
    python -m pretrain_trainer launch train --config job.yaml   # torchrun, ranks forked after one import, keeping the contract's exit codes
    python -m pretrain_trainer eval --config job.yaml [--checkpoint DIR]
    python -m pretrain_trainer export --config job.yaml [--checkpoint DIR] --out DIR [--merge-lora]
    python -m pretrain_trainer prepare --input DIR --out DIR [--vocab-size N] [--tokenizer tokenizer.json]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        import os

        from .launch import launch
        code = launch(argv[1:])
        # The launcher's interpreter teardown only printed nanobind's leak report of triton's
        # bindings (torch imports triton), a hundred lines at the end of every pod's log: its
        # ranks have ended and nothing of its own is left to flush but the standard streams.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    ap = argparse.ArgumentParser(prog="pretrain_trainer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (under torchrun, or one process)")
    t.add_argument("--config", required=True, help="a PretrainJobSpec or a whole PretrainJob manifest (YAML)")
    t.add_argument("--checkpoint-dir", help="overrides checkpoint.path")
    t.add_argument("--podinfo", help="folder of the downward-API annotations file (default from the contract)")
    t.add_argument("--losses-out", help="append 'step loss' lines here (rank 0)")
    e = sub.add_parser("eval", help="held-out loss of a checkpoint")
    e.add_argument("--config", required=True)
    e.add_argument("--checkpoint", help="a step-N folder (default: the newest good one under checkpoint.path)")
    x = sub.add_parser("export", help="a checkpoint as a Hugging Face folder (Llama / Mixtral; LoRA: + PEFT adapter)")
    x.add_argument("--config", required=True)
    x.add_argument("--checkpoint", help="a step-N folder (default: the newest good one under checkpoint.path)")
    x.add_argument("--out", required=True)
    x.add_argument("--merge-lora", action="store_true", help="LoRA: write W + (alpha/rank) B A instead of base + adapter")
    x.add_argument("--max-shard-gb", type=float, default=5.0, help="largest model-*.safetensors shard")
    p = sub.add_parser("prepare", help="text files -> tokenizer and token shards")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer")
    a = ap.parse_args(argv)
    try:
        code = run(a)
    except SystemExit:  # a decided exit (85: a ConfigError, reached alike by every rank)
        leave_process_group()
        raise
    finally:  # whatever ends the process: its checkpoint folder is free for another job (fence.py)
        release_fences()
    leave_process_group()
    return code


def run(a: argparse.Namespace) -> int:
    if a.cmd == "train":
        from . import report
        from .train import train
        try:
            return train(a.config, a.checkpoint_dir, a.podinfo, a.losses_out)
        except BaseException as e:  # noqa: BLE001  (reported as the container's termination message, then raised on)
            report.error(e)
            raise
    if a.cmd == "eval":
        from .evaluate import evaluate
        evaluate(a.config, a.checkpoint)
        return 0
    if a.cmd == "export":
        import os
        from .hf import export
        from .train import setup_distributed
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
        setup_distributed()
        export(a.config, a.checkpoint, a.out, a.merge_lora, a.max_shard_gb)
        return 0
    from .data import prepare
    m = prepare(a.input, a.out, a.vocab_size, a.tokenizer)
    print(f"prepared {m['totalTokens']} tokens from {len(m['files'])} files into {a.out} (manifest {m['sha256'][:12]})")
    return 0


def release_fences() -> None:
    fence = sys.modules.get("pretrain_trainer.fence")  # imported by train only
    if fence is not None:
        fence.release_held()


def leave_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to the interpreter's own
    teardown, gloo's (rank 0 also holds the rendezvous store) sometimes aborted the process with
    "terminate called without an active exception" (SIGABRT), so a deliberate exit 85 read as -6."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
