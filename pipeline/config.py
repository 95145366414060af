"""A run config from YAML + ``key.sub=value`` overrides, or one ``dotted.path: reason (got value)`` line per
problem (``adapter.r``, not ``adapter.lora.r``); the config's records (flat params, slices) and reference."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from pipeline.schema import DataSource, EvalConfig, JudgeConfig, ModelConfig, PipelineConfig  # noqa: F401

RENAMED = {  # old key -> new key, for configs written before the keys became PEFT's and TRL's
    "adapter.dropout": "adapter.{method}_dropout",
    **{f"adapter.reinit.{key}": f"adapter.reinit_{key}" for key in ("threshold", "alpha", "patience",
                                                                    "target", "seed")},
    "train.warmup_ratio": "train.warmup_steps (a fraction < 1 of the steps)",
    "train.gradient_checkpointing": "train.activation_checkpointing",
}  # fmt: skip


class ConfigError(Exception):
    """The config is invalid; ``lines`` holds one ``dotted.path: reason (got value)`` per problem."""
    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _line(path: str, reason: str, value: Any = ...) -> str:
    shown = "" if value is ... else repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"{path or '<config>'}: {reason}" + (f" (got {shown})" if shown else "")


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models(arg)]


def _node(field: FieldInfo | None) -> Any:
    """What a field holds: a section class, ``{tag: class}`` for a discriminated union, or None."""
    models = _models(field.annotation) if field is not None else []
    if field is not None and field.discriminator and models:
        return {model.model_fields[field.discriminator].default: model for model in models}
    return models[0] if models else None


def _locate(loc: Any, root: type[BaseModel] = PipelineConfig) -> tuple[str, Any, Any, dict, FieldInfo | None]:
    """An error location or an override's keys as (dotted path, the model of the last key, the union tag on
    the way, its ``{tag: model}``, the last key's field); no tag: the first member with the key answers."""
    node, parent, tag, members, parts, field = root, None, None, {}, [], None
    for part in loc:
        if isinstance(node, dict) and part in node:
            members, tag, node = node, part, node[part]
        elif isinstance(part, int) or part.isdigit():
            parts.append(str(part))
        elif re.fullmatch(r"\w+", part):
            if isinstance(node, dict):
                node = next((model for model in node.values() if part in model.model_fields), None)
            parts.append(part)
            field = node.model_fields.get(part) if isinstance(node, type) else None
            parent, node = node, _node(field)
    return ".".join(parts), parent, tag, members, field


def _unknown_key(path: str, value: Any, model: Any, tag: Any, members: dict, gone: str = "") -> list[str]:
    """One line per unknown key: its new name, its union member, or the closest name (``gone``: reinit)."""
    import difflib
    key = path.split(".")[-1]
    if isinstance(value, dict) and any(old.startswith(path + ".") for old in RENAMED):
        return [line for name, item in value.items()
                for line in _unknown_key(f"{path}.{name}", item, model, tag, members, key)]  # fmt: skip
    if path in RENAMED:
        return [_line(path, "renamed to " + RENAMED[path].format(method=tag))]
    if owners := [f"'{name}'" for name, other in members.items() if key in other.model_fields]:
        methods = ("method " if len(owners) == 1 else "methods ") + " and ".join(owners)
        return [_line(path, f"only used by {methods} (method is '{tag}')", value)]
    names = list(model.model_fields) if isinstance(model, type) else []
    match = difflib.get_close_matches(f"{gone}_{key}" if gone else key, names, n=1)
    return [_line(path, "unknown key" + (f"; did you mean '{match[0]}'?" if match else ""), value)]


