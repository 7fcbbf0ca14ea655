"""`make bench`: run every benchmark in bench/ and print its ratios.

    make bench                     # all
    .venv/bin/python bench/run.py control_plane

A benchmark that fails is reported (its traceback or error) and the next ones still run; the exit
status is then 1, with the failed ones listed at the end.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
BENCHES = ["control_plane", "pods", "gang_creation", "peers", "recovery", "trainer", "checkpoint_writer", "checkpoint_plan",
           "activation_checkpointing", "moe_lora"]


def main(argv: list[str]) -> int:
    """Each benchmark in turn; one that fails (an exception, or SystemExit with a child's error) is
    said, the rest still run, and the exit status is 1 if any failed."""
    failed = []
    for name in argv or BENCHES:
        print(f"== bench/{name}.py", flush=True)
        try:
            importlib.import_module(name).main()
        except (Exception, SystemExit) as e:  # noqa: BLE001  (KeyboardInterrupt still stops the run)
            if isinstance(e, SystemExit) and e.code in (None, 0):
                continue
            why = traceback.format_exc() if not isinstance(e, SystemExit) else f"SystemExit: {e.code}"
            print(f"!! bench/{name}.py failed:\n{why.rstrip()[-3000:]}", file=sys.stderr, flush=True)
            failed.append((name, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:200]))
    if failed:
        print(f"\n{len(failed)} of {len(argv or BENCHES)} benchmarks failed:", file=sys.stderr)
        for name, why in failed:
            print(f"  bench/{name}.py: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
