"""`make bench`: run every benchmark in bench/ and print its ratios.

    make bench                     # all
    .venv/bin/python bench/run.py control_plane
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
BENCHES = ["control_plane", "pods", "gang_creation", "peers", "recovery", "trainer", "checkpoint_writer", "checkpoint_plan",
           "activation_checkpointing", "moe_lora"]


def main(argv: list[str]) -> int:
    for name in argv or BENCHES:
        print(f"== bench/{name}.py")
        importlib.import_module(name).main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
