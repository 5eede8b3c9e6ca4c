"""Config dataclasses from YAML, with `key.sub=value` overrides and collected validation errors.

A config is a tree of dataclasses. `load_config(Cls, path, overrides)` reads YAML, applies
overrides (values parsed as YAML, so `training.epochs=1` is an int), checks every key exists
and every value has the declared type, calls each dataclass's `problems()` if it has one, and
raises one error listing every problem found.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from mlas_lora.errors import MlasLoraError, config_error

T = TypeVar("T")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise MlasLoraError(f"override {dotted!r}: {key!r} is not a section")
    tree[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise MlasLoraError(f"bad override {item!r}: expected key=value, e.g. training.epochs=1")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge_trees(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _check_type(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):  # `.nan <= 0` is False: no check sees it
        problems.append(f"{where}: expected a finite number, got {value!r}")
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            trial: list[str] = []
            result = _check_type(value, option, where, trial)
            if not trial:
                return result
        problems.append(f"{where}: {value!r} is not {hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_check_type(v, item_hint, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, problems)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        problems.append(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _build(cls: type[T], data: Any, where: str, problems: list[str]) -> T:
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(
                f"{where + '.' if where else ''}{key}: unknown key (known: {', '.join(sorted(names))})"
            )
    before = len(problems)
    kwargs = {
        name: _check_type(data[name], hints[name], f"{where + '.' if where else ''}{name}", problems)
        for name in names
        if name in data
    }
    obj = cls(**kwargs)
    if hasattr(obj, "problems") and len(problems) == before:  # only check values of the right types
        problems.extend(obj.problems())
    return obj


def config_from_dict(cls: type[T], data: dict) -> T:
    problems: list[str] = []
    obj = _build(cls, data, "", problems)
    if problems:
        raise config_error(problems)
    return obj


def read_yaml_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML config file as a dict, with its `base:` file (relative to it) underneath.

    `base: ../embedded-4dir.yaml` inherits every setting of that file; the keys given here replace
    the base's, mappings merged key by key and lists replaced whole. Bases may chain; a loop is an error.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (base of {_chain[-1]})" if _chain else ""
        raise MlasLoraError(f"config file not found: {path}{where}")
    if path.resolve() in _chain:
        loop = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise MlasLoraError(f"config `base:` loop: {loop}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise MlasLoraError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:  # YAML's position and problem, not its snippet of the file's line
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise MlasLoraError(
            f"{where}: not valid YAML ({getattr(err, 'problem', None) or 'syntax'})"
        ) from None
    if not isinstance(data, dict):
        raise MlasLoraError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise MlasLoraError(f"{path}: base must be a path to another YAML file, got {base!r}")
    return merge_trees(read_yaml_tree(path.parent / base, (*_chain, path.resolve())), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from a YAML file (with its `base:` chain) or defaults, plus `key=value` overrides."""
    data = read_yaml_tree(path) if path is not None else {}
    return config_from_dict(cls, merge_trees(data, parse_overrides(list(overrides))))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def hashed_dict(obj) -> dict:
    """A config dataclass as a dict less its top-level fields marked `metadata={"hashed": False}`:
    settings that say where to find something already made, never what it is (`cells`), so that no
    key or config hash changes with them."""
    skipped = {f.name for f in dataclasses.fields(obj) if f.metadata.get("hashed") is False}
    return {k: v for k, v in to_dict(obj).items() if k not in skipped}


def config_hash(obj) -> str:
    """A short stable hash of a config (`hashed_dict`) or any JSON-able value, for skipping unchanged
    stages."""
    data = hashed_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_yaml(obj, path: str | Path) -> None:
    from mlas_lora.stage_files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True))
