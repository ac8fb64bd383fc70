"""Configuration loading shared by the core and the edge.

One YAML file holds a section per process (`core:`, `edge:`). A section is decoded into that
process's typed msgspec Struct; values come, lowest precedence first, from the Struct's
defaults, the file, `CORVEX_<SECTION>_<FIELD>` environment variables, then command-line
flags. Unknown keys and wrong types are errors that name the offending path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

ENV_PREFIX = "CORVEX_"


class ConfigError(Exception):
    """The configuration file, environment or flags are invalid. The message says where."""


def _struct_leaves(struct_type: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Yields the paths of the scalar fields of a Struct type, descending into nested Structs."""
    info = msgspec.inspect.type_info(struct_type)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        field_type = field.type
        if isinstance(field_type, msgspec.inspect.StructType):
            yield from _struct_leaves(field_type.cls, (*path, field.encode_name))
        elif isinstance(field_type, msgspec.inspect.DictType | msgspec.inspect.UnionType):
            # Maps and tagged unions are configured in the file only.
            continue
        else:
            yield (*path, field.encode_name)


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def env_var_name(section: str, path: tuple[str, ...]) -> str:
    """The environment variable that overrides `section.path`, e.g. CORVEX_EDGE_PORT."""
    return ENV_PREFIX + "_".join((section, *path)).upper()


def read_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Reads the YAML file; a missing `path` (None) means every default."""
    if path is None:
        return {}
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = msgspec.yaml.decode(raw) if raw.strip() else {}
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_section(
    section: str,
    struct_type: type[T],
    *,
    path: str | os.PathLike[str] | None,
    flags: Mapping[tuple[str, ...], Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Builds one section's config from file, environment and flags (in that precedence)."""
    document = read_file(path)
    data = document.get(section) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: section `{section}` must be a mapping")
    data = _deep_copy(data)
    env = os.environ if environ is None else environ
    for leaf in _struct_leaves(struct_type, ()):
        name = env_var_name(section, leaf)
        if name in env:
            _set_path(data, leaf, env[name])
    for leaf, value in (flags or {}).items():
        if value is not None:
            _set_path(data, leaf, value)
    try:
        return msgspec.convert(data, struct_type, strict=False)
    except msgspec.ValidationError as exc:
        where = f"{path}" if path else "defaults"
        raise ConfigError(f"invalid configuration ({where}, section `{section}`): {exc}") from exc


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
