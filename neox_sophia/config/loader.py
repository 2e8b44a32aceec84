"""Reading GPT-NeoX YAML files: several files merged flat, dashes == underscores at top level.

    values, origins, notes = read_config_files(["configs/125M.yml"], ["configs/sophia.yml"])
    apply_overrides(values, origins, ["optimizer.params.lr=7.0e-4", "train_iters=2000"])

Stricter than NeoX in one way, on purpose: any key given twice among the config files is an
error naming both places, whether the two spellings differ only in dashes, are literal repeats
inside one file (PyYAML would keep the last silently), or sit in two files (NeoX lets some of
these through silently, depending on the order and spelling). Values are replaced only on
purpose: by an override file (``--override FILE``, read after the config files: each key it sets
replaces the earlier value whole, and each replacement is reported in one line) or by ``--set``.
Keys that older NeoX configs spell differently (``gas``...) are read as NeoX's current ones
(config/aliases.py), each reported in one line.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Tuple

import yaml

from neox_sophia.config.aliases import rename, replaced_by
from neox_sophia.config.base import ConfigError

OVERRIDE = "--set"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (NeoX files also parse with it) that refuses a key repeated in one mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: Dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"{key}: appears twice in one mapping (lines {seen[key]} and "
                              f"{key_node.start_mark.line + 1}); keep one", str(key))
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def normalize_key(key: str) -> str:
    return key.replace("-", "_")


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as 'line L column C: problem' (the place of the problem)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1} column {mark.column + 1}: {problem}" if mark else problem


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file", "")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.key) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}", "") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of keys to values, got "
                          f"{type(data).__name__}", "")
    return data


def read_config_files(paths: Iterable[str], override_files: Iterable[str] = ()
                      ) -> Tuple[Dict[str, Any], Dict[str, str], List[str]]:
    """Merged top-level values (keys normalized), for each key the file it came from, and one
    note per renamed key and per value an override file replaced."""
    values: Dict[str, Any] = {}
    origins: Dict[str, str] = {}
    notes: List[str] = []
    paths = list(paths)
    if not paths:
        raise ConfigError("no config file given", "")
    for path in paths:
        for key, raw_key, value in _file_items(path, notes):
            if key in origins:
                where = "earlier in the same file" if origins[key] == path else f"already in {origins[key]}"
                raise ConfigError(f"{path}: {raw_key}: duplicate key ({where}); set each key in one file, "
                                  f"or replace it on purpose with --override {path} or --set {key}=VALUE", key)
            values[key], origins[key] = value, path
    for path in override_files:
        _override(path, values, origins, notes)
    return values, origins, notes


def _file_items(path: str, notes: List[str]):
    """(normalized key, key as written, value) of one file; a key repeated in it is an error."""
    seen: Dict[str, str] = {}
    for raw_key, value in read_yaml(path).items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{path}: {raw_key!r}: keys are strings", str(raw_key))
        key, note = rename(normalize_key(raw_key))
        if key in seen:
            raise ConfigError(f"{path}: {raw_key}: duplicate key (earlier in the same file as {seen[key]}); "
                              f"keep one", key)
        seen[key] = raw_key
        if note:
            notes.append(f"{path}: {note}")
        yield key, raw_key, value


def _override(path: str, values: Dict[str, Any], origins: Dict[str, str], notes: List[str]) -> None:
    """Merge an override file: its keys replace earlier values whole (one note per replacement),
    including an older key and the current one it stands for (decay_lr_to and min_lr)."""
    for key, _, value in _file_items(path, notes):
        replaced = [k for k in replaced_by(key) if k in values]
        for old in replaced:
            notes.append(f"{old}: {path} replaces {_short(values[old])} from {origins[old]}"
                         + ("" if old == key else f" (with {key} = {_short(value)})"))
            del values[old]
        values[key], origins[key] = value, path


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def parse_override(text: str) -> Tuple[List[str], Any]:
    """'optimizer.params.lr=7.0e-4' -> (['optimizer', 'params', 'lr'], 0.0007): the value is YAML."""
    if "=" not in text:
        raise ConfigError(f"{OVERRIDE} {text}: expected KEY=VALUE (e.g. train_iters=1000)", "")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"{OVERRIDE} {text}: empty key", "")
    path[0] = rename(normalize_key(path[0]))[0]
    try:
        value = yaml.load(raw, Loader=_StrictLoader)
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"{OVERRIDE} {text}: the value is not valid YAML: {e}", path[0]) from None
    return path, value


def apply_overrides(values: Dict[str, Any], origins: Dict[str, str], overrides: Iterable[str]) -> None:
    """Apply ``--set`` overrides in order; a dotted key reaches into a nested block. Setting min_lr
    replaces an older decay_lr_to, and the other way round (aliases.replaced_by)."""
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            for old in replaced_by(path[0])[1:]:
                values.pop(old, None)
                origins.pop(old, None)
        target = values
        for depth, part in enumerate(path[:-1]):
            node = target.get(part)
            if node is None:
                node = target[part] = {}
            elif not isinstance(node, dict):
                raise ConfigError(f"{OVERRIDE} {text}: {'.'.join(path[:depth + 1])} is not a mapping", path[0])
            else:
                node = target[part] = dict(node)  # never mutate what the file loaded in place
            target = node
        target[path[-1]] = value
        origins[path[0]] = f"{OVERRIDE} {text}" if len(path) == 1 else f"{origins.get(path[0], 'default')} + {OVERRIDE}"
