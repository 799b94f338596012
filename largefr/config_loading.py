"""Reading configs: JSON/YAML files, ``KEY=VALUE`` overrides, type checks and unknown keys.

Problems are appended as ``Issue`` tuples instead of raised, so one ``ConfigError`` can list them
all. The config classes are known only as dataclasses and type hints, so ``largefr.config`` can
import this module.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from largefr.config_validation import ConfigError, Issue

# ---------------------------------------------------------------------------- types


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "list", tuple: "list", dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def describe_hint(hint: Any) -> str:
    """A type hint in the words of a config file: 'a number', 'a list of strings', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_hint(a) for a in args)
    if origin is list:
        return f"a list of {describe_hint(args[0]).split(' ', 1)[-1]}s"
    if origin is dict or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a section (mapping)"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint))


def _choice_problem(value: Any, choices: Sequence[Any]) -> str:
    text = f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return text + (f" (did you mean {close[0]!r}?)" if close else "")


def convert_value(value: Any, hint: Any, key: str, issues: list[Issue]) -> Any:
    """Check ``value`` against a type hint; return it normalized (int -> float, tuple -> list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert_value(value, inner[0], key, issues)
        for option in inner:  # several types (a path or a list of paths): the first that fits
            option_issues: list[Issue] = []
            converted = convert_value(value, option, key, option_issues)
            if not option_issues:
                return converted
    elif origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        issues.append((key, _choice_problem(value, args)))
        return None
    elif origin is list and isinstance(value, (list, tuple)):
        return [convert_value(v, args[0], f"{key}[{i}]", issues) for i, v in enumerate(value)]
    elif (origin is dict or hint is dict) and isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            issues.append((key, f"keys must be strings, got {bad[0]!r}"))
        return value
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            issues.append((key, f"must be a finite number, got {value!r}"))
        return float(value)
    elif hint is str and isinstance(value, str):
        return value
    issues.append((key, f"must be {describe_hint(hint)}, got {value!r} ({_type_name(value)})"))
    return None


# ---------------------------------------------------------------------------- keys


def _section_type(hint: Any) -> type | None:
    """The dataclass behind a field's hint (``SyntheticDataConfig | None`` included), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    sections = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
    return sections[0] if sections else None


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, sections included, in declaration order."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        keys.append(key)
        section = _section_type(hints[field.name])
        if section is not None:
            keys.extend(valid_keys(section, key + "."))
    return keys


def closest_key(key: str, candidates: Sequence[str]) -> str | None:
    """The valid key a user most likely meant by an unknown ``key``."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    if same_leaf:  # a right name in the wrong section, e.g. 'train.lr' for 'optim.lr'
        return difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0)[0]
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [c for c in candidates if c.startswith(parent) and "." not in c[len(parent):]]
    for pool in (siblings, candidates):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def _unknown_key_problem(key: str, all_keys: Sequence[str]) -> str:
    suggestion = closest_key(key, all_keys)
    hint = f"did you mean {suggestion!r}?" if suggestion else "remove it"
    return f"unknown key ({hint})"


def build_section(cls: type, raw: Any, path: str, issues: list[Issue],
                  all_keys: Sequence[str]) -> Any:
    """Type-check ``raw`` against dataclass ``cls`` and build it; None when it has any problem.

    Leaf keys with a wrong type are left at their default so that the section's value checks
    still report the other keys' problems (all problems at once); a broken sub-section or a
    missing required key skips them, as they would only repeat the first problem.
    """
    if not isinstance(raw, dict):
        issues.append((path or "<top level>",
                       f"must be a section (mapping), got {raw!r} ({_type_name(raw)})"))
        return None
    first_issue = len(issues)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            issues.append((full, _unknown_key_problem(full, all_keys)))
    kwargs, broken, checkable = _section_kwargs(cls, raw, path, issues, all_keys)
    if not checkable:
        return None
    try:
        section = cls(**kwargs)
    except ConfigError as error:  # value checks of __post_init__
        issues.extend(i for i in error.issues if not _covered(i[0], broken))
        return None
    return section if len(issues) == first_issue else None


def _covered(key: str, broken: set[str]) -> bool:
    return any(key == b or key.startswith((b + ".", b + "[")) for b in broken)


def _is_required(field: dataclasses.Field) -> bool:
    no_default = dataclasses.MISSING
    return field.default is no_default and field.default_factory is no_default


def _section_kwargs(cls: type, raw: dict, path: str, issues: list[Issue],
                    all_keys: Sequence[str]) -> tuple[dict[str, Any], set[str], bool]:
    """(keyword arguments of the good keys, broken keys, whether value checks can run)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    broken: set[str] = set()
    checkable = True
    for field in dataclasses.fields(cls):
        key = f"{path}.{field.name}" if path else field.name
        hint, before = hints[field.name], len(issues)
        if field.name not in raw:
            if _is_required(field):
                issues.append((key, f"required key is missing ({describe_hint(hint)})"))
                checkable = False
            continue
        value, section = raw[field.name], _section_type(hint)
        if section is not None and (value is not None or section is hint):
            value = build_section(section, value, key, issues, all_keys)
            checkable = checkable and len(issues) == before
        else:
            value = convert_value(value, hint, key, issues)
        if len(issues) == before:
            kwargs[field.name] = value
        else:
            broken.add(key)
            checkable = checkable and not _is_required(field)
    return kwargs, broken, checkable


# ---------------------------------------------------------------------------- overrides


def apply_override(raw: dict, key: str, value: Any) -> str | None:
    """Set dotted ``key`` in the nested dict ``raw``; the reason on failure, else None."""
    parts = key.split(".")
    if not all(parts):
        return "empty key name; write KEY=VALUE with a dotted key, e.g. head.margin=0.4"
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            return f"cannot set it: {section!r} holds {child!r}, not a section"
        node = child
    node[parts[-1]] = value
    return None


# ---------------------------------------------------------------------------- files


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a number (YAML 1.1 wants 1.0e-3) and refuses duplicate keys."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _mapping_without_duplicates(loader: _YamlLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                            _mapping_without_duplicates)


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"duplicate key {repeated[0]!r}")
    return dict(pairs)


def read_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError([("<file>", "no such file; pass the path of a .json or .yaml config")],
                          str(path))
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            return yaml.load(text, Loader=_YamlLoader)
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_json_object)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError([("<file>", f"cannot parse: {error}")], str(path)) from None
    raise ConfigError([("<file>", "unknown extension; use .json, .yaml or .yml")], str(path))


def apply_overrides(data: dict, overrides: Sequence[str],
                     origins: dict[str, str]) -> list[Issue]:
    issues = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        origins[key] = f"--set {text}"
        if not sep:
            issues.append((key, "an override must be KEY=VALUE, e.g. head.margin=0.4"))
            continue
        try:
            value = yaml.load(value_text, Loader=_YamlLoader)
        except yaml.YAMLError as error:
            issues.append((key, f"cannot parse the value {value_text!r} as YAML: {error}"))
            continue
        problem = apply_override(data, key, value)
        if problem:
            issues.append((key, problem))
    return issues
