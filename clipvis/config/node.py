"""`CfgNode`: the config tree with attribute access, built on yacs (what detectron2/fvcore build on).

yacs gives the tree itself (attribute access, `freeze`, `clone`, `dump`). Merging is ours, so that every
problem becomes one `ConfigError` that names the full key, where the value came from (a file path or the
command line) and, for an unknown key, the closest known keys.

Values are read the way yacs/detectron2 read them: a string is passed through `ast.literal_eval` (so
`'("lvvis_val",)'` becomes a tuple and `"0.5"` a float) and then checked against the type of the default.
Allowed conversions: int -> float, list <-> tuple (to the default's kind), anything <-> None.
"""
from __future__ import annotations

import difflib
from ast import literal_eval
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Sequence, Union

from yacs.config import CfgNode as _YacsNode

from clipvis.config.yaml_files import read_config_chain
from clipvis.errors import ConfigError

COMMAND_LINE = "the command-line overrides"


class CfgNode(_YacsNode):
    """A node of the config tree: `cfg.MODEL.MASK_FORMER.DEC_LAYERS`, `freeze()`, `defrost()`, `clone()`,
    `dump()` (YAML text), `merge_from_file(path)`, `merge_from_list(["KEY", "VALUE", ...])`.

    Merging only sets keys that already exist (those of `get_default_config()`); a wrong key or a value
    of the wrong type raises `ConfigError`.
    """

    def merge_from_file(self, path: Union[str, Path]) -> None:
        """Merge a YAML file into this node: its `_BASE_` chain first (base before child), then the file."""
        for source, values in read_config_chain(path):
            self._merge_mapping(values, source=f"config file {source}")

    def merge_from_list(self, overrides: Sequence[Any], source: str = COMMAND_LINE) -> None:
        """Merge `["A.B.KEY", "VALUE", ...]` pairs in order (each VALUE text read with `ast.literal_eval` as
        detectron2 does, e.g. '("lvvis_val",)' -> a tuple; text that is no literal stays text)."""
        if isinstance(overrides, (str, bytes)):
            raise ConfigError(
                f"Config overrides must be a list of KEY VALUE items, e.g. ['TEST.NUM_FRAME', '3'], "
                f"not the single string {overrides!r}."
            )
        overrides = list(overrides)
        if len(overrides) % 2:
            raise ConfigError(
                f"Config overrides must come in KEY VALUE pairs; {source} have an odd number of items "
                f"and the key {overrides[-1]!r} has no value."
            )
        self._refuse_if_frozen()
        for full_key, raw in zip(overrides[0::2], overrides[1::2]):
            if not isinstance(full_key, str) or not full_key:
                raise ConfigError(f"Config override key {full_key!r} in {source} is not a dotted key name like TEST.NUM_FRAME.")
            *parents, leaf = full_key.split(".")
            node = self
            for depth, name in enumerate(parents):
                child = node.get(name)
                if not isinstance(child, CfgNode):
                    if child is None:
                        raise _unknown_key(self, full_key, source)
                    raise ConfigError(
                        f"Config key {'.'.join(parents[:depth + 1])!r} in {source} is a value, not a group; "
                        f"{full_key!r} does not exist."
                    )
                node = child
            if leaf not in node:
                raise _unknown_key(self, full_key, source)
            if isinstance(node[leaf], CfgNode):
                raise ConfigError(
                    f"Config key {full_key!r} in {source} is a group of keys ({_some_children(node[leaf], full_key)}); "
                    f"set one of its keys instead."
                )
            node[leaf] = coerce_value(raw, node[leaf], full_key, source)

    # ------------------------------------------------------------------ internals
    def _merge_mapping(self, values: Mapping, source: str, prefix: str = "", root: "CfgNode" = None) -> None:
        root = self if root is None else root
        if prefix == "":
            self._refuse_if_frozen()
        for name, value in values.items():
            full_key = f"{prefix}{name}"
            if not isinstance(name, str) or name not in self:
                raise _unknown_key(root, full_key, source)
            current = self[name]
            if isinstance(current, CfgNode):
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"Config key {full_key!r} in {source} is a group of keys ({_some_children(current, full_key)}), "
                        f"but was given the {type(value).__name__} {value!r}; write it as a mapping."
                    )
                current._merge_mapping(value, source, prefix=f"{full_key}.", root=root)
            else:
                if isinstance(value, Mapping):
                    raise ConfigError(
                        f"Config key {full_key!r} in {source} expects {_type_name(current)} "
                        f"(default {current!r}), but was given a mapping {dict(value)!r}."
                    )
                self[name] = coerce_value(value, current, full_key, source)

    def _refuse_if_frozen(self) -> None:
        if self.is_frozen():
            raise ConfigError("This config is frozen; use `cfg = cfg.clone(); cfg.defrost()` before changing it.")


