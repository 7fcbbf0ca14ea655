"""Render docs/api.md, the PretrainJob reference, from the models in `api.py` (every field, its
type, default and description, and every CEL rule with its message).

    python -m pretrain_operator.apidoc > docs/api.md
"""

from __future__ import annotations

import sys
import types
import typing

from pydantic import BaseModel

from . import api


def _type(ann) -> str:
    origin = typing.get_origin(ann)
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if origin is typing.Annotated:  # a type with constraints (a quantity's pattern): the type's name
        return _type(typing.get_args(ann)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    if origin in (list,):
        return f"list of {_type(args[0])}"
    if origin in (dict,):
        return "map" if not args else f"map of {_type(args[1])}"
    if origin in (typing.Union, types.UnionType):  # X | None: optional, shown as X
        return " or ".join(_type(a) for a in args)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"[{ann.__name__}](#{ann.__name__.lower()})"
    return {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object"}.get(ann, str(ann))


def _default(f) -> str:
    if f.default_factory is not None:
        v = f.default_factory()
        return "{}" if isinstance(v, BaseModel) else f"`{v}`"
    if f.is_required():
        return "required"
    return "" if f.default is None else f"`{f.default}`"


def _models(root) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def walk(m):
        if m in seen:
            return
        seen.append(m)
        for f in m.model_fields.values():
            for t in _inner(f.annotation):
                walk(t)

    walk(root)
    return seen


def _inner(ann):
    out = []
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        out.append(ann)
    for a in typing.get_args(ann):
        out += _inner(a)
    return out


def render() -> str:
    lines = ["# PretrainJob API reference", "",
             f"Group `{api.GROUP}`, version `{api.VERSION}`, kind `{api.KIND}` (plural `{api.PLURAL}`, short name "
             f"`{', '.join(api.SHORT_NAMES)}`). Generated from `operator/pretrain_operator/api.py` by "
             "`python -m pretrain_operator.apidoc`; the CRD in `crds/` is generated from the same models, so every "
             "default below is applied by the API server and every rule is enforced by it.", "",
             "## Rules across fields (CEL)", "", "| rule | message |", "|---|---|"]
    for r in api.PretrainJobSpec.model_config["json_schema_extra"]["x-kubernetes-validations"] + api.ROOT_RULES:
        rule = (r["rule"][:160] + ("..." if len(r["rule"]) > 160 else "")).replace("|", "\\|")
        lines.append(f"| `{rule}` | {r['message']} |")
    for title, root in (("Spec", api.PretrainJobSpec), ("Status", api.PretrainJobStatus)):
        lines += ["", f"## {title}", ""]
        for m in _models(root):
            lines += [f"### {m.__name__}", ""]
            if m.__doc__:
                lines += [" ".join(m.__doc__.split()), ""]
            lines += ["| field | type | default | description |", "|---|---|---|---|"]
            for name, f in m.model_fields.items():
                desc = (f.description or "").replace("|", "\\|")
                lines.append(f"| `{f.alias or name}` | {_type(f.annotation)} | {_default(f)} | {desc} |")
            lines.append("")
    lines += ["## Presets", "", "| preset | " + " | ".join(api.PRESETS["tiny"]) + " |",
              "|---|" + "---|" * len(api.PRESETS["tiny"])]
    for k, v in api.PRESETS.items():
        lines.append(f"| `{k}` | " + " | ".join(str(x) for x in v.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
