"""Generate the PretrainJob CRD from the typed models in `api.py`.

    python -m pretrain_operator.crdgen > crds/pretrain.dev_pretrainjobs.yaml
    python -m pretrain_operator.crdgen --check crds/pretrain.dev_pretrainjobs.yaml   # exit 1 if stale

Turns pydantic's JSON Schema into a structural OpenAPI v3 schema: references inlined, optional
fields unwrapped, defaults (also of default factories) written out so the API server applies
them, JSON-Schema-2020 exclusive bounds rewritten in OpenAPI 3.0 form, CEL rules kept.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from . import api

_DROP = {"title"}


def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}

    def walk(m):
        if m.__name__ in out:
            return
        out[m.__name__] = m
        for f in m.model_fields.values():
            for t in _types_in(f.annotation):
                walk(t)

    walk(root)
    return out


def _types_in(ann) -> list[type[BaseModel]]:
    found = []
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        found.append(ann)
    for a in getattr(ann, "__args__", ()) or ():
        found += _types_in(a)
    return found


def _factory_defaults(classes: dict[str, type[BaseModel]]) -> dict[str, dict[str, Any]]:
    """Defaults of fields built by default_factory: {} for models (their own defaults fill in)."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in classes.items():
        for fname, f in cls.model_fields.items():
            if f.default_factory is not None:
                v = f.default_factory()
                out.setdefault(name, {})[f.alias or fname] = {} if isinstance(v, BaseModel) else v
    return out


def _convert(node: Any, defs: dict, extra_defaults: dict, def_name: str | None = None) -> Any:
    if isinstance(node, list):
        return [_convert(x, defs, extra_defaults) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].split("/")[-1]
        inner = _convert(defs[name], defs, extra_defaults, name)
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return {**inner, **_convert(rest, defs, extra_defaults)}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            if rest.get("default", 0) is None:
                rest.pop("default")
            return {**_convert(options[0], defs, extra_defaults), **_convert(rest, defs, extra_defaults)}
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in _DROP or k == "$defs":
            continue
        if k == "properties":
            props = {pk: _convert(pv, defs, extra_defaults) for pk, pv in v.items()}
            for pk, dv in (extra_defaults.get(def_name) or {}).items():
                if pk in props and "default" not in props[pk]:
                    props[pk]["default"] = dv
            out[k] = props
        elif k == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = v, True
        elif k == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = v, True
        elif k == "const":
            out["enum"] = [v]
        elif k == "description" and isinstance(v, str):
            out[k] = " ".join(v.split())  # a model's docstring: one paragraph, as kubectl explain shows it
        elif k == "additionalProperties" and v is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif k == "additionalProperties" and v is False:
            continue  # structural schemas prune unknown fields anyway
        else:
            out[k] = _convert(v, defs, extra_defaults)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _schema_of(model: type[BaseModel]) -> dict:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defaults = _factory_defaults(_model_classes(model))
    return _convert(raw, raw.get("$defs", {}), defaults, model.__name__)


def status_schema() -> dict:
    s = _schema_of(api.PretrainJobStatus)
    conds = s["properties"]["conditions"]
    conds["x-kubernetes-list-type"] = "map"
    conds["x-kubernetes-list-map-keys"] = ["type"]
    conds["items"]["required"] = ["type", "status"]
    s["x-kubernetes-preserve-unknown-fields"] = True
    return s


def crd() -> dict:
    spec = _schema_of(api.PretrainJobSpec)
    # No default for spec itself: CEL rules on it would be checked against an undefaulted {}.
    root = {
        "type": "object",
        "description": "PretrainJob: a gang of torchrun pods that pretrains a model, restarts as a whole from "
                       "its latest checkpoint after a spot preemption without spending its failure budget.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
        "required": ["spec"],
        "x-kubernetes-validations": api.ROOT_RULES,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {"kind": api.KIND, "plural": api.PLURAL, "singular": api.SINGULAR,
                      "shortNames": api.SHORT_NAMES, "categories": ["pretrain"]},
            "versions": [{
                "name": api.VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {"status": {}},
                "additionalPrinterColumns": api.PRINTER_COLUMNS,
            }],
        },
    }


HEADER = "# Generated by `python -m pretrain_operator.crdgen` from operator/pretrain_operator/api.py. Do not edit.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        current = open(argv[1]).read()
        if current != render():
            print(f"{argv[1]} is stale: run `python -m pretrain_operator.crdgen > {argv[1]}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
