"""The operator and trainer images, checked without building them (no Docker engine here): bases
pinned and shared, multi-stage, a non-root USER matching what the chart and the operator's pods run
as, the commands' entry points exist, the operator image never gets torch, and every Python
package pinned once (images/constraints.txt) within pyproject.toml's ranges.

    .venv/bin/pytest tests/test_images.py

Limits: whether the images build and run is checked only by hack/kind-e2e.sh, where Docker is.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pretrain_localcluster.config import REPO_ROOT
from pretrain_operator import api, render

IMAGES = REPO_ROOT / "images"
CHART = REPO_ROOT / "charts" / "pretrain-operator"
EXTRA = {"operator": "operator", "trainer": "trainer"}


class Dockerfile:
    def __init__(self, path: Path):
        text = re.sub(r"\\\n", " ", path.read_text())
        self.lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        self.args = dict(re.match(r"ARG (\w+)=(\S+)", ln).groups() for ln in self.lines if re.match(r"ARG \w+=", ln))
        self.stages: list[list[str]] = []
        for ln in self.lines:
            if ln.startswith("FROM "):
                self.stages.append([])
            if self.stages:
                self.stages[-1].append(ln)

    def bases(self) -> list[str]:
        out = []
        for st in self.stages:
            ref = st[0].split()[1]
            out.append(re.sub(r"\$\{(\w+)\}", lambda m: self.args[m.group(1)], ref))
        return out

    def final(self, instr: str) -> list[str]:
        return [ln.split(None, 1)[1] for ln in self.stages[-1] if ln.startswith(instr + " ")]


def dockerfile(name: str) -> Dockerfile:
    return Dockerfile(IMAGES / name / "Dockerfile")


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_the_image_is_multi_stage_from_a_pinned_base(name):
    df = dockerfile(name)
    assert len(df.stages) >= 2
    for ref in df.bases():
        # A full version tag (x.y.z) or a digest; never latest or a floating major.
        assert "@sha256:" in ref or re.search(r":\d+\.\d+\.\d+", ref), ref
        assert ":latest" not in ref
    # The final stage copies the built virtualenv; it installs nothing itself.
    assert df.final("COPY") and not [r for r in df.final("RUN") if "pip install" in r]


def test_both_images_share_one_base():
    assert dockerfile("operator").bases() == dockerfile("trainer").bases()


def trainer_pod_uid() -> int:
    """The uid the operator gives trainer pods (a rendered pod of a minimal job)."""
    job = {"metadata": {"name": "x", "namespace": "n", "uid": "u"}, "spec": {}}
    pod = render.gang(job, api.PretrainJobSpec.model_validate({}), 1)[0]
    return pod["spec"]["securityContext"]["runAsUser"]


@pytest.mark.parametrize("name,uid", [
    ("operator", yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]),
    ("trainer", trainer_pod_uid()),
])
def test_the_image_runs_as_the_non_root_uid_its_pods_use(name, uid):
    (user,) = dockerfile(name).final("USER")
    assert uid != 0 and user == f"{uid}:{uid}"


@pytest.mark.parametrize("name,command,module", [
    ("operator", yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["command"], "pretrain_operator.__main__"),
    ("trainer", render.default_command(), "pretrain_trainer.__main__"),
])
def test_the_images_command_is_what_its_pods_run_and_its_module_exists(name, command, module):
    (cmd,) = dockerfile(name).final("CMD")
    assert json.loads(cmd) == command
    assert importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_the_image_installs_its_own_extra_with_the_pinned_constraints(name):
    df = dockerfile(name)
    installs = [r for st in df.stages for ln in st if ln.startswith("RUN ") for r in [ln] if "pip install" in r]
    assert installs and all("--constraint images/constraints.txt" in r for r in installs)
    extras = set(re.findall(r'"\.\[([a-z,]+)\]"', " ".join(installs)))
    assert extras == {EXTRA[name]}
    for ln in df.lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO_ROOT / src).exists(), src


def _pins() -> dict[str, str]:
    pins = {}
    for ln in (IMAGES / "constraints.txt").read_text().splitlines():
        ln = ln.split("#")[0].strip()
        if ln:
            name, version = ln.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_image_dependency_is_pinned_once_within_pyprojects_range():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["operator"]
            + project["optional-dependencies"]["trainer"]]
    pins = _pins()
    needed = {canonicalize_name(r.name) for r in reqs}
    assert set(pins) == needed, f"missing: {needed - set(pins)}, not a dependency: {set(pins) - needed}"
    for r in reqs:
        assert r.specifier.contains(pins[canonicalize_name(r.name)]), f"{r.name}=={pins[canonicalize_name(r.name)]} is outside {r}"


def test_the_operator_image_never_gets_torch():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = [Requirement(r).name for r in project["dependencies"] + project["optional-dependencies"]["operator"]]
    assert "torch" not in names
    # And the build itself fails if a dependency ever pulled torch in.
    assert any('! /opt/pretrain/bin/python -c "import torch"' in ln for ln in dockerfile("operator").lines)


def test_kind_e2e_builds_the_images_the_chart_and_the_jobs_use():
    script = REPO_ROOT / "hack" / "kind-e2e.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"operator_image={values['image']['repository']}:$version" in text
    trainer_default = api.PretrainJobSpec.model_fields["image"].default
    assert f"trainer_image={trainer_default.rsplit(':', 1)[0]}:$version" in text
    for path in re.findall(r'"\$root/([^"]+)"', text):
        assert (REPO_ROOT / path).exists(), path
