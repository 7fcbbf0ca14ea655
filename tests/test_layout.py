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
    # Every module of the operator package, with torch and torchx made unimportable, as in the
    # operator's image: any import of them, however indirect, fails here. (The TorchX scheduler is
    # a client-side plugin in its own package, pretrain_torchx.)
    out = _py("import sys, pkgutil, importlib; sys.modules['torch'] = sys.modules['torchx'] = None; import pretrain_operator\n"
              "names = [m.name for m in pkgutil.iter_modules(pretrain_operator.__path__)]\n"
              "for n in names: importlib.import_module('pretrain_operator.' + n)\n"
              "print(len(names), 'torch' in sys.modules and sys.modules['torch'] is not None)")
    count, imported = out.split()
    assert int(count) >= 15 and imported == "False"