def format_validation_error(error: Any, root: type[BaseModel] = PipelineConfig) -> list[str]:
    """pydantic's ValidationError as one line per problem. A plain union (``list[str] | 'all-linear'``)
    reports one error per branch: merged into one line. A section's own rule is not echoed its input."""
    lines: dict[str, str] = {}  # a field's path (its line) or the line itself -> the line, in order
    reasons: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        path, model, tag, members, _ = _locate(item["loc"], root)
        kind, value, ctx, new = item["type"], item.get("input"), item.get("ctx", {}), []
        if kind == "cross_section":
            new = ctx["lines"]
        elif kind == "extra_forbidden":
            new = _unknown_key(path, value, model, tag, members)
        elif kind == "union_tag_invalid":  # a method that is none of the union's
            expected, key = " or ".join(ctx["expected_tags"].rsplit(", ", 1)), ctx["discriminator"].strip("'")
            new = [_line(f"{path}.{key}", f"input should be {expected}", ctx["tag"])]
        elif kind != "default_factory_not_called":  # (that follows from another field's error)
            msg = "required field is missing" if kind == "missing" else item["msg"]
            reason = msg.removeprefix("Value error, ") if kind == "value_error" else msg[0].lower() + msg[1:]
            merged = reasons.setdefault(path, [])  # a plain union's branches: "a valid list or 'all-linear'"
            merged.append(reason.removeprefix("input should be ") if merged else reason)
            lines[path] = _line(path, " or ".join(merged), ... if isinstance(value, dict) else value)
        lines.update(zip(new, new, strict=True))
    return list(lines.values())


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``key.sub=value`` to the raw mapping in place: string fields take it verbatim (``run.name=007``:
    "007"), others as YAML; a union's new tag (``adapter.method=lora``) drops the old member's own keys."""
    key, sep, raw = override.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.(\w+))*", key.strip()):
        raise ConfigError([f"override {override!r}: expected key.sub=value, e.g. train.max_steps=2"])
    parts = key.strip().split(".")
    field, value = _locate(parts)[-1], raw
    if field is None or field.annotation not in (str, str | None) or raw.strip() in ("null", "~"):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = data
    for depth, part in enumerate(parts):
        key = int(part) if isinstance(node, list) and part.isdigit() else part
        if isinstance(node, list) and (isinstance(key, str) or key >= len(node)):
            raise ConfigError([_line(".".join(parts[: depth + 1]), "no such list item", override)])
        if isinstance(node, dict) and depth < len(parts) - 1 and node.get(part) is None:
            field = _locate(parts[: depth + 1])[-1]  # its default, so that data.sources.0.path=x edits it
            default = field.default_factory() if _node(field) and field.default_factory else {}
            node[part] = TypeAdapter(Any).dump_python(default, mode="json", exclude_unset=True)
        if depth == len(parts) - 1:
            node[key] = value
        elif not isinstance(node := node[key], dict | list):
            raise ConfigError([_line(".".join(parts[: depth + 1]), "is a value, not a section", override)])
    members = _node(section := _locate(parts[:-1])[-1])  # a union's new tag: keep what the members share
    if isinstance(members, dict) and section.discriminator == parts[-1] and value in [*members]:
        for other in [k for k in node if k not in members[value].model_fields]:
            if any(other in model.model_fields for model in members.values()):
                del node[other]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate a run config; ConfigError has one line per problem (YAML's: file:line)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot read config file ({error})"]) from None
    except yaml.YAMLError as error:
        where = f":{error.problem_mark.line + 1}" if getattr(error, "problem_mark", None) else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError([f"{path}{where}: YAML syntax error: {problem}"]) from None
    if not isinstance(data, dict | None):
        kind = type(data).__name__
        raise ConfigError([f"{path}: the config must be a YAML mapping of sections (got {kind})"])
    data = data or {}
    for override in overrides:
        apply_override(data, override)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def to_yaml(config: PipelineConfig) -> str:
    """The fully resolved config (defaults filled in) as YAML, for the record."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(value: PipelineConfig | Any, prefix: str = "") -> dict[str, str]:
    """``{"dotted.path": "value"}`` for every leaf (a list of sections by index), e.g. MLflow params."""
    value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        value = dict(enumerate(value))
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items()
                for k, v in flatten(item, f"{prefix}.{key}".lstrip(".")).items()}  # fmt: skip
    return {prefix: value if isinstance(value, str) else json.dumps(value)}


def config_slice(config: PipelineConfig, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The parts of the config named by ``keys`` (sections or dotted paths to fields)."""
    dumped = config.model_dump(mode="json")
    return {key: functools.reduce(lambda node, part: node[int(part) if isinstance(node, list) else part],
                                  key.split("."), dumped) for key in keys}  # fmt: skip


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if args and origin is not dict:  # a union, or a Literal's values
        return " \\| ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    return "section" if _models(annotation) else getattr(annotation, "__name__", str(annotation))


def _default_text(field: FieldInfo) -> str:
    if field.is_required() or field.default_factory_takes_validated_data:
        return "**required**" if field.is_required() else "(see meaning)"
    value = field.get_default(call_default_factory=True)
    shown = json.dumps(TypeAdapter(Any).dump_python(value, mode="json", exclude_defaults=True))
    return "(see below)" if isinstance(value, BaseModel) else f"`{shown}`"


def reference_markdown(sections: tuple[str, ...] | None = None) -> str:
    """README's markdown tables (key, type, default, meaning) of these sections and the nested ones."""
    blocks: list[list[str]] = []

    def tables(title: str, node: Any) -> None:
        if isinstance(node, dict):
            for tag, model in node.items():
                tables(f"{title}` with `method: {tag}", model)
            return
        blocks.append(rows := [f"**`{title}`** — {' '.join((node.__doc__ or '').split())}", ""])
        rows += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in node.model_fields.items():  # a nested section's table follows its parent's
            meaning = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{name}` | {_type_name(field.annotation)} | {_default_text(field)} | {meaning} |")
            if _models(field.annotation):
                tables(f"{title}.{name}" + "[]" * (typing.get_origin(field.annotation) is list), _node(field))

    for name in sections or tuple(PipelineConfig.model_fields):
        tables(name, _node(PipelineConfig.model_fields[name]))
    return "\n\n".join("\n".join(rows) for rows in blocks) + "\n"


if __name__ == "__main__":  # python -m pipeline.config [SECTION ...]: print the reference
    import sys
    print(reference_markdown(tuple(sys.argv[1:]) or None), end="")