def coerce_value(raw: Any, default: Any, full_key: str, source: str) -> Any:
    """The value to store for `full_key`: `raw` (text from YAML or the command line, or a Python value)
    decoded with `literal_eval` and checked/converted against `default`'s type. Raises `ConfigError`."""
    value = _decode(raw)
    if value is None or default is None:
        return value
    if type(value) is type(default):
        return value
    if isinstance(default, str) and isinstance(raw, str):
        return raw  # text that happens to look like a number or a tuple, for a key that wants text
    if type(default) is float and type(value) is int:
        return float(value)
    if isinstance(default, (list, tuple)) and type(value) in (list, tuple):
        return type(default)(value)
    raise ConfigError(
        f"Config key {full_key!r} in {source} expects {_type_name(default)} (default {default!r}), "
        f"but was given {_type_name(value)} {value!r}."
    )


def all_keys(node: _YacsNode, prefix: str = "") -> Iterator[str]:
    """Every dotted key under `node`, groups and values alike (e.g. 'MODEL', 'MODEL.WEIGHTS', ...)."""
    for name, value in node.items():
        full_key = f"{prefix}{name}"
        yield full_key
        if isinstance(value, _YacsNode):
            yield from all_keys(value, f"{full_key}.")


def closest_keys(root: _YacsNode, wanted: str, limit: int = 3) -> List[str]:
    """Known keys that look like `wanted`, best first: close names in the same group, then keys elsewhere
    with a close last part (a key put in the wrong group), then close full keys (a typo in a group name)."""
    known = list(all_keys(root))
    parent, _, leaf = wanted.rpartition(".")
    prefix = f"{parent}." if parent else ""
    siblings = [k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]]
    found = [prefix + name for name in difflib.get_close_matches(leaf, siblings, n=limit, cutoff=0.6)]
    elsewhere = sorted(
        ((difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio(), k) for k in known),
        key=lambda pair: -pair[0],
    )
    found += [k for ratio, k in elsewhere if ratio >= 0.8]
    found += difflib.get_close_matches(wanted, known, n=limit, cutoff=0.75)
    unique = list(dict.fromkeys(k for k in found if k != wanted))
    return unique[:limit]


def _unknown_key(root: _YacsNode, full_key: str, source: str) -> ConfigError:
    suggestions = closest_keys(root, str(full_key))
    hint = (
        f"Closest known keys: {', '.join(suggestions)}."
        if suggestions
        else "No similar key exists; `clipvis.config.get_default_config().dump()` lists every key."
    )
    return ConfigError(f"Unknown config key {full_key!r} in {source}. {hint}")


def _decode(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _type_name(value: Any) -> str:
    if value is None:
        return "None"
    return {bool: "a bool", int: "an int", float: "a float", str: "a str", list: "a list", tuple: "a tuple"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _some_children(node: _YacsNode, full_key: str) -> str:
    names = list(node.keys())
    shown = ", ".join(f"{full_key}.{n}" for n in names[:3])
    return shown + (", ..." if len(names) > 3 else "")
