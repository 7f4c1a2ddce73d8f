"""Typed config sections: fields with docs and constraints, built and checked from plain mappings.

A section is a dataclass whose fields are declared with :func:`option` (a one-line doc, choices and
ranges). :func:`build_section` turns a mapping (parsed YAML) into a section, rejecting unknown fields,
wrong types and out-of-range values with a :class:`~evo_subens.errors.ConfigError` that names the
dotted field. A section whose concrete class depends on its own contents (``children:``, whose
``family`` picks the family's section) says so with two class methods:

- ``select_section(data, path) -> type``: the class to build ``data`` with (may raise ConfigError);
- ``section_variants() -> [(label, type), ...]``: every class it may select, for :func:`field_docs`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from typing import Any

import yaml

from ..errors import ConfigError


def option(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a doc string and range/choice constraints checked on load."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2); PyYAML's 1.1 rules make it a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """Parse YAML text the way configs and overrides are read."""
    return yaml.load(text, Loader=_YamlLoader)


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a mapping", type(None): "null"}
    args = typing.get_args(hint)
    if args:
        return " or ".join(_describe(a) for a in args)
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted where floats are expected."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in args:
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(path, _describe(hint), value)
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf would pass every range check; .nan fails them obscurely
                raise ConfigError(path, "a finite number", value)
            return float(value)
    elif hint in (str, list, dict):
        if isinstance(value, hint):
            return value
    raise ConfigError(path, _describe(hint), value)


def _check_range(value: Any, meta: dict, path: str) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(path, "one of " + ", ".join(repr(c) for c in meta["choices"]), value)
    bounds = [(meta.get("gt"), "> {}", lambda v, b: v > b), (meta.get("ge"), ">= {}", lambda v, b: v >= b),
              (meta.get("le"), "<= {}", lambda v, b: v <= b)]
    failed = [fmt.format(b) for b, fmt, ok in bounds if b is not None and not ok(value, b)]
    if failed:
        wanted = " and ".join(fmt.format(b) for b, fmt, _ in bounds if b is not None)
        raise ConfigError(path, f"a value {wanted}", value)


def build_section(cls: type, data: Any, prefix: str = "") -> Any:
    """The section ``cls`` (or the class it selects for ``data``) built from the mapping ``data``, every
    value type- and range-checked; ``prefix`` is the section's dotted path, for error messages."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<top level>", "a mapping of fields", data)
    if hasattr(cls, "select_section"):
        cls = cls.select_section(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(path, "one of the known fields: " + ", ".join(fields), show_got=False)
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_section(hint, value, path)
        else:
            value = _coerce(value, hint, path)
            _check_range(value, fields[name].metadata, path)
            kwargs[name] = value
    return cls(**kwargs)


def field_docs(cls: type, prefix: str = "", tag: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, doc, default) of every field of the section ``cls``; a selecting section lists its
    selector fields once, then each variant's own fields with the doc prefixed ``[label]``."""
    rows = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and hasattr(hint, "section_variants"):
            rows.extend(_variant_docs(hint, path + ".", tag))
        elif dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, path + ".", tag))
        else:
            rows.append((path, tag + f.metadata.get("doc", ""), getattr(instance, f.name)))
    return rows


def _variant_docs(base: type, prefix: str, tag: str) -> list[tuple[str, str, Any]]:
    variants = base.section_variants()
    shared = {f.name for f in dataclasses.fields(base)}
    rows = [(path, f"{doc}: {', '.join(label for label, _ in variants)}", default)
            for path, doc, default in _own_docs(base, prefix, tag, lambda name: name in shared)]
    for label, variant in variants:
        rows.extend(_own_docs(variant, prefix, f"{tag}[{label}] ", lambda name: name not in shared))
    return rows


def _own_docs(cls: type, prefix: str, tag: str, keep: typing.Callable[[str], bool]) -> list[tuple[str, str, Any]]:
    """:func:`field_docs` of the fields of ``cls`` that ``keep`` accepts."""
    return [row for row in field_docs(cls, prefix, tag) if keep(row[0][len(prefix):].split(".")[0])]
