"""The test session's own promise: under `make test` (PRETRAIN_REQUIRE_ALL=1) a skipped test fails
the run, so a broken install (torch that does not import, a missing extra) cannot pass green."""

from __future__ import annotations

import os
import subprocess
import sys

from pretrain_localcluster.config import REPO_ROOT


def _pytest(tmp_path, require_all: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_skips.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_here', reason='an extra that is not there')\n"
        "def test_never():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "PRETRAIN_REQUIRE_ALL"}
    if require_all:
        env["PRETRAIN_REQUIRE_ALL"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_skips.py")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_skipped_test_fails_a_make_test_run_and_says_which(tmp_path):
    r = _pytest(tmp_path, require_all=True)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "SKIPPED under PRETRAIN_REQUIRE_ALL" in r.stdout and "an extra that is not there" in r.stdout


def test_outside_make_test_a_skip_is_only_a_skip(tmp_path):
    r = _pytest(tmp_path, require_all=False)
    assert r.returncode == 5 and "1 skipped" in r.stdout, r.stdout[-2000:]  # 5: no test ran
