"""The layout promises: `operator` stays the standard library's module, and the operator never
imports torch (its image does not carry it)."""

from __future__ import annotations

import subprocess
import sys

from pretrain_localcluster.config import REPO_ROOT


def _py(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_operator_from_the_repository_root_is_the_standard_library():
    out = _py("import operator; print(operator.__file__, hasattr(operator, 'itemgetter'))")
    assert "operator.py" in out and out.endswith("True") and "/operator/" not in out.split()[0].replace(str(REPO_ROOT), "")


def test_the_operator_does_not_import_torch():
    out = _py("import sys; import pretrain_operator.__main__, pretrain_operator.handlers, pretrain_operator.controller, "
              "pretrain_operator.crdgen, pretrain_operator.apidoc; print('torch' in sys.modules)")
    assert out == "False"
