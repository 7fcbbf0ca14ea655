"""The operator and trainer images, checked without building them (no Docker engine here): bases
pinned and shared, multi-stage, a non-root USER matching what the chart and the operator's pods run
as, the dependencies and the package in layers of their own, the commands' entry points exist, the
operator image never gets torch, and every Python package pinned once (images/constraints.txt)
within pyproject.toml's ranges.

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
DOCKERFILE = IMAGES / "Dockerfile"
CHART = REPO_ROOT / "charts" / "pretrain-operator"


class Dockerfile:
    """Just enough of a Dockerfile's structure: ARG defaults and named stages with their lines."""

    def __init__(self, path: Path):
        text = re.sub(r"\\\n", " ", path.read_text())
        self.lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        self.args = dict(re.match(r"ARG (\w+)=(\S+)", ln).groups() for ln in self.lines if re.match(r"ARG \w+=", ln))
        self.stages: dict[str, list[str]] = {}
        self.base: dict[str, str] = {}
        for ln in self.lines:
            if ln.startswith("FROM "):
                m = re.match(r"FROM (\S+) AS (\S+)$", ln)
                assert m, f"every stage is named: {ln}"
                ref, name = m.groups()
                self.base[name] = re.sub(r"\$\{(\w+)\}", lambda a: self.args[a.group(1)], ref)
                self.stages[name] = []
            elif self.stages:
                self.stages[list(self.stages)[-1]].append(ln)

    def external_bases(self) -> set[str]:
        return {b for b in self.base.values() if b not in self.stages}

    def instr(self, stage: str, name: str) -> list[str]:
        return [ln.split(None, 1)[1] for ln in self.stages[stage] if ln.startswith(name + " ")]

    def lineage(self, stage: str) -> list[str]:
        """The stage, the stages it copies from, and the stages those are built FROM."""
        out, todo = [], [stage]
        while todo:
            st = todo.pop()
            if st in out or st not in self.stages:
                continue
            out.append(st)
            todo.append(self.base[st])
            todo += [m for c in self.instr(st, "COPY") for m in re.findall(r"--from=(\S+)", c)]
        return out


DF = Dockerfile(DOCKERFILE)
TARGETS = {"operator": "operator", "trainer": "trainer"}  # target -> its pyproject extra


def trainer_pod_uid() -> int:
    """The uid the operator gives trainer pods (a rendered pod of a minimal job)."""
    job = {"metadata": {"name": "x", "namespace": "n", "uid": "u"}, "spec": {}}
    pod = render.gang(job, api.PretrainJobSpec.model_validate({}), 1)[0]
    return pod["spec"]["securityContext"]["runAsUser"]


def test_the_base_image_is_pinned_once_by_full_version_or_digest():
    (base,) = DF.external_bases()
    assert "@sha256:" in base or re.search(r":\d+\.\d+\.\d+", base), base
    assert ":latest" not in base


@pytest.mark.parametrize("target", TARGETS)
def test_the_image_is_multi_stage_and_its_final_stage_only_copies_the_built_virtualenv(target):
    assert DF.base[target] in DF.external_bases()
    assert len(DF.lineage(target)) >= 3  # the image, its build, the shared sources
    assert DF.instr(target, "COPY") and not [r for r in DF.instr(target, "RUN") if "pip" in r]


def test_the_trainer_image_has_the_c_compilers_that_training_compile_needs():
    # Triton builds its kernel launchers with a C compiler on a GPU, inductor its kernels with a
    # C++ one on the CPU: python:slim has neither.
    packages = " ".join(DF.instr("trainer", "RUN")).split()
    assert {"gcc", "g++", "libc6-dev"} <= set(packages)


@pytest.mark.parametrize("target,uid", [
    ("operator", yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]),
    ("trainer", trainer_pod_uid()),
])
def test_the_image_runs_as_the_non_root_uid_its_pods_use(target, uid):
    (user,) = DF.instr(target, "USER")
    assert uid != 0 and user == f"{uid}:{uid}"


@pytest.mark.parametrize("target,command,module", [
    ("operator", yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["command"], "pretrain_operator.__main__"),
    ("trainer", render.default_command(), "pretrain_trainer.__main__"),
])
def test_the_images_command_is_what_its_pods_run_and_its_module_exists(target, command, module):
    (cmd,) = DF.instr(target, "CMD")
    assert json.loads(cmd) == command
    assert importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("target", TARGETS)
def test_the_image_installs_its_own_extra_with_the_pinned_constraints(target):
    installs = [r for st in DF.lineage(target) for r in DF.instr(st, "RUN") if "pip install" in r]
    assert installs and all("--constraint images/constraints.txt" in r for r in installs)
    assert set(re.findall(r"images/deps\.py (\w+)", " ".join(installs))) == {TARGETS[target]}
    for st in DF.lineage(target):
        for c in DF.instr(st, "COPY"):
            if "--from" not in c:
                for src in c.split()[:-1]:
                    assert (REPO_ROOT / src).exists(), src


@pytest.mark.parametrize("target", TARGETS)
def test_the_dependencies_and_the_package_are_separate_layers_of_the_image(target):
    # Else every change to the code is a new 5 GB layer with torch in it, built, pushed and pulled.
    assert DF.instr(target, "COPY") == [f"--from=deps-{target} /opt/pretrain /opt/pretrain",
                                        f"--from=build-{target} /opt/pretrain-app /opt/pretrain-app"]
    (deps,) = [r for r in DF.instr(f"deps-{target}", "RUN") if "pip install" in r]
    assert f"images/deps.py {TARGETS[target]}" in deps and "-r /tmp/requirements.txt" in deps
    assert DF.base[f"build-{target}"] == f"deps-{target}" and DF.instr(f"build-{target}", "COPY") == ["--from=src /src /src"]
    (pkg,) = [r for r in DF.instr(f"build-{target}", "RUN") if "pip install" in r]
    assert "--no-deps" in pkg and "--target /opt/pretrain-app ." in pkg
    assert any("/opt/pretrain-app" in r and ".pth" in r for r in DF.instr("deps", "RUN"))  # on the virtualenv's path
    # What the dependency layer depends on: pyproject.toml and images/ alone (no package folder).
    copied = [src for st in DF.lineage(f"deps-{target}") for c in DF.instr(st, "COPY") for src in c.split()[:-1]]
    assert copied and all(src == "pyproject.toml" or src.startswith("images/") for src in copied), copied


@pytest.mark.parametrize("extra", TARGETS.values())
def test_deps_py_lists_the_projects_requirements_of_each_image(extra):
    out = subprocess.run(["python3", "images/deps.py", extra], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert out.split("\n")[:-1] == project["dependencies"] + project["optional-dependencies"][extra]


def test_the_images_copy_every_package_the_project_installs():
    # pip builds the whole project in either image: a package folder left out fails the build.
    copied = {c.split()[0].rstrip("/") for c in DF.instr("src", "COPY") if "--from" not in c}
    dirs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert all(any(d == s or d.startswith(s + "/") for s in copied) for d in dirs), (sorted(dirs), sorted(copied))


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
    assert any('! /opt/pretrain/bin/python -c "import torch"' in r for st in DF.lineage("operator") for r in DF.instr(st, "RUN"))


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
