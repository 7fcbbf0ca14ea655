"""The CRD's CEL rules, evaluated in Python with the API server's messages.

    from pretrain_operator.cel import violations
    violations(spec)  # [] or ['spec.parallelism: parallelism.data x ... must equal nodes x nprocPerNode', ...]

The API server checks these rules (`x-kubernetes-validations`) on every PretrainJob before the
operator sees it; the trainer under plain torchrun has no API server, so it checks its --config
with this instead (else a spec the cluster refuses crashes deep in the model build, naming no
field). The rules are read from the generated CRD schema (crdgen), so there is one definition.

Needs cel-python (`celpy`, in the trainer extra); the operator never calls it. Limits: transition
rules (those reading oldSelf) are skipped, as on a create; defaults are pydantic's, which crdgen
writes into the CRD.
"""

from __future__ import annotations

import functools
from typing import Any

from . import api


@functools.cache
def _schema() -> dict:
    from .crdgen import crd
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


@functools.cache
def _program(rule: str):
    import celpy
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _holds(rule: str, value: Any) -> bool:
    import celpy
    try:
        result = _program(rule).evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError:  # the API server refuses a rule it cannot evaluate too
        return False
    return not isinstance(result, celpy.CELEvalError) and bool(result)


def compile_rules() -> None:
    """Build the CEL parser and compile every rule now (about 0.5 s of CPU): the pods' launcher
    calls it before forking the ranks, which then only evaluate."""
    def walk(node: dict) -> None:
        for r in node.get("x-kubernetes-validations", []):
            if "oldSelf" not in r["rule"]:
                _program(r["rule"])
        for sub in (*node.get("properties", {}).values(), node.get("items"), node.get("additionalProperties")):
            if isinstance(sub, dict):
                walk(sub)
    walk(_schema())


def _walk(node: dict, value: Any, path: str, out: list[str]) -> None:
    for r in node.get("x-kubernetes-validations", []):
        if "oldSelf" not in r["rule"] and not _holds(r["rule"], value):
            out.append(f"{path}{r.get('fieldPath', '')}: {r['message']}")
    if isinstance(value, dict):
        for key, sub in node.get("properties", {}).items():
            if key in value:
                _walk(sub, value[key], f"{path}.{key}", out)
        if isinstance(node.get("additionalProperties"), dict):
            for key, v in value.items():
                _walk(node["additionalProperties"], v, f"{path}[{key}]", out)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, v in enumerate(value):
            _walk(node["items"], v, f"{path}[{i}]", out)


def violations(spec: api.PretrainJobSpec) -> list[str]:
    """Each CEL rule the spec breaks, as 'spec.<field>: <the rule's message>'."""
    out: list[str] = []
    _walk(_schema(), spec.model_dump(mode="json", by_alias=True, exclude_none=True), "spec", out)
    return out
